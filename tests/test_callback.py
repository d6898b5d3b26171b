"""BNProbe in real Trainer.fit runs: values, TensorBoard tags, the promises, options, resume."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import bnprobe
from bnprobe import BNProbe, load
from bnprobe import tensorboard as tb
from bnprobe.store import COLUMNS, KEY, STORE_NAME
from tests.reference import (
    INPUT_SHAPES,
    Lit,
    MetricsLogger,
    Reference,
    loader,
    make_model,
    trainer,
)


class _RefCallback(pl.Callback):
    """Runs the independent reference on exactly the batches the probe measures."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.by_step: dict[int, dict[str, dict[str, float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ref.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step - 1] = self.ref.metrics


@pytest.mark.parametrize("kind", ["mlp1d", "res2d", "vol3d"])
def test_every_train_metric_at_every_step_matches_reference(tmp_path, kind) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model(kind))
    ref = _RefCallback(Reference(lit))
    probe = BNProbe(every_n_steps=1, save_dir=False)
    trainer(tmp_path, callbacks=[ref, probe]).fit(lit, loader(INPUT_SHAPES[kind]))
    df = probe.to_dataframe()
    assert list(df.columns) == list(COLUMNS)
    assert sorted(df["step"].unique()) == list(range(8))  # 2 epochs x 4 batches
    got = df.set_index(["step", "layer", "metric"])["value"]
    checked = 0
    for step, layers in ref.by_step.items():
        for layer, metrics in layers.items():
            for metric, value in metrics.items():
                assert got[step, layer, metric] == pytest.approx(value, rel=2e-4, abs=1e-7)
                checked += 1
    assert checked >= 8 * 13


def test_tensorboard_tags_and_values_read_back(tmp_path) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model("res2d"))
    probe = BNProbe(every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, callbacks=[probe], logger=logger).fit(lit, loader(INPUT_SHAPES["res2d"]))
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = {t for t in tags["scalars"] if t.startswith("bnprobe/")}
    df = probe.to_dataframe()
    expected = {
        f"bnprobe/train/{m}/{layer}" for layer, m in zip(df["layer"], df["metric"], strict=True)
    }
    expected.add("bnprobe/train/epoch")  # lets read_tensorboard recover the epoch column
    assert scalar_tags == expected
    assert "bnprobe/train/mean_shift/net.bn1" in scalar_tags
    assert "bnprobe/train/gamma_drift/net.bn0" in scalar_tags
    hist = {t for t in tags["histograms"] if t.startswith("bnprobe/")}
    assert hist == {f"bnprobe/train/hist/{n}/{lay}" for n in ["gamma", "beta", "d", "v"]
                    for lay in ("net.bn0", "net.bn1")}  # fmt: skip
    events = acc.Scalars("bnprobe/train/mean_shift/net.bn1")
    assert [e.step for e in events] == [0, 2, 4, 6]
    want = df[(df["layer"] == "net.bn1") & (df["metric"] == "mean_shift")]["value"].to_numpy()
    assert [e.value for e in events] == pytest.approx(want, rel=1e-6)


def _fit(tmp_path, with_probe: bool, fail_at: int | None = None) -> tuple[Lit, BNProbe | None]:
    pl.seed_everything(123)
    lit = Lit(make_model("res2d"))
    if fail_at is not None:
        original = lit.training_step

        def failing(batch, batch_idx):
            if lit.global_step == fail_at:
                raise RuntimeError("boom")
            return original(batch, batch_idx)

        lit.training_step = failing  # type: ignore[method-assign]
    probe = BNProbe(every_n_steps=1, histograms=True, per_channel=True) if with_probe else None
    tr = trainer(
        tmp_path,
        callbacks=[probe] if probe else [],
        logger=TensorBoardLogger(tmp_path),
        max_epochs=3,
    )
    if fail_at is None:
        tr.fit(lit, loader(INPUT_SHAPES["res2d"]), loader(INPUT_SHAPES["res2d"], seed=1))
    else:
        with pytest.raises(RuntimeError, match="boom"):
            tr.fit(lit, loader(INPUT_SHAPES["res2d"]))
    return lit, probe


def test_training_is_bit_identical_with_the_probe(tmp_path) -> None:
    plain, _ = _fit(tmp_path / "a", with_probe=False)
    probed, probe = _fit(tmp_path / "b", with_probe=True)
    assert probe is not None and len(probe.to_dataframe()) > 0
    a, b = plain.state_dict(), probed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_fit_and_after_failing_fit(tmp_path) -> None:
    lit, probe = _fit(tmp_path / "ok", with_probe=True)
    assert _hook_count(lit) == 0
    lit, probe = _fit(tmp_path / "fail", with_probe=True, fail_at=3)
    assert _hook_count(lit) == 0
    assert probe is not None
    # rows measured before the crash were flushed and can be read back
    saved = load(tmp_path / "fail")
    assert sorted(saved["step"].unique()) == [0, 1, 2]


def test_store_is_saved_under_log_dir_and_loads_back(tmp_path) -> None:
    pl.seed_everything(0)
    probe = BNProbe(every_n_steps=1, per_channel=True)
    logger = TensorBoardLogger(tmp_path, name="run")
    tr = trainer(tmp_path, callbacks=[probe], logger=logger)
    tr.fit(Lit(make_model("mlp1d")), loader((6,)))
    saved = load(f"{logger.log_dir}/bnprobe_store")
    pd.testing.assert_frame_equal(saved, probe.to_dataframe())
    assert saved["channel"].notna().any()
    assert str(saved["channel"].dtype) == "Int64"


def test_default_every_n_steps_is_the_trainers(tmp_path) -> None:
    probe = BNProbe(save_dir=False)
    trainer(tmp_path, callbacks=[probe], log_every_n_steps=3).fit(
        Lit(make_model("mlp1d")), loader((6,))
    )
    assert sorted(probe.to_dataframe()["step"].unique()) == [0, 3, 6]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every_n_steps": 0}, r"every_n_steps.*positive int.*got 0"),
        ({"every_n_steps": 2.5}, r"every_n_steps.*got 2.5"),
        ({"histograms": "yes"}, r"histograms.*True or False.*got 'yes'"),
        ({"per_channel": 1}, r"per_channel.*True or False.*got 1"),
        ({"layers": 5}, r"layers.*name or glob pattern.*got 5"),
        ({"layers": ["bn", 3]}, r"layers.*got \['bn', 3\]"),
        ({"save_dir": True}, r"save_dir.*folder path.*got True"),
        ({"log_to": "wandb"}, r"log_to.*'tensorboard', 'all'; got 'wandb'"),
        ({"log_to": None}, r"log_to.*got None"),
        ({"scalars": ["mean_shift", "nope*"]}, r"scalars.*'nope\*'.*mean_shift"),
        ({"scalars": 5}, r"scalars.*metric names.*got 5"),
        ({"scalars": ["kl", 3]}, r"scalars.*got \['kl', 3\]"),
    ],
)
def test_bad_options_are_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        BNProbe(**options)


def test_layer_selection_that_matches_nothing_names_it(tmp_path) -> None:
    probe = BNProbe(layers=["net.bn1", "encoder.*"])
    with pytest.raises(
        ValueError, match=r"layers='encoder\.\*' matches no BatchNorm.*net.bn0, net.bn1"
    ):
        trainer(tmp_path, callbacks=[probe]).fit(Lit(make_model("res2d")), loader((3, 8, 8)))


def test_selected_layers_only(tmp_path) -> None:
    probe = BNProbe(layers="*.bn1", every_n_steps=1, save_dir=False)
    trainer(tmp_path, callbacks=[probe], max_epochs=1).fit(
        Lit(make_model("res2d")), loader((3, 8, 8))
    )
    assert set(probe.to_dataframe()["layer"]) == {"net.bn1"}


def test_model_without_batchnorm_warns_once_and_trains(tmp_path) -> None:
    probe = BNProbe()
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="has no BatchNorm layer") as record:
        trainer(tmp_path, callbacks=[probe]).fit(Lit(net), loader((6,)))
    assert sum("BatchNorm" in str(w.message) for w in record) == 1
    assert probe.to_dataframe().empty


def test_resume_keeps_measuring_drift_from_the_original_gamma0(tmp_path) -> None:
    def run(max_epochs: int, ckpt: str | None = None) -> tuple[BNProbe, pl.Trainer, Lit]:
        pl.seed_everything(7)
        lit = Lit(make_model("mlp1d"))
        probe = BNProbe(every_n_steps=1, save_dir=False)
        tr = trainer(tmp_path, callbacks=[probe], max_epochs=max_epochs, enable_checkpointing=True)
        tr.fit(lit, loader((6,)), ckpt_path=ckpt)
        return probe, tr, lit

    whole, _, _ = run(4)
    _, tr, _ = run(2)
    ckpt = str(tmp_path / "mid.ckpt")
    tr.save_checkpoint(ckpt)
    resumed, _, _ = run(4, ckpt)

    def drift(p: BNProbe) -> pd.Series:
        df = p.to_dataframe()
        return df[df["metric"] == "gamma_drift"].set_index("step")["value"]

    later = drift(resumed)
    assert later.index.min() == 8  # continues after the checkpoint's step, nothing repeated
    assert later.to_numpy() == pytest.approx(drift(whole).loc[later.index].to_numpy(), rel=1e-6)
    assert (later > 0).all()


def test_demo_net_shapes() -> None:
    from bnprobe.demo import DemoDataModule, DemoNet

    net = DemoNet()
    assert net(torch.randn(5, 3, 28, 28)).shape == (5, 10)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [64, 128]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128 * 7 * 7, 256), (256, 10)]
    data = DemoDataModule(num_train=32, num_val=16, batch_size=8)
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 3, 28, 28) and y.shape == (8,)
    again = DemoDataModule(num_train=32, num_val=16, batch_size=8)
    again.setup()
    assert torch.equal(data.train_set.images, again.train_set.images)  # deterministic


def test_diagnose_stays_the_function_after_the_submodule_is_imported() -> None:
    from pathlib import Path

    import bnprobe.diagnosis  # the package is named so that it cannot shadow the function
    from bnprobe.store import empty_frame

    assert callable(bnprobe.diagnose) and bnprobe.diagnose(empty_frame()) == []
    assert bnprobe.diagnose is bnprobe.diagnosis.diagnose
    assert not (Path(bnprobe.__file__).parent / "diagnose.py").exists()


def test_public_api_names() -> None:
    for name in bnprobe.__all__:
        assert getattr(bnprobe, name) is not None
    with pytest.raises(AttributeError):
        _ = bnprobe.nothing_here


def test_no_warnings_from_a_normal_run(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        probe = BNProbe(every_n_steps=1, save_dir=False)
        trainer(tmp_path, callbacks=[probe], max_epochs=1).fit(
            Lit(make_model("res2d")), loader((3, 8, 8))
        )
    assert not probe.tap.failures if probe.tap else True


# -- where the store goes ------------------------------------------------------------------------
def test_without_a_logger_the_store_cannot_shadow_the_package(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # Trainer's default_root_dir is the working folder
    for _ in range(2):
        probe = BNProbe(every_n_steps=1, summary=False)
        trainer(tmp_path, callbacks=[probe], default_root_dir=None, max_epochs=1).fit(
            Lit(make_model("mlp1d")), loader((6,))
        )
    assert probe.store_dir == tmp_path / "bnprobe_logs" / "version_1" / STORE_NAME
    assert probe.run_dir == tmp_path / "bnprobe_logs" / "version_1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bnprobe") and
                p.name != "bnprobe_logs"]  # fmt: skip
    found = subprocess.run(
        [sys.executable, "-c", "import bnprobe; print(bnprobe.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(found.stdout.strip()) == Path(bnprobe.__file__)  # not the data folder
    runs = load(tmp_path / "bnprobe_logs")
    assert sorted(runs["run"].unique()) == ["version_0", "version_1"]  # two runs, not merged
    pd.testing.assert_frame_equal(load(probe.run_dir), probe.to_dataframe())


def test_resume_without_a_logger_appends_to_the_same_store(tmp_path) -> None:
    def run(max_epochs: int, ckpt: str | None = None) -> tuple[BNProbe, pl.Trainer]:
        pl.seed_everything(7)
        probe = BNProbe(every_n_steps=1, summary=False)
        tr = trainer(tmp_path, callbacks=[probe], max_epochs=max_epochs)
        tr.fit(Lit(make_model("mlp1d")), loader((6,)), ckpt_path=ckpt)
        return probe, tr

    first, tr = run(2)
    ckpt = str(tmp_path / "mid.ckpt")
    tr.save_checkpoint(ckpt)
    resumed, _ = run(4, ckpt)
    assert (
        resumed.store_dir == first.store_dir == tmp_path / "bnprobe_logs" / "version_0" / STORE_NAME
    )
    assert [p.name for p in (tmp_path / "bnprobe_logs").iterdir()] == ["version_0"]
    parts = sorted(first.store_dir.glob("part-*.parquet"))
    raw = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert not raw.assign(channel=raw["channel"].fillna(-1)).duplicated(KEY).any()
    assert sorted(load(first.run_dir)["step"].unique()) == list(range(16))


# -- TensorBoard: the logger's prefix, where scalars go, which ones --------------------------
def _fit_logged(tmp_path, loggers: list[Any], **options: Any) -> BNProbe:
    pl.seed_everything(0)
    probe = BNProbe(every_n_steps=2, summary=False, **options)
    trainer(tmp_path, callbacks=[probe], logger=loggers, max_epochs=1).fit(
        Lit(make_model("res2d")), loader((3, 8, 8)), loader((3, 8, 8), seed=1)
    )
    return probe


def _events(log_dir: str) -> EventAccumulator:
    sizes = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    acc = EventAccumulator(log_dir, size_guidance=sizes)
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> Any:
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_a_logger_prefix_gives_one_tag_root_end_to_end(tmp_path) -> None:
    import re

    logger = TensorBoardLogger(tmp_path, name="run", prefix="exp")
    probe = _fit_logged(tmp_path, [logger])
    acc = _events(logger.log_dir)
    tags = acc.Tags()
    ours = [t for kind in ("scalars", "histograms", "images") for t in tags[kind] if "bnprobe" in t]
    assert ours and all(t.startswith("exp-bnprobe/") for t in ours), ours
    assert {t.split("/")[2] for t in tags["images"]} == {"figure"}
    assert "exp-bnprobe/train/hist/d/net.bn1" in tags["histograms"]
    layout = _layout(acc)
    assert [c.title for c in layout.category] == [
        f"exp-bnprobe/{s}" for s in ("train", "val", "probe")
    ]
    for category in layout.category:
        stage = category.title.split("/")[1]
        assert "rank_divergence" not in [c.title for c in category.chart]  # one process
        for chart in category.chart:
            (regex,) = chart.multiline.tag
            hits = {t for t in tags["scalars"] if re.match(regex, t)}
            prefix = f"exp-bnprobe/{stage}/{chart.title}/"
            assert hits == {t for t in tags["scalars"] if t.startswith(prefix)}
            assert hits or chart.title in ("nonfinite",), chart.title
    back = bnprobe.read_tensorboard(logger.log_dir)
    memory = probe.to_dataframe()
    memory = memory[memory["channel"].isna()]
    assert len(back) == len(memory)
    key = ["stage", "layer", "metric", "step"]
    got = back.sort_values(key)["value"].to_numpy()
    assert got == pytest.approx(memory.sort_values(key)["value"].to_numpy(), rel=1e-6, nan_ok=True)


def test_scalars_go_to_tensorboard_only_unless_asked_and_only_those_chosen(tmp_path) -> None:
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    probe = _fit_logged(tmp_path / "a", [tb_logger, csv_logger])
    metrics_csv = Path(csv_logger.log_dir) / "metrics.csv"
    columns = pd.read_csv(metrics_csv).columns if metrics_csv.exists() else []
    assert not [c for c in columns if c.startswith("bnprobe/")]
    assert any(t.startswith("bnprobe/") for t in _events(tb_logger.log_dir).Tags()["scalars"])
    assert "kl" in set(probe.to_dataframe()["metric"])

    tb_logger = TensorBoardLogger(tmp_path, name="tb2")
    csv_logger = CSVLogger(tmp_path, name="csv2")
    probe = _fit_logged(
        tmp_path / "b",
        [tb_logger, csv_logger],
        log_to="all",
        scalars=["mean_shift", "mean_shift_m*"],
    )
    layers = probe.layer_names
    chosen = {
        tb.scalar_tag(stage, metric, layer)
        for stage in ("train", "val") for metric in ("mean_shift", "mean_shift_max")
        for layer in layers
    } | {tb.epoch_tag(s) for s in ("train", "val")}  # fmt: skip
    columns = set(pd.read_csv(Path(csv_logger.log_dir) / "metrics.csv").columns)
    assert {c for c in columns if c.startswith("bnprobe/")} == chosen
    acc = _events(tb_logger.log_dir)
    assert {t for t in acc.Tags()["scalars"] if t.startswith("bnprobe/")} == chosen
    layout = _layout(acc)
    assert {c.title: [ch.title for ch in c.chart] for c in layout.category} == {
        "bnprobe/train": ["mean_shift", "mean_shift_max"],
        "bnprobe/val": ["mean_shift", "mean_shift_max"],
    }
    df = probe.to_dataframe()  # the table keeps every metric
    assert {"kl", "gamma_drift", "output_gap", "logits_gap"} <= set(df["metric"])
    pd.testing.assert_frame_equal(load(tb_logger.log_dir), df)


# -- the end-of-fit summary ----------------------------------------------------------------------
class _DeadServer(MetricsLogger):
    """A real logger whose log_metrics fails (a tracking server that went away)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise ConnectionError("the tracking server went away")


def test_summary_says_what_was_watched_and_what_was_switched_off(tmp_path, capsys) -> None:
    store = tmp_path / "my store"
    probe = BNProbe(every_n_steps=1, save_dir=store, log_to="all")
    with pytest.warns(UserWarning, match="logging to _DeadServer failed"):
        trainer(tmp_path, callbacks=[probe], logger=[_DeadServer()]).fit(
            Lit(make_model("mlp1d")), loader((6,))
        )
    out = capsys.readouterr().out
    assert "bnprobe watched 1 BatchNorm layer at 8 training steps (steps 0..7, every 1)." in out
    assert (
        "switched off after an error: logging to _DeadServer "
        "(ConnectionError: the tracking server went away)"
    ) in out
    assert "No BatchNorm problem of severity warning or error found in what was measured." in out
    assert f"bnprobe report '{store}'" in out  # the real path, quoted for the shell
    assert "no problem found" not in out.lower()


def test_summary_of_a_healthy_run_points_at_nothing_it_does_not_need(tmp_path, capsys) -> None:
    logger = TensorBoardLogger(tmp_path, name="run")
    probe = BNProbe(every_n_steps=1)
    trainer(tmp_path, callbacks=[probe], logger=logger).fit(Lit(make_model("mlp1d")), loader((6,)))
    out = capsys.readouterr().out
    assert "bnprobe watched 1 BatchNorm layer at 8 training steps" in out
    assert "No BatchNorm problem of severity warning or error found." in out
    assert "switched off" not in out
    assert probe.run_dir == Path(logger.log_dir)
