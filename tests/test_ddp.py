"""BNProbe under DDP: two CPU processes (gloo) run tests/ddp_run.py, as torchrun would start them.

One launch runs three short fits in the same process group (default broadcast_buffers, buffers
not broadcast with different data per rank, a layer that fails on rank 1 only); the tests below
compare rank 0's table with what each rank recorded itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bnprobe import load
from bnprobe.distributed import RankGather, rank_divergence
from bnprobe.store import make_rows
from bnprobe.tap import Snapshot
from tests.launch import launch_ranks

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    launch_ranks("tests.ddp_run", out, cwd=ROOT, timeout=TIMEOUT_S)
    return out


def _reference(out: Path, run: str, rank: int) -> dict[str, Any]:
    return json.loads((out / run / f"rank{rank}" / "reference.json").read_text())  # type: ignore[no-any-return]


def _table(out: Path, run: str) -> pd.DataFrame:
    return pd.read_parquet(out / run / "rank0" / "table.parquet")


def test_rank0_table_holds_every_ranks_rows_with_its_values(ddp_out: Path) -> None:
    df = _table(ddp_out, "broadcast")
    train = df[df["stage"] == "train"]
    assert set(train["rank"]) == {0, 1}
    assert sorted(train["step"].unique()) == [0, 1, 2]  # 48 samples / 16 per batch, one epoch
    got = train.set_index(["rank", "step", "layer", "metric"])["value"]
    checked = 0
    for rank in (0, 1):
        ref = _reference(ddp_out, "broadcast", rank)["metrics"]
        for step, layers in ref.items():
            for layer, metrics in layers.items():
                for metric, value in metrics.items():
                    assert got[rank, int(step), layer, metric] == pytest.approx(
                        value, rel=2e-4, abs=1e-7
                    ), (rank, step, layer, metric)
                    checked += 1
    assert checked >= 2 * 3 * 2 * 13
    # the two ranks saw different data: their batch moments differ
    bm = train[(train["metric"] == "batch_mean") & (train["layer"] == "net.bn")]
    by_rank = bm.set_index(["step", "rank"])["value"].unstack()
    assert (by_rank[0] != by_rank[1]).all()


def test_batched_exchange_loses_nothing_at_epoch_end_checkpoint_or_fit_end(ddp_out: Path) -> None:
    """``gather_batch=3`` over two epochs of 7 steps with a checkpoint every 5 steps: batches
    are cut short by each epoch end (step 6), checkpoint (after steps 4 and 9) and the end of fit
    (step 13), and every row of rank 1 arrives, with its own values; the steps each rank kept
    for a block go to the gather as one block."""
    df = _table(ddp_out, "batched")
    train = df[df["stage"] == "train"]
    for rank in (0, 1):
        assert sorted(train[train["rank"] == rank]["step"].unique()) == list(range(14))
    got = train.set_index(["rank", "step", "layer", "metric"])["value"]
    ref = _reference(ddp_out, "batched", 1)["metrics"]
    checked = 0
    for step, layers in ref.items():
        for layer, metrics in layers.items():
            for metric, value in metrics.items():
                assert got[1, int(step), layer, metric] == pytest.approx(value, rel=2e-4, abs=1e-7)
                checked += 1
    assert checked >= 14 * 2 * 13
    # each rank handed the gather every step once, in blocks of the tap's where it kept steps
    for rank in (0, 1):
        added = json.loads((ddp_out / "batched" / f"rank{rank}" / "added.json").read_text())
        assert sum(added) == 14 and max(added) > 1, (rank, added)
    div = train[train["metric"] == "rank_divergence"]
    assert sorted(div["step"]) == sorted(list(range(14)) * 2)
    assert (div["value"] == 0.0).all() and set(div["rank"]) == {0}
    # at each checkpoint the store already holds every rank's rows of every step before it
    seen = json.loads((ddp_out / "batched" / "rank0" / "checkpoints.json").read_text())
    assert sorted(int(s) for s in seen) == [5, 10]
    for at, pairs in seen.items():
        assert pairs == [[r, s] for r in (0, 1) for s in range(int(at))], at


def test_broadcast_buffers_keeps_ranks_identical(ddp_out: Path) -> None:
    df = _table(ddp_out, "broadcast")
    div = df[df["metric"] == "rank_divergence"]
    assert set(div["rank"]) == {0} and set(div["layer"]) == {"net.bn", "net.odd"}
    assert len(div) == 2 * 3
    assert (div["value"] == 0.0).all()  # rank 0's buffers are copied to rank 1 before each forward
    # running moments in rank 1's rows are rank 0's
    rm = df[(df["metric"] == "running_mean") & (df["stage"] == "train")]
    by_rank = rm.set_index(["step", "layer", "rank"])["value"].unstack()
    np.testing.assert_array_equal(by_rank[0].to_numpy(), by_rank[1].to_numpy())


def test_rank_divergence_without_broadcast_matches_the_ranks_own_buffers(ddp_out: Path) -> None:
    df = _table(ddp_out, "diverge")
    div = df[df["metric"] == "rank_divergence"].set_index(["step", "layer"])["value"]
    r0 = _reference(ddp_out, "diverge", 0)["running"]
    r1 = _reference(ddp_out, "diverge", 1)["running"]
    assert sorted(int(s) for s in r0) == list(range(40))
    for step in r0:
        for layer in r0[step]:
            mu = np.array([r0[step][layer][0], r1[step][layer][0]])
            var = np.array([r0[step][layer][1], r1[step][layer][1]])
            s2 = var.mean(axis=0) + 1e-5
            want = max(
                (np.abs(mu - mu.mean(axis=0)) / np.sqrt(s2)).max(),
                np.abs(np.log((var + 1e-5) / s2)).max(),
            )
            assert div[int(step), layer] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # step 0: both ranks start from the same buffers; later rank 1's shifted data pulls it away
    assert div[0, "net.bn"] == 0.0
    assert div[2, "net.bn"] > 0.1
    from bnprobe import diagnose

    kinds = {(f.kind, f.layer) for f in diagnose(df)}
    assert ("rank_divergence", "net.bn") in kinds


def test_only_rank0_writes_the_store_and_tensorboard(ddp_out: Path) -> None:
    store = ddp_out / "broadcast" / "store"
    parts = sorted(p.name for p in store.glob("part-*.parquet"))
    assert parts and all(p.startswith("part-r0000-") for p in parts)
    saved = load(store)
    table = _table(ddp_out, "broadcast")
    assert len(saved) == len(table)
    assert set(saved["rank"]) == {0, 1}
    events = sorted((ddp_out / "broadcast" / "tb").rglob("events.out.tfevents.*"))
    # Lightning's file and bnprobe's own (``*.bnprobe``), both from rank 0's process: the pid
    # is the part of the name after the host
    assert [e.name.endswith(".bnprobe") for e in events] == [False, True]
    assert len({e.name.split(".")[4] for e in events}) == 1


def test_a_layer_failing_on_one_rank_does_not_hang_the_others(ddp_out: Path) -> None:
    df = _table(ddp_out, "odd")
    train = df[df["stage"] == "train"]
    assert set(train[train["rank"] == 0]["layer"]) == {"net.bn", "net.odd"}
    assert set(train[train["rank"] == 1]["layer"]) == {"net.bn"}  # failed there, turned off
    failures = json.loads((ddp_out / "odd" / "rank1" / "failures.json").read_text())
    assert len(failures) == 1 and "'net.odd'" in failures[0] and "TypeError" in failures[0]
    assert json.loads((ddp_out / "odd" / "rank0" / "failures.json").read_text()) == []
    # training itself is unaffected: DDP kept both ranks' weights equal
    w0 = json.loads((ddp_out / "odd" / "rank0" / "weights.json").read_text())
    w1 = json.loads((ddp_out / "odd" / "rank1" / "weights.json").read_text())
    for key in w0:
        if "running" not in key:
            np.testing.assert_array_equal(np.array(w0[key]), np.array(w1[key]))


def test_rank_divergence_formula() -> None:
    mu = [np.array([0.0, 1.0]), np.array([0.5, 1.0]), np.array([1.0, 1.0])]
    var = [np.array([1.0, 1.0]), np.array([1.0, 4.0]), np.array([1.0, 1.0])]
    got = rank_divergence([{"a": (m, v)} for m, v in zip(mu, var, strict=True)], {"a": 0.0})
    # channel 0: means 0, .5, 1 around .5 in std 1 -> .5; channel 1: var 4 vs mean 2 -> log 2
    assert got["a"] == pytest.approx(max(0.5, math.log(2.0)))
    same = rank_divergence([{"a": (mu[0], var[0])}] * 2, {"a": 1e-5})
    assert same == {"a": 0.0}
    assert rank_divergence([{"a": (mu[0], var[0])}], {"a": 1e-5}) == {}
    nan = rank_divergence([{"a": (mu[0], var[0])}, {"a": (mu[0] * np.nan, var[0])}], {"a": 0.0})
    assert math.isnan(nan["a"])


def _divergence_by_channel(mu: np.ndarray, var: np.ndarray, eps: float) -> float:
    """rank_divergence of one layer written out channel by channel (ranks x channels)."""
    gaps = []
    for c in range(mu.shape[1]):
        m, s2 = mu[:, c].mean(), var[:, c].mean()
        if not (np.isfinite(mu[:, c]).all() and np.isfinite(var[:, c]).all()):
            return math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.abs((mu[:, c] - m) / np.sqrt(s2 + eps))
            v = np.abs(np.log((var[:, c] + eps) / (s2 + eps)))
        gaps += [g for g in np.fmax(d, v).tolist() if not math.isnan(g)]
    return max(gaps, default=0.0)


@pytest.mark.parametrize(
    ("ranks", "mu", "var", "eps"),
    [
        (2, [0.1, -3.0, 0.0], [1.0, 0.0, 2.5], 1e-5),  # identical ranks: exactly 0
        (3, [0.1, 0.7, 1e300], [1.0, 0.3, 2.0], 1e-5),  # identical, but their mean is not 0.1
        (2, [1e308, 0.0, 1.0], [1.0, 0.0, 1.0], 0.0),  # the mean overflows; 0/0 ignored
        (2, [0.0, np.inf, 1.0], [1.0, 1.0, 1.0], 1e-5),  # not finite: NaN
        (4, [0.5, 0.25, -2.0], [0.0, 4.0, 0.5], 0.0),  # var + eps = 0 on channel 0
    ],
)
def test_rank_divergence_of_identical_ranks_is_the_formulas_value(
    ranks: int, mu: list[float], var: list[float], eps: float
) -> None:
    """The shortcut for ranks holding the same buffers (broadcast_buffers) gives exactly what the
    formula gives channel by channel, also where the mean over ranks is not the ranks' value."""
    mu_r, var_r = np.array([mu] * ranks), np.array([var] * ranks)
    got = rank_divergence([{"a": (m, v)} for m, v in zip(mu_r, var_r, strict=True)], {"a": eps})
    want = _divergence_by_channel(mu_r, var_r, eps)
    if math.isnan(want):
        assert math.isnan(got["a"])
    else:
        assert got["a"] == want
        assert math.copysign(1.0, got["a"]) == math.copysign(1.0, want)
    if ranks == 3:
        assert want > 0.0  # the full formula ran: 0.1 + 0.1 + 0.1 is not 3 x 0.1


def test_gather_without_a_process_group_is_a_no_op() -> None:
    rows = make_rows(
        step=3, epoch=0, stage="train", rank=0, layers=["bn"], metrics=["kl"], values=[0.5]
    )
    snap = Snapshot([rows], {"bn": {"running_mean": np.zeros(2), "running_var": np.ones(2)}})
    assert RankGather({"bn": 1e-5}).gather(snap, step=3, epoch=0) is None


def test_multi_process_layout_has_a_rank_divergence_chart(ddp_out: Path) -> None:
    """The chart exists where the metric does: in multi-process runs (single-process runs
    have none, tests/test_callback.py)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    (run,) = {p.parent for p in (ddp_out / "broadcast" / "tb").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    train = next(c for c in layout.category if c.title == "bnprobe/train")
    assert "rank_divergence" in [chart.title for chart in train.chart]
    assert any(t.startswith("bnprobe/train/rank_divergence/") for t in acc.Tags()["scalars"])
    # rank_divergence arrives after its steps' own rows, without a second epoch point
    assert [e.step for e in acc.Scalars("bnprobe/train/epoch")] == [0, 1, 2]
    divergence = [t for t in acc.Tags()["scalars"] if "/rank_divergence/" in t]
    assert [e.step for e in acc.Scalars(divergence[0])] == [0, 1, 2]


# -- a failure on one rank: every rank finishes, rank 0 says which rank and why ------------------
FAIL_TIMEOUT_S = 240  # four fits; a rank left waiting fails after the 20 s process-group timeout


@pytest.fixture(scope="module")
def fail_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp_fail")
    launch_ranks("tests.ddp_fail_run", out, cwd=ROOT, timeout=FAIL_TIMEOUT_S)
    return out


def _said(out: Path, run: str, rank: int = 0) -> list[str]:
    return json.loads((out / run / f"rank{rank}" / "warnings.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("run", "cause"),
    [
        ("collect", "collecting measurements failed with RuntimeError: collect injected"),
        ("start", "starting a measurement failed with RuntimeError: start injected"),
        ("encode", "building its rows to send failed with ValueError: encode injected"),
    ],
)
def test_rank_whose_rows_fail_is_named_once_and_training_finishes(
    fail_out: Path, run: str, cause: str
) -> None:
    from tests.ddp_fail_run import STEPS

    for rank in (0, 1):  # both ranks finished every step (launch_ranks also checked exit 0)
        assert (fail_out / run / f"rank{rank}" / "done").read_text() == str(STEPS)
    said = _said(fail_out, run)
    about = [m for m in said if m.startswith("BNProbe (rank 1):")]
    assert len(about) == 1, said
    assert cause in about[0] and "rows are missing from rank 0's table from step 0" in about[0]
    assert not [m for m in said if "rank 0" in m.split(":")[0]]  # rank 0 itself is fine
    df = pd.read_parquet(fail_out / run / "rank0" / "table.parquet")
    train = df[df["stage"] == "train"]
    assert sorted(train[train["rank"] == 0]["step"].unique()) == list(range(STEPS))
    assert (train["rank"] == 1).sum() == 0  # nothing from rank 1, and said so above
    assert (df["stage"] == "val").any() and (df["stage"] == "probe").any()


def test_a_probe_failing_on_one_rank_is_named_and_its_rows_still_arrive(fail_out: Path) -> None:
    from tests.ddp_fail_run import STEPS

    for rank in (0, 1):
        assert (fail_out / "probe" / f"rank{rank}" / "done").read_text() == str(STEPS)
    said = _said(fail_out, "probe")
    about = [m for m in said if m.startswith("BNProbe (rank 1):")]
    assert len(about) == 1, said
    assert "the train/eval probe failed with ValueError: check_mismatch could not run" in about[0]
    df = pd.read_parquet(fail_out / "probe" / "rank0" / "table.parquet")
    train = df[df["stage"] == "train"]
    for rank in (0, 1):  # rank 1's rows are present where they could be: every train step
        assert sorted(train[train["rank"] == rank]["step"].unique()) == list(range(STEPS))
    assert (df["stage"] == "probe").any()  # rank 0's own probe ran


def test_gather_every_is_checked_and_gathers_every_kth_measured_step() -> None:
    from bnprobe import BNProbe

    with pytest.raises(ValueError, match=r"gather_every=.*positive int; got 0"):
        BNProbe(gather_every=0)
    with pytest.raises(ValueError, match=r"gather_batch=.*positive int; got True"):
        BNProbe(gather_batch=True)
    probe = BNProbe(every_n_steps=5, gather_every=3)
    probe._every = 5
    assert [s for s in range(0, 60, 5) if probe._gathers(s)] == [0, 15, 30, 45]


# -- a block of steps: what the tap hands over when it processes several steps at once ----------
def _tap_steps(k: int, start: int = 10) -> list[Snapshot]:
    """``k`` measured steps of a small net (one layer without running statistics), taken as the
    callback takes them under DDP (``keep_channels=True``)."""
    from torch import nn

    from bnprobe.tap import BNTap

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 5),
        nn.BatchNorm1d(5, track_running_stats=False),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4, momentum=None),
    )
    snaps = []
    with BNTap(model, keep_channels=True) as tap:
        for i in range(k):
            tap.start(trace=i == 0)
            model(torch.randn(8, 6) * (1 + i))
            snaps.append(tap.collect(step=start + i, epoch=i // 3))
    return snaps


def _block(snaps: list[Snapshot], channels: str) -> Snapshot:
    """The steps as one block: their layer rows as one multi-step Rows, their channels with the
    steps on the first axis (``"columns"``: the tap's columns, stacked; ``"layers"``: layer ->
    (k, C) arrays; ``"steps"``: a sequence of each step's channels)."""
    from bnprobe.store import Rows

    rows = Rows.stack([s.parts[0] for s in snaps])
    if channels == "steps":
        return Snapshot([rows], [s.channels for s in snaps])  # type: ignore[arg-type]
    if channels == "layers":
        per = {
            name: {key: np.stack([s.channels[name][key] for s in snaps]) for key in vectors}
            for name, vectors in snaps[0].channels.items()
        }
        return Snapshot([rows], per)
    first = snaps[0].channels
    columns = {key: np.stack([s.channels.columns[key] for s in snaps]) for key in first.columns}  # type: ignore[attr-defined]
    stacked = type(first)(first.layers, first.sizes, columns, first.present)  # type: ignore[attr-defined]
    return Snapshot([rows], stacked)


def _decoded(gather: RankGather, other: RankGather) -> list[Any]:
    """What rank 0 (``gather``) makes of one exchange where rank 1 is ``other``: both ranks'
    packed vectors, decoded as rank 0 decodes them."""
    table = np.stack([gather._pack(gather._steps), other._pack(other._steps)])
    gather._steps, other._steps = [], []
    return gather._decode(table, step=0, epoch=0)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("channels", ["columns", "layers", "steps"])
def test_a_block_of_k_steps_gives_rank_0_the_rows_of_k_single_steps(
    monkeypatch: pytest.MonkeyPatch, channels: str, traced: bool
) -> None:
    """``RankGather.add`` of a block of 5 steps counts 5 steps towards ``due`` and brings rank 0
    the same rows of the other rank and the same rank_divergence as 5 single-step adds, value
    for value (rank 1's vectors are rank 0's with other running moments). Read at once when
    every step names its rows alike; step by step when the first is the traced one (it has
    more rows)."""
    from bnprobe.distributed import gather as g

    monkeypatch.setattr(g, "is_distributed", lambda: True)  # add is local: no process group
    snaps, k = _tap_steps(6, start=9), 5
    snaps = snaps[:k] if traced else snaps[1:]
    steps = [int(s.parts[0].step) for s in snaps]
    epochs = [int(s.parts[0].epoch) for s in snaps]
    at_once = g._split_block(_block(snaps, channels), steps) is None
    assert at_once is not traced
    eps = {"1": 1e-5, "3": 1e-5, "5": 1e-5}
    got = {}
    for how in ("single", "block"):
        ranks = [RankGather(eps, batch=8) for _ in range(2)]
        for r, gather in enumerate(ranks):
            gather._cap, gather.batch_steps = g.capacity([6, 5, 4]), 8
            if how == "single":
                for snap, step, epoch in zip(snaps, steps, epochs, strict=True):
                    gather.add(snap, step=step, epoch=epoch)
            else:
                gather.add(_block(snaps, channels), step=steps, epoch=epochs)
            assert len(gather._steps) == k and not gather.due
            if r == 1:  # rank 1's running moments differ from rank 0's
                for s in gather._steps:
                    s.values[len(gather._known[s.key].metrics) :] *= 1.5
        assert ranks[0]._layout is not None and ranks[0]._layout.running == (("1", 6), ("5", 4))
        got[how] = _decoded(*ranks)
    for how in ("single", "block"):
        frame = pd.concat([rows.frame() for rows in got[how]], ignore_index=True)
        got[how] = frame.sort_values(["rank", "step", "metric", "layer"], ignore_index=True)
    pd.testing.assert_frame_equal(got["single"], got["block"])
    table = got["block"]
    assert sorted(table["step"].unique()) == steps
    mine = pd.concat([s.parts[0].frame() for s in snaps], ignore_index=True)
    other = table[table["rank"] == 1].drop(columns="rank")
    want = mine.drop(columns="rank").sort_values(["step", "metric", "layer"], ignore_index=True)
    pd.testing.assert_frame_equal(other.reset_index(drop=True), want)
    divergence = table[table["metric"] == "rank_divergence"]
    assert set(divergence["rank"]) == {0} and len(divergence) == 2 * k
    assert (divergence["value"] > 0).all()


def test_a_late_rank_divergence_block_writes_no_epoch_point() -> None:
    """Under DDP rank_divergence comes in its own block, after its step's own rows (which wrote
    the epoch): it adds no second epoch point; a step's own rows keep theirs."""
    from bnprobe.store import Rows
    from bnprobe.tensorboard.write import snapshot_metrics

    late = Rows(5, 2, "train", 0, ("a", "b"), ("rank_divergence",) * 2, np.array([0.5, 0.0]))
    got = snapshot_metrics(Snapshot([late]))
    assert got == {
        5: {"bnprobe/train/rank_divergence/a": 0.5, "bnprobe/train/rank_divergence/b": 0.0}
    }
    block = Rows.stack([late, late._replace(step=6, values=np.array([1.0, 2.0]))])
    assert list(snapshot_metrics(Snapshot([block]))[6].values()) == [1.0, 2.0]
    own = Rows(5, 2, "train", 0, ("a",), ("mean_shift",), np.array([3.0]))
    assert snapshot_metrics(Snapshot([own, late]))[5] == {
        "bnprobe/train/epoch": 2.0,
        "bnprobe/train/mean_shift/a": 3.0,
        "bnprobe/train/rank_divergence/a": 0.5,
        "bnprobe/train/rank_divergence/b": 0.0,
    }


def test_a_block_whose_steps_disagree_with_its_rows_is_sent_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never raises, always adds the steps it was given (so every rank still counts the same
    steps): a block whose rows hold other steps than ``step`` says are sent as failed, once."""
    from bnprobe.distributed import gather as g

    monkeypatch.setattr(g, "is_distributed", lambda: True)
    snaps = _tap_steps(4, start=9)[1:]  # steps 10, 11, 12, untraced
    gather = RankGather({})
    gather.add(_block(snaps, "columns"), step=[10, 11, 13], epoch=0)
    assert [(s.step, s.status) for s in gather._steps] == [(10, g._FAILED), (11, g._FAILED),
                                                           (13, g._FAILED)]  # fmt: skip
    assert gather._next.causes == ["building its rows to send failed with ValueError: a block "
                                   "of steps [10, 11, 12], not [10, 11, 13]"]  # fmt: skip
    traced = RankGather({})  # the first step traced: read step by step
    traced.add(_block(_tap_steps(3), "columns"), step=[10, 11, 13], epoch=0)
    assert [s.status for s in traced._steps] == [g._FAILED] * 3
    assert traced._next.causes == ["building its rows to send failed with ValueError: a block "
                                   "holds rows of step 12, not one of [10, 11, 13]"]  # fmt: skip
    gather.add(None, step=[14, 15], epoch=[1, 1], error="collecting failed")
    assert [(s.step, s.epoch, s.status) for s in gather._steps[3:]] == [
        (14, 1, g._FAILED), (15, 1, g._FAILED),
    ]  # fmt: skip
