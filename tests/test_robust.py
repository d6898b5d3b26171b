"""BNProbe where real runs get hard: mixed precision, channels_last, lazy layers, gradient
accumulation, activation checkpointing, torch.compile, resume into the same store, failures inside
the probe (each injected into a real Trainer.fit), and the Lightning ecosystem around it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import bnprobe
from bnprobe import BNProbe, load
from tests.reference import Lit, MetricsLogger, Reference, loader, make_model, trainer

ROOT = Path(__file__).resolve().parents[1]


class RefAtFirstMicroBatch(pl.Callback):
    """The independent reference on the first micro-batch of every optimizer step."""

    def __init__(self, ref: Reference, accumulate: int = 1) -> None:
        self.ref, self.accumulate = ref, accumulate
        self.by_step: dict[int, dict[str, dict[str, float]]] = {}
        self._step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step if batch_idx % self.accumulate == 0 else None
        if self._step is not None:
            self.ref.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step is not None:
            self.by_step[self._step] = self.ref.metrics
            self.ref.active = False


def _compare(probe: BNProbe, ref: RefAtFirstMicroBatch, rel: float = 2e-4) -> int:
    train = probe.to_dataframe()
    train = train[train["stage"] == "train"]
    got = train.set_index(["step", "layer", "metric"])["value"]
    assert got.index.is_unique  # one record per optimizer step: nothing counted twice
    checked = 0
    for step, layers in ref.by_step.items():
        for layer, metrics in layers.items():
            for metric, value in metrics.items():
                assert got[step, layer, metric] == pytest.approx(value, rel=rel, abs=1e-6), (
                    step,
                    layer,
                    metric,
                )
                checked += 1
    return checked


def _weights(lit: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in lit.state_dict().items()}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- numerics ------------------------------------------------------------------------------------
def test_bf16_mixed_moments_are_float32_or_better_and_match_float64(tmp_path) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model("mlp1d"))
    seen: list[torch.dtype] = []
    lit.net[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    ref = RefAtFirstMicroBatch(Reference(lit))
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    trainer(tmp_path, callbacks=[ref, probe], precision="bf16-mixed").fit(lit, loader((6,)))
    assert torch.bfloat16 in seen  # the BN input really was bf16
    assert _compare(probe, ref, rel=1e-4) >= 8 * 20
    df = probe.to_dataframe()
    assert df["value"].notna().all() and (df[df["metric"] == "nonfinite"]["value"] == 0).all()


def test_channels_last_gives_the_same_values_as_contiguous(tmp_path) -> None:
    class ChannelsLast(Lit):
        def forward(self, x: Tensor) -> Tensor:
            return self.net(x.contiguous(memory_format=torch.channels_last))  # type: ignore[no-any-return]

    tables = []
    layouts: list[bool] = []
    for cls in (Lit, ChannelsLast):
        pl.seed_everything(0)
        lit = cls(make_model("res2d"))
        if cls is ChannelsLast:
            lit = lit.to(memory_format=torch.channels_last)
            lit.net.bn1.register_forward_pre_hook(
                lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last))
            )
        probe = BNProbe(every_n_steps=1, save_dir=False, summary=False, per_channel=True)
        trainer(tmp_path, callbacks=[probe], max_epochs=1).fit(lit, loader((3, 8, 8)))
        tables.append(probe.to_dataframe())
    assert layouts and all(layouts)
    a, b = tables
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    assert b["value"].to_numpy() == pytest.approx(a["value"].to_numpy(), rel=1e-4, abs=1e-6)


def test_lazy_batchnorm_is_measured_once_initialized(tmp_path) -> None:
    pl.seed_everything(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.LazyBatchNorm2d(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )

    class LazyLit(Lit):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            # lazy parameters cannot be optimized before they exist: train the rest
            params = [p for n, p in self.named_parameters() if not n.startswith("net.1.")]
            return torch.optim.SGD(params, lr=0.1)

    class LateRef(RefAtFirstMicroBatch):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:  # the reference needs initialized parameters
                self.ref = Reference(pl_module)
            if batch_idx >= 1:
                super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    lit = LazyLit(net)
    assert nn.parameter.is_lazy(net[1].weight)
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    ref = LateRef(None)  # type: ignore[arg-type]
    trainer(tmp_path, callbacks=[probe, ref], max_epochs=1).fit(lit, loader((3, 8, 8)))
    assert isinstance(lit.net[1], nn.BatchNorm2d) and lit.net[1].num_features == 8
    df = probe.to_dataframe()
    assert set(df["layer"]) == {"net.1"} and sorted(df["step"].unique()) == [0, 1, 2, 3]
    metrics = set(df["metric"])
    assert {"batch_mean", "mean_shift", "gamma_drift"} <= metrics
    assert sorted(ref.by_step) == [1, 2, 3]
    assert _compare(probe, ref) >= 3 * 20


def test_gradient_accumulation_records_the_first_micro_batch_of_each_step(tmp_path) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model("res2d"))
    ref = RefAtFirstMicroBatch(Reference(lit), accumulate=2)
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    trainer(tmp_path, callbacks=[ref, probe], accumulate_grad_batches=2).fit(lit, loader((3, 8, 8)))
    df = probe.to_dataframe()
    assert sorted(df["step"].unique()) == [0, 1, 2, 3]  # 8 batches, 4 optimizer steps
    calls = df[df["metric"] == "forward_calls"]["value"]
    assert (calls == 1).all()  # the step's first micro-batch; the second is not counted
    assert _compare(probe, ref) >= 4 * 2 * 20


def test_activation_checkpointing_counts_the_rerun_but_records_once(tmp_path) -> None:
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
            self.head = nn.Linear(16, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(checkpoint(self.block, x, use_reentrant=False))  # type: ignore[no-any-return]

    pl.seed_everything(0)
    lit = Lit(Checkpointed())
    ref = RefAtFirstMicroBatch(Reference(lit))
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    trainer(tmp_path, callbacks=[ref, probe]).fit(lit, loader((6,)))
    df = probe.to_dataframe()
    calls = df[df["metric"] == "forward_calls"]["value"]
    assert len(calls) == 8 and (calls == 2).all()  # forward + recomputation in backward
    assert _compare(probe, ref) >= 8 * 20  # the values are the first (real) forward's
    # torch re-runs the BN in train mode during recomputation: running stats update twice
    assert int(lit.net.block[1].num_batches_tracked) == 2 * 8


# -- torch.compile --------------------------------------------------------------------------------
def test_compiled_model_is_measured_when_the_probe_attaches_first(tmp_path) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model("mlp1d"))
    ref = RefAtFirstMicroBatch(Reference(lit))
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    compiled = torch.compile(lit, backend="eager")  # Lightning compiles at the first step
    trainer(tmp_path, callbacks=[ref, probe], max_epochs=1).fit(compiled, loader((6,)))
    df = probe.to_dataframe()
    assert (df[df["metric"] == "forward_calls"]["value"] == 1).all()
    assert _compare(probe, ref) >= 4 * 20


def test_model_compiled_and_run_before_the_probe_attached_warns_once(tmp_path) -> None:
    pl.seed_everything(0)
    net = make_model("mlp1d")
    lit = Lit(torch.compile(net, backend="eager"))
    lit(torch.randn(16, 6))  # compiled and run before fit: hooks added later are never traced
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    with pytest.warns(UserWarning, match=r"no BatchNorm layer ran.*torch\.compile") as record:
        trainer(tmp_path, callbacks=[probe], max_epochs=1).fit(lit, loader((6,)))
    mine = [str(w.message) for w in record if "no BatchNorm layer ran" in str(w.message)]
    assert len(mine) == 1 and "net is torch.compile'd" in mine[0]
    calls = probe.to_dataframe().query("metric == 'forward_calls'")["value"]
    assert (calls == 0).all()


# -- resume ----------------------------------------------------------------------------------------
def test_resumed_runs_append_to_the_same_store_without_duplicates(tmp_path) -> None:
    store = tmp_path / "store"

    def run(max_epochs: int, ckpt: str | None = None, save: bool = True) -> tuple[BNProbe, Any]:
        pl.seed_everything(7)
        lit = Lit(make_model("mlp1d"))
        probe = BNProbe(every_n_steps=1, save_dir=store if save else False, summary=False)
        tr = trainer(tmp_path, callbacks=[probe], max_epochs=max_epochs, enable_checkpointing=True)
        tr.fit(lit, loader((6,)), ckpt_path=ckpt)
        return probe, tr

    whole, _ = run(4, save=False)
    _, tr = run(2)  # steps 0..7
    ckpt = str(tmp_path / "epoch2.ckpt")
    tr.save_checkpoint(ckpt)
    run(3, ckpt)  # steps 8..11, then "crashes" (stops)
    last, _ = run(4, ckpt)  # resumed from the same checkpoint again: 8..15, 8..11 re-measured
    parts = list(store.glob("part-*.parquet"))
    raw = pd.concat([pd.read_parquet(p) for p in parts])
    assert raw.duplicated(["step", "layer", "metric"]).any()  # on disk, 8..11 twice
    saved = load(store)
    train = saved[saved["stage"] == "train"]
    assert sorted(train["step"].unique()) == list(range(16))
    assert not train.duplicated(["step", "layer", "channel", "metric"]).any()
    want = whole.to_dataframe().set_index(["step", "layer", "metric"])["value"]
    got = train.set_index(["step", "layer", "metric"])["value"]
    assert got.to_numpy() == pytest.approx(want.loc[got.index].to_numpy(), rel=1e-6, abs=1e-9)
    mine = last.to_dataframe().set_index(["step", "layer", "metric"])["value"]
    assert mine.index.get_level_values("step").min() == 8
    assert got.loc[mine.index].to_numpy() == pytest.approx(mine.to_numpy(), rel=0, abs=0)


# -- failures inside the probe: reported once, that part off, training unchanged ---------------
class DictBN(nn.BatchNorm1d):
    """Takes its input wrapped in a dict: the probe cannot read it."""

    def forward(self, x: Any) -> Tensor:
        return super().forward(x["x"])


class TupleBN(nn.BatchNorm1d):
    """Returns a tuple: odd, but the probe reads the input and needs nothing from the output."""

    def forward(self, x: Tensor) -> Any:
        return super().forward(x), None


class OddNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.dict_bn = DictBN(16)
        self.tuple_bn = TupleBN(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dict_bn({"x": self.fc(x)})
        return self.head(torch.relu(self.tuple_bn(h)[0]))  # type: ignore[no-any-return]


class BrokenLogger(MetricsLogger):
    """A real logger whose log_metrics fails on the probe's keys (like a dead remote service)."""

    calls = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(k.startswith("bnprobe/") for k in metrics):
            type(self).calls += 1
            raise ConnectionError("the tracking server went away")


def _fit_pair(tmp_path: Path, make: Any, probe: BNProbe, **opts: Any) -> tuple[Any, Any]:
    out = []
    for with_probe in (False, True):
        pl.seed_everything(5)
        lit = Lit(make())
        cbs = [probe] if with_probe else []
        trainer(tmp_path / str(with_probe), callbacks=cbs, **opts).fit(lit, loader((6,)))
        out.append(_weights(lit))
    return out[0], out[1]


def test_layer_the_probe_cannot_read_is_switched_off_and_training_unchanged(tmp_path) -> None:
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    with pytest.warns(RuntimeWarning, match=r"layer 'net\.dict_bn' \(DictBN\) failed") as record:
        plain, probed = _fit_pair(tmp_path, OddNet, probe)
    mine = [str(w.message) for w in record if "dict_bn" in str(w.message)]
    assert len(mine) == 1 and "TypeError" in mine[0]
    _assert_same(plain, probed)
    df = probe.to_dataframe()
    assert set(df["layer"]) == {"net.tuple_bn"}  # the tuple-returning layer is measured
    summary = probe.summary_text()  # what the end of fit prints: what is off, and why
    assert "switched off after an error: measuring layer 'net.dict_bn' (TypeError: " in summary
    assert "found in what was measured." in summary
    assert sorted(df["step"].unique()) == list(range(8))
    assert (df[df["metric"] == "forward_calls"]["value"] == 1).all()


def test_unwritable_save_dir_warns_once_and_keeps_the_table(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    probe = BNProbe(every_n_steps=1, save_dir=blocker / "bnprobe", summary=False)
    with pytest.warns(UserWarning, match=r"saving the store failed with \w+Error") as record:
        plain, probed = _fit_pair(tmp_path, lambda: make_model("mlp1d"), probe)
    assert sum("saving the store" in str(w.message) for w in record) == 1
    _assert_same(plain, probed)
    assert sorted(probe.to_dataframe()["step"].unique()) == list(range(8))


def test_logger_that_raises_warns_once_and_the_rest_goes_on(tmp_path) -> None:
    BrokenLogger.calls = 0
    store = tmp_path / "store"
    probe = BNProbe(every_n_steps=1, save_dir=store, summary=False, log_to="all")
    match = r"logging to BrokenLogger failed with ConnectionError: the tracking server went away"
    with pytest.warns(UserWarning, match=match) as record:
        plain, probed = _fit_pair(
            tmp_path, lambda: make_model("mlp1d"), probe, logger=BrokenLogger()
        )
    assert sum("BrokenLogger" in str(w.message) for w in record) == 1
    assert BrokenLogger.calls == 1  # switched off after the first failure
    _assert_same(plain, probed)
    assert sorted(probe.to_dataframe()["step"].unique()) == list(range(8))
    assert sorted(load(store)["step"].unique()) == list(range(8))


def test_full_disk_warns_once_and_training_is_unchanged(tmp_path) -> None:
    subprocess.run(
        [sys.executable, "-m", "tests.robust_run", str(tmp_path)],
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["same_weights"]
    saving = [w for w in result["warnings"] if "saving the store" in w]
    assert len(saving) == 1 and "File too large" in saving[0]
    assert result["parts"] == []  # nothing half-written is visible
    assert result["steps"] == list(range(8)) and result["rows"] > 0


# -- ecosystem -----------------------------------------------------------------------------------
def test_csv_logger_gets_the_scalars_and_the_store_is_saved(tmp_path) -> None:
    pl.seed_everything(0)
    probe = BNProbe(every_n_steps=2, summary=False, log_to="all")  # default: TensorBoard only
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, callbacks=[probe], logger=logger).fit(Lit(make_model("mlp1d")), loader((6,)))
    csv = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    col = "bnprobe/train/mean_shift/net.1"
    assert col in csv.columns
    logged = csv.dropna(subset=[col]).set_index("step")[col]
    df = probe.to_dataframe()
    want = df[(df["metric"] == "mean_shift")].set_index("step")["value"]
    assert list(logged.index) == [0, 2, 4, 6]
    assert logged.to_numpy() == pytest.approx(want.loc[logged.index].to_numpy(), rel=1e-6)
    pd.testing.assert_frame_equal(load(Path(logger.log_dir) / "bnprobe_store"), df)


def test_no_logger_still_fills_the_table_and_the_store(tmp_path) -> None:
    probe = BNProbe(every_n_steps=1, summary=False)
    trainer(tmp_path, callbacks=[probe], logger=False).fit(Lit(make_model("mlp1d")), loader((6,)))
    df = probe.to_dataframe()
    assert sorted(df["step"].unique()) == list(range(8))
    pd.testing.assert_frame_equal(load(tmp_path / "bnprobe_logs" / "version_0"), df)


def test_lightning_pytorch_users_get_an_equivalent_callback(tmp_path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from bnprobe.lightning import BNProbe as LBNProbe

    class LLit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model("mlp1d")

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    pl.seed_everything(0)
    probe = LBNProbe(every_n_steps=1, summary=False)
    assert isinstance(probe, L.Callback)
    lit = LLit()
    ref = Reference(lit)
    ref.start()
    L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[probe],
    ).fit(lit, loader((6,)))
    df = probe.to_dataframe()
    assert sorted(df["step"].unique()) == [0, 1, 2, 3]
    step0 = df[df["step"] == 0].set_index("metric")["value"]
    for metric, value in ref.metrics["net.1"].items():
        assert step0[metric] == pytest.approx(value, rel=2e-4, abs=1e-7), metric
    pd.testing.assert_frame_equal(load(tmp_path / "bnprobe_logs" / "version_0"), df)


def test_lightning_cli_config_adds_the_probe(tmp_path, monkeypatch) -> None:
    from lightning_utilities.core.imports import RequirementCache

    if not RequirementCache("jsonargparse[signatures]>=4.27.7"):
        pytest.skip("LightningCLI needs `pip install 'jsonargparse[signatures]>=4.27.7'`")
    monkeypatch.setattr(sys, "argv", ["lightning_cli"])  # only `args` below, not pytest's
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "examples" / "lightning_cli.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks.init_args.every_n_steps=1",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_train=24",
            "--data.init_args.num_val=8",
        ],
        save_config_callback=None,
    )
    probes = [cb for cb in cli.trainer.callbacks if isinstance(cb, BNProbe)]
    assert len(probes) == 1
    probe = probes[0]
    assert probe.every_n_steps == 1 and probe.histograms and probe.save_dir is None
    df = probe.to_dataframe()
    assert sorted(df[df["stage"] == "train"]["step"].unique()) == [0, 1, 2]
    assert set(df[df["stage"] == "train"]["layer"]) == {"net.features.1", "net.features.5"}
    assert len(load(Path(cli.trainer.log_dir) / "bnprobe_store")) == len(df)


# -- a nearly full disk under the log folder: bnprobe's own event file --------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1.5 MiB tmpfs (needs root and ``mount``; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("reserve", [2**20, pytest.param(64 * 2**20, marks=pytest.mark.slow)])
def test_nearly_full_disk_stops_bnprobe_events_and_the_users_logging_goes_on(
    small_disk: Path, tmp_path: Path, reserve: int
) -> None:
    """80 steps, the user's ``self.log`` every step, bnprobe every step with histograms into
    its own event file (about 640 KB in all) on a 1.5 MiB disk: bnprobe stops with one warning
    when a write would leave under ``reserve`` bytes (1 MiB: after some steps; 64 MiB, the
    default: at once); both runs
    finish, the user's 80 points are all there, and bnprobe's file holds whole records, every
    CRC TensorBoard's own, read back by read_tensorboard."""
    from tests.test_tensorboard_write import _records

    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tests.disk_run", str(small_disk), str(out), str(reserve)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["same_weights"]
    assert result["user_steps"] == list(range(80))  # the user's logging went on
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "nearly full" in result["warnings"][0] and "your own logging" in result["warnings"][0]
    assert result["rows"] > 0  # the table goes on
    log_dir = Path(result["log_dir"])
    ours = [log_dir / f for f in result["files"] if f.endswith(".bnprobe")]
    if reserve == 64 * 2**20:
        assert ours == []  # nothing fits above the reserve: not even a file
        return
    (own,) = ours
    assert len(_records(own)) > 2  # whole records only, every CRC TensorBoard's
    df = bnprobe.read_tensorboard(log_dir)
    steps = sorted(df["step"].unique())
    assert steps == list(range(len(steps))) and 0 < len(steps) < 80


def test_full_disk_error_is_raised_once_and_the_file_keeps_whole_records(
    small_disk: Path,
) -> None:
    """With no reserve, a write that meets ENOSPC raises EventFileError once; the file is cut
    back to its last whole record and every later call is a no-op."""
    from bnprobe.tensorboard import EventFileError, EventWriter
    from tests.test_tensorboard_write import _records

    writer = EventWriter(small_disk / "run", reserve=0)
    big = {f"bnprobe/train/kl/layer{i}.bn": float(i) for i in range(5000)}
    with pytest.raises(EventFileError, match="No space left on device"):
        for step in range(1000):
            bnprobe.tensorboard.write_scalars(writer, big, step)
    assert writer.failure is not None and "No space left" in writer.failure
    bnprobe.tensorboard.write_scalars(writer, big, 1000)  # off: no error, nothing written
    writer.flush()
    writer.close()
    (own,) = (small_disk / "run").iterdir()
    assert len(_records(own)) > 1
    (small_disk / "filler").write_bytes(b"")  # the disk takes small writes again


def test_batched_metric_failure_warns_once_for_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics of all layers are computed at once: when that fails, the 64 layers are
    turned off with one warning (one per cause, not per layer), each with its line in
    ``failures`` (what the end-of-fit summary lists)."""
    import warnings

    from bnprobe import stats
    from bnprobe.recorder import switched_off
    from bnprobe.tap import BNTap

    model = nn.Sequential(*[nn.BatchNorm1d(3) for _ in range(64)])

    def broken(seg: Any) -> Any:
        raise FloatingPointError("the batched metrics broke")

    monkeypatch.setattr(stats, "segment_metrics", broken)
    with BNTap(model) as tap, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tap.start()
        out = model(torch.randn(8, 3))
        tap.collect(step=0)
        tap.start()  # every layer is off now: nothing more to warn about
        model(torch.randn(8, 3))
        tap.collect(step=1)
    mine = [str(w.message) for w in caught if "bnprobe" in str(w.message)]
    assert len(mine) == 1 and "FloatingPointError: the batched metrics broke" in mine[0]
    assert len(tap.failures) == 64 and all(layer.failed for layer in tap.layers)
    off = switched_off({}, tap)
    assert off["measuring layer '63'"] == "FloatingPointError: the batched metrics broke"
    assert out.shape == (8, 3)
