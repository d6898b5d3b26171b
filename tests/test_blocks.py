"""Measured training steps processed in blocks (BNTap.keep): the rows, the store, TensorBoard and
the loggers get exactly what one step at a time gives them, and the blocks end where they must."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import bnprobe
from bnprobe import BNProbe
from bnprobe.store import concat
from bnprobe.tap import BNTap, Snapshot, hooks
from bnprobe.tap.hooks import MAX_BLOCK_SPAN
from tests.reference import Lit, MetricsLogger, trainer

OFFSET_STEP = 21
"""The step whose batch has a large offset: the first BN layer's recovery turns ill-conditioned
there, in the middle of a block of 16 (steps 16..31)."""


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),  # recoverable: the offset makes its recovery ill-conditioned
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.BatchNorm1d(12, affine=False),
        nn.Linear(12, 4),
        nn.BatchNorm1d(4, momentum=None),  # cumulative average
    )


def _batch(step: int) -> Tensor:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
    return x + 1000.0 if step == OFFSET_STEP else x


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal tables, bit for bit, each step's rows in their order (a block lists its steps'
    layer rows before their per-channel rows: sorted stably by step, the orders agree)."""
    a = a.sort_values("step", kind="stable", ignore_index=True)
    b = b.sort_values("step", kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert np.array_equal(
        a["value"].to_numpy().view(np.int64), b["value"].to_numpy().view(np.int64)
    )


def _bits(points: list[tuple[Any, float]]) -> list[tuple[Any, str]]:
    """(key, value) pairs with each value as its exact hex (NaN equal to NaN)."""
    return [(key, float(value).hex()) for key, value in points]


def _tap_run(block: int, steps: int = 40, every: int = 1) -> dict[str, Any]:
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    tap = BNTap(net, keep_channels=True, per_channel=True, block=block).attach()
    snaps: list[Snapshot] = []
    suspects = []
    for step in range(steps):
        measured = step % every == 0
        if measured:
            tap.start()
        loss = net(_batch(step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if measured:
            out = tap.keep(step=step, epoch=step // 10)
            suspects.append([layer.suspect for layer in tap.layers])
            if out is not None:
                snaps.append(out)
    out = tap.drain()
    if out is not None:
        snaps.append(out)
    tap.detach()
    channels = [
        (stage, step, {k: {n: np.array(v) for n, v in per.items()} for k, per in ch.items()})
        for snap in snaps
        for stage, step, ch in snap.step_channels()
    ]
    return {
        "rows": concat(p.frame() for s in snaps for p in s.parts),
        "suspects": suspects,
        "channels": channels,
        "snapshots": len(snaps),
        "weights": {k: v.clone() for k, v in net.state_dict().items()},
    }


def test_a_block_of_16_gives_the_rows_of_one_step_at_a_time_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hooks, "MAX_BLOCK_AGE_S", 1e9)  # full blocks, on a loaded machine too
    one, block = _tap_run(1), _tap_run(16)
    assert one["snapshots"] == 40 and block["snapshots"] < 10  # blocks were made
    flags = [s[0] for s in one["suspects"]]
    assert not any(flags[:OFFSET_STEP]) and flags[OFFSET_STEP]  # it flips inside a block
    assert one["suspects"] == block["suspects"]
    _same(one["rows"], block["rows"])
    assert set(one["rows"]["channel"].dropna()) == set(range(16))  # per-channel rows too
    assert [c[:2] for c in one["channels"]] == [c[:2] for c in block["channels"]]
    assert [c[1] for c in block["channels"]] == list(range(40))  # one entry per step
    for (_, _, a), (_, _, b) in zip(one["channels"], block["channels"], strict=True):
        assert a.keys() == b.keys()
        for layer in a:
            assert a[layer].keys() == b[layer].keys()
            for name in a[layer]:
                assert np.array_equal(a[layer][name], b[layer][name], equal_nan=True)
    for name, tensor in one["weights"].items():
        assert torch.equal(tensor, block["weights"][name])


@pytest.mark.parametrize("values", [40, 100])
def test_a_block_computed_a_few_steps_at_a_time_gives_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, values: int
) -> None:
    """A block whose steps hold more than BLOCK_VALUES values per quantity is computed a few
    steps at a time (the net has 32 channels: 40 gives one step at a time, 100 three, with a
    last chunk of one): rows, per-channel vectors and recovery flags are those of one step at
    a time, bit for bit."""
    one = _tap_run(1)
    monkeypatch.setattr(hooks, "BLOCK_VALUES", values)
    monkeypatch.setattr(hooks, "MAX_BLOCK_AGE_S", 1e9)  # full blocks, on a loaded machine too
    chunked = _tap_run(16)
    assert chunked["snapshots"] < 10
    assert one["suspects"] == chunked["suspects"]
    _same(one["rows"], chunked["rows"])
    assert [c[:2] for c in one["channels"]] == [c[:2] for c in chunked["channels"]]
    for (_, _, a), (_, _, b) in zip(one["channels"], chunked["channels"], strict=True):
        assert a.keys() == b.keys()
        for layer in a:
            assert a[layer].keys() == b[layer].keys()
            for name in a[layer]:
                assert a[layer][name].tobytes() == b[layer][name].tobytes(), (layer, name)


def test_the_recovery_check_of_a_block_is_the_one_collect_makes() -> None:
    """The per-step check (restricted to the recoverable layers) says what the whole
    segments say: the flags of a K=16 run equal those of collect() one step at a time."""
    torch.manual_seed(0)
    net = _net()
    tap = BNTap(net).attach()
    flags = []
    for step in range(30):
        tap.start()
        net(_batch(step))
        tap.collect(step=step)
        flags.append([layer.suspect for layer in tap.layers])
    assert flags == _tap_run(16, steps=30)["suspects"]


def test_blocks_end_at_full_at_a_long_gap_and_at_a_new_plan() -> None:
    torch.manual_seed(0)
    net = _net()
    tap = BNTap(net, block=4).attach()
    done = []

    def measure(step: int) -> None:
        tap.start()
        net(_batch(step))
        out = tap.keep(step=step)
        done.append(
            None
            if out is None
            else sorted({int(s) for p in out.parts for s in np.atleast_1d(p.step)})
        )

    measure(0)
    assert done == [[0]]  # the first step is processed at once (no gap known yet)
    for step in range(1, 8):  # the first steps change layouts (a layer turns suspect): warm up
        tap.start()
        net(_batch(step))
        tap.collect(step=step)
    done.clear()
    for step in range(8, 14):
        measure(step)
    assert done == [None, None, None, [8, 9, 10, 11], None, None]  # blocks of 4
    net[1].eval()  # a new layout: the kept steps are processed before step 14 is kept
    measure(14)
    assert done[-1] == [12, 13]
    net[1].train()
    done.clear()
    assert tap.drain() is not None and tap.pending == 0
    # steps further apart than MAX_BLOCK_SPAN allows are processed at once
    for step in range(100, 100 + 5 * (MAX_BLOCK_SPAN + 1), MAX_BLOCK_SPAN + 1):
        measure(step)
    assert all(d is not None and len(d) == 1 for d in done)
    tap.detach()


def test_at_every_50_steps_each_measured_step_is_processed_at_once() -> None:
    run = _tap_run(16, steps=200, every=50)
    assert run["snapshots"] == 4


class _Calls(MetricsLogger):
    """A logger that remembers bnprobe's log_metrics calls (step and keys, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        keys = {k: v for k, v in metrics.items() if k.startswith("bnprobe/")}
        if keys:
            self.calls.append((step, keys))


class _Lit(Lit):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.global_step == OFFSET_STEP:
            x = x + 1000.0
        return F.cross_entropy(self(x), y)


def _loader(n: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(4, (n,), generator=gen))
    return DataLoader(data, batch_size=16)


def _fit(tmp_path: Path, block: int) -> dict[str, Any]:
    taps: list[BNTap] = []
    flags: list[list[bool]] = []
    kept: list[bool] = []

    class Tap(BNTap):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, block=block, **kwargs)
            taps.append(self)

        def keep(self, **kw: Any) -> Snapshot | None:
            out = super().keep(**kw)
            flags.append([layer.suspect for layer in self.layers])
            kept.append(out is None)
            return out

    class Probe(BNProbe):
        _tap_class = Tap

    pl.seed_everything(0)
    lit = _Lit(_net(), lr=0.01)
    calls = _Calls()
    board = TensorBoardLogger(tmp_path, name="run")
    probe = Probe(every_n_steps=1, per_channel=True, log_to="all", summary=False)
    fit = trainer(tmp_path, callbacks=[probe], logger=[board, calls], max_epochs=2)
    fit.fit(lit, _loader(400, 0), _loader(64, 1))  # 25 steps an epoch, validation after each
    acc = EventAccumulator(board.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {
        t: [(e.step, e.value) for e in acc.Scalars(t)]
        for t in tags["scalars"]
        if t.startswith("bnprobe/")
    }
    hists = {
        t: [(e.step, e.histogram_value) for e in acc.Histograms(t)]
        for t in tags["histograms"]
        if t.startswith("bnprobe/")
    }
    assert probe.run_dir is not None
    return {
        "table": probe.to_dataframe(),
        "saved": bnprobe.load(probe.run_dir),
        "scalars": scalars,
        "hists": hists,
        "calls": calls.calls,
        "flags": flags,
        "kept": kept,
        "weights": {k: v.clone() for k, v in lit.state_dict().items()},
        "findings": [str(f) for f in probe.findings()],
    }


def test_a_fit_with_blocks_records_what_one_step_at_a_time_records(tmp_path: Path) -> None:
    one = _fit(tmp_path / "one", 1)
    block = _fit(tmp_path / "block", 16)
    assert not any(one["kept"]) and sum(block["kept"]) > 20  # steps were kept for blocks
    first = [f[0] for f in one["flags"]]
    assert not any(first[:OFFSET_STEP]) and first[OFFSET_STEP]  # the flip, mid-block
    assert one["flags"] == block["flags"]
    for name, tensor in one["weights"].items():  # training is the same
        assert torch.equal(tensor, block["weights"][name])
    assert set(one["table"]["stage"]) == {"train", "val", "probe"}
    _same(one["table"], block["table"])
    _same(one["saved"], block["saved"])
    assert one["scalars"].keys() == block["scalars"].keys()
    for tag, points in one["scalars"].items():
        assert _bits(points) == _bits(block["scalars"][tag]), tag
    assert one["hists"].keys() == block["hists"].keys() and one["hists"]
    for tag, points in one["hists"].items():
        assert points == block["hists"][tag], tag
    assert [s for s, _ in one["calls"]] == [s for s, _ in block["calls"]]  # in step order
    assert [(s, _bits(list(m.items()))) for s, m in one["calls"]] == [
        (s, _bits(list(m.items()))) for s, m in block["calls"]
    ]
    assert one["findings"] == block["findings"]


def test_the_plain_loop_keeps_blocks_and_drains_them_on_every_read(tmp_path: Path) -> None:
    def run(block: int, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
        torch.manual_seed(0)
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        with bnprobe.watch(net, folder, every_n_steps=1, histograms=False) as probe:
            probe.tap.block = block
            for step in range(20):
                with probe.step(step):
                    loss = net(_batch(step)).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            pending = probe.tap.pending
            early = probe.to_dataframe()  # a read drains the kept steps
            assert probe.tap.pending == 0
        return early, bnprobe.load(folder), pending

    early_one, saved_one, pending_one = run(1, tmp_path / "one")
    early, saved, pending = run(16, tmp_path / "block")
    assert pending_one == 0 and pending > 0
    assert sorted(early["step"].unique()) == list(range(20))
    _same(early_one, early)
    _same(saved_one, saved)


def test_block_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="block"):
        BNTap(_net(), block=0)


def test_the_fused_recovery_check_answers_as_the_two_functions_bit_for_bit() -> None:
    """stats.recovered_ill_conditioned (what the tap runs per step) against recover_moments
    then recovery_ill_conditioned, on channels near and far from the bounds, dead, tiny, huge,
    NaN and inf."""
    from bnprobe import stats

    rng = np.random.default_rng(0)
    n = 4000
    f = rng.choice([0.05, 0.1, 0.3, 0.9, 1.0], n)
    count = rng.choice([1.0, 2.0, 32.0, 1024.0], n)
    bf = np.where(rng.random(n) < 0.5, f, rng.choice([0.1, 1.0], n))
    samples = rng.choice([1.0, 2.0, 32.0, 4096.0], n)
    scale = 10.0 ** rng.integers(-30, 30, n)
    mean_old = rng.normal(size=n) * scale
    var_old = rng.random(n) * scale
    mu_b = mean_old + rng.normal(size=n) * scale * 10.0 ** rng.integers(-8, 2, n)
    var_b = var_old * 10.0 ** rng.uniform(-9, 3, n)
    var_b[rng.random(n) < 0.05] = 0.0  # dead channels
    mean_new = ((1 - f) * mean_old + f * mu_b).astype(np.float32).astype(np.float64)
    var_new = ((1 - f) * var_old + f * var_b).astype(np.float32).astype(np.float64)
    values = np.stack([mean_old, var_old, mean_new, var_new, mean_old, var_old])
    odd = rng.random((6, n)) < 0.01
    values[odd] = rng.choice([np.nan, np.inf, -np.inf, 0.0, 1e-320, 3e38], odd.sum())
    direct = rng.random(n) < 0.2  # measured directly: zero old moments, f = n = 1
    values[0:2, direct] = 0.0
    f[direct], count[direct] = 1.0, 1.0
    bessel, bound_bessel = stats.bessel(count), stats.bessel(samples)
    mean, var = stats.recover_moments(*values[:4], f, count, bessel=bessel)
    want = stats.recovery_ill_conditioned(
        values[4], values[5], mean, var, bf, samples, bessel=bound_bessel
    )
    got = stats.recovered_ill_conditioned(
        values.copy(), f, 1.0 - f, bessel, bf, 1.0 - bf, bound_bessel
    )
    assert 0.05 < want.mean() < 0.95  # both answers occur
    assert np.array_equal(got, want)


def test_a_block_that_fails_loses_only_what_one_step_at_a_time_loses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When processing a block fails (here: any block holding step 21, in the middle of the
    block of steps 16..31), its steps are processed one at a time: the steps before the failing
    one keep their rows, that one turns the layers off with one warning, and it and the later
    steps give the rows of a step that measured nothing (none: every layer is off), exactly as
    one step at a time. The block ends at step 22, whose plan differs (the offset makes the
    first layer's recovery ill-conditioned): that step, measured before the failure was known,
    goes without the layers it turned off."""
    real = hooks._block_metrics

    def failing(block: Any, channels: bool) -> Any:
        if OFFSET_STEP in block.steps:
            raise FloatingPointError("injected")
        return real(block, channels)

    monkeypatch.setattr(hooks, "_block_metrics", failing)
    monkeypatch.setattr(hooks, "MAX_BLOCK_AGE_S", 1e9)  # full blocks, on a loaded machine too
    runs = {}
    for block in (1, 16):
        with pytest.warns(RuntimeWarning, match="injected") as caught:
            runs[block] = _tap_run(block)
        assert sum("injected" in str(w.message) for w in caught) == 1
    one, blocked = runs[1], runs[16]
    _same(one["rows"], blocked["rows"])
    measured = blocked["rows"].loc[blocked["rows"]["metric"] == "batch_mean", "step"]
    assert sorted(set(measured)) == list(range(OFFSET_STEP))  # 16..20 of the failing block too
    assert set(blocked["rows"]["step"]) == set(range(OFFSET_STEP))  # then every layer is off
