"""TensorBoard tags, layout, histograms, figures and read-back, with real event files.

Everything is written with a real ``SummaryWriter`` (through Lightning's ``TensorBoardLogger``
where the callback would use it), read back with TensorBoard's own ``EventAccumulator`` and
with ``read_tensorboard``, and served by a real TensorBoard process.
"""

from __future__ import annotations

import io
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

import bnprobe
from bnprobe import figures, store
from bnprobe import tensorboard as tb
from bnprobe.demo import DemoDataModule, DemoModule

LAYERS = ["stem.bn", "blocks.0.bn1", "_model_"]  # a module really named _model_ must survive


def _table() -> pd.DataFrame:
    """A table like the callback's: train, val and probe rows, plus rows never logged."""
    rng = np.random.default_rng(0)
    frames = []
    train_metrics = ["mean_shift", "var_shift", "kl"]
    for step, epoch in [(0, 0), (5, 0), (10, 1), (15, 1)]:
        layers = [la for la in LAYERS for _ in train_metrics]
        metrics = train_metrics * len(LAYERS)
        values = rng.random(len(metrics)) * 3
        if step == 5:
            values[0] = math.nan
            values[1] = math.inf
        frames.append(
            store.make_rows(
                step=step,
                epoch=epoch,
                stage="train",
                rank=0,
                layers=layers,
                metrics=metrics,
                values=values,
            )
        )
    # val ran at step 10 at the end of epoch 0, while train step 10 is epoch 1
    frames.append(
        store.make_rows(
            step=10,
            epoch=0,
            stage="val",
            rank=0,
            layers=LAYERS,
            metrics=["mean_shift"] * 3,
            values=rng.random(3),
        )
    )
    probe_layers = [*LAYERS, *LAYERS, store.MODEL, store.MODEL]
    probe_metrics = ["local_gap"] * 3 + ["output_gap"] * 3 + ["logits_gap", "pred_agreement"]
    for step, epoch in [(10, 0), (16, 1)]:
        frames.append(
            store.make_rows(
                step=step,
                epoch=epoch,
                stage="probe",
                rank=0,
                layers=probe_layers,
                metrics=probe_metrics,
                values=rng.random(8),
            )
        )
    # per-channel rows and another rank's rows: never scalars in TensorBoard
    frames.append(
        store.make_rows(
            step=0,
            epoch=0,
            stage="train",
            rank=0,
            layers=["stem.bn"] * 2,
            metrics=["mean_shift"] * 2,
            values=[1.0, 2.0],
            channels=[0, 1],
        )
    )
    frames.append(
        store.make_rows(
            step=0,
            epoch=0,
            stage="train",
            rank=1,
            layers=["stem.bn"],
            metrics=["mean_shift"],
            values=[9.0],
        )
    )
    return store.concat(frames)


def _expected(df: pd.DataFrame) -> pd.DataFrame:
    """The rows TensorBoard should give back: rank-0 aggregates at float32 precision."""
    agg = df[df["channel"].isna() & (df["rank"] == 0)].copy()
    agg["value"] = agg["value"].astype(np.float32).astype(np.float64)
    return _sorted(agg)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["step", "stage", "layer", "metric"]
    return store.conform(df.sort_values(keys, kind="stable"))


def _log(logger: TensorBoardLogger, df: pd.DataFrame) -> None:
    """What the callback does: one log_metrics call per step, keys from scalar_metrics."""
    for step, metrics in tb.scalar_metrics(df).items():
        logger.log_metrics(metrics, step=step)


def _accumulator(path: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(
        str(path), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0}
    )
    acc.Reload()
    return acc


def _histograms() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "gamma": 1 + 0.05 * torch.randn(64, generator=g),
        "beta": torch.zeros(64),  # all equal: a valid one-bucket histogram
        "d": torch.cat([torch.randn(62, generator=g), torch.tensor([math.nan, math.inf])]),
        "v": torch.full((8,), math.nan),  # nothing finite: skipped
    }


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A run folder written the way the callback writes it."""
    df = _table()
    logger = TensorBoardLogger(tmp_path, name="lightning_logs", version=0)
    writer = logger.experiment
    assert tb.write_layout(writer) is True
    _log(logger, df)
    tb.add_histograms(writer, "train", "stem.bn", 5, _histograms())
    tb.add_histograms(writer, "train", "_model_", 5, {"gamma": torch.ones(4)})
    tb.add_figures(writer, df, step=16)
    logger.finalize("success")
    return Path(logger.log_dir), df


# --------------------------------------------------------------------------- tags


@pytest.mark.parametrize(
    "layer",
    ["stem.bn", "blocks.0.bn1", "features.12", store.MODEL, "_model_", "_model__", "a/b", "x y"],
)
@pytest.mark.parametrize("stage", ["train", "val", "probe", "recalibrate"])
def test_tag_round_trip(stage: str, layer: str) -> None:
    tag = tb.scalar_tag(stage, "mean_shift", layer)
    assert tb.parse_tag(tag) == (stage, "mean_shift", layer)
    assert tb.parse_tag(tag).layer == layer
    assert tag.startswith(f"bnprobe/{stage}/mean_shift/")
    assert "<" not in tag and ">" not in tag


def test_tag_spelling() -> None:
    assert tb.scalar_tag("probe", "logits_gap", store.MODEL) == "bnprobe/probe/logits_gap/_model_"
    assert tb.scalar_tag("train", "kl", "_model_") == "bnprobe/train/kl/_model__"
    assert tb.scalar_tag("train", "kl", "layer1.0.bn1") == "bnprobe/train/kl/layer1.0.bn1"
    assert tb.hist_tag("train", "d", store.MODEL) == "bnprobe/train/hist/d/_model_"
    assert tb.epoch_tag("val") == "bnprobe/val/epoch"
    assert tb.figure_tag("probe", "gaps") == "bnprobe/probe/figure/gaps"


@pytest.mark.parametrize(
    "args, match",
    [
        (("tr/ain", "kl", "bn"), "stage"),
        (("", "kl", "bn"), "stage"),
        (("train", "k/l", "bn"), "metric"),
        (("train", "hist", "bn"), "reserved"),
        (("train", "epoch", "bn"), "reserved"),
        (("train", "kl", ""), "layer"),
    ],
)
def test_scalar_tag_rejects(args: tuple[str, str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tb.scalar_tag(*args)


@pytest.mark.parametrize(
    "tag",
    [
        "bnprobe/train/epoch",
        "bnprobe/train/hist/d/stem.bn",
        "bnprobe/train/figure/mean_shift",
        "train_loss",
        "other/train/kl/bn",
        "bnprobe/train//bn",
    ],
)
def test_parse_tag_rejects_other_tags(tag: str) -> None:
    with pytest.raises(ValueError, match="not a bnprobe scalar tag"):
        tb.parse_tag(tag)


def test_scalar_metrics_keys() -> None:
    df = _table()
    by_step = tb.scalar_metrics(df)
    assert sorted(by_step) == [0, 5, 10, 15, 16]
    at10 = by_step[10]
    assert at10["bnprobe/train/epoch"] == 1.0
    assert at10["bnprobe/val/epoch"] == 0.0
    assert at10["bnprobe/probe/epoch"] == 0.0
    assert "bnprobe/probe/logits_gap/_model_" in at10
    # per-channel and rank-1 rows are not logged: stem.bn mean_shift at step 0 is rank 0's
    row = df[(df.step == 0) & (df.layer == "stem.bn") & (df.metric == "mean_shift")]
    assert by_step[0]["bnprobe/train/mean_shift/stem.bn"] == row["value"].iloc[0]
    n_agg = int((df["channel"].isna() & (df["rank"] == 0)).sum())
    n_epoch = sum(1 for d in by_step.values() for k in d if k.endswith("/epoch"))
    assert sum(len(d) for d in by_step.values()) == n_agg + n_epoch


# --------------------------------------------------------------------------- event files


def test_event_file_tags_are_exact(run: tuple[Path, pd.DataFrame]) -> None:
    path, df = run
    acc = _accumulator(path)
    tags = acc.Tags()
    agg = df[df["channel"].isna() & (df["rank"] == 0)]
    expected_scalars = {
        tb.scalar_tag(s, m, la)
        for s, m, la in zip(agg["stage"], agg["metric"], agg["layer"], strict=True)
    } | {"bnprobe/train/epoch", "bnprobe/val/epoch", "bnprobe/probe/epoch"}
    assert set(tags["scalars"]) == expected_scalars  # written verbatim, nothing rewritten
    assert set(tags["histograms"]) == {
        "bnprobe/train/hist/gamma/stem.bn",
        "bnprobe/train/hist/beta/stem.bn",
        "bnprobe/train/hist/d/stem.bn",
        "bnprobe/train/hist/gamma/_model__",
    }
    assert set(tags["images"]) == {
        "bnprobe/train/figure/mean_shift",
        "bnprobe/val/figure/mean_shift",
        "bnprobe/probe/figure/gaps",
    }
    assert tags["tensors"] == ["custom_scalars__config__"]
    # values as TensorBoard stores them (float32)
    events = acc.Scalars("bnprobe/probe/logits_gap/_model_")
    want = df[(df.metric == "logits_gap")]
    assert [e.step for e in events] == want["step"].tolist()
    assert [e.value for e in events] == [float(np.float32(v)) for v in want["value"]]


def test_read_tensorboard_round_trip(run: tuple[Path, pd.DataFrame]) -> None:
    path, df = run
    back = tb.read_tensorboard(path)
    assert list(back.columns) == list(store.COLUMNS)
    assert back.dtypes.astype(str).to_dict() == {
        "step": "int64",
        "epoch": "int64",
        "stage": "object",
        "rank": "int64",
        "layer": "object",
        "channel": "Int64",
        "metric": "object",
        "value": "float64",
    }
    assert back["channel"].isna().all() and (back["rank"] == 0).all()
    pd.testing.assert_frame_equal(_sorted(back), _expected(df), check_exact=True)
    # rows come out by step, then stage (train, val, probe), then the order tags were logged
    assert back["step"].is_monotonic_increasing
    at10 = back[back.step == 10]["stage"].drop_duplicates().tolist()
    assert at10 == ["train", "val", "probe"]
    assert back[(back.step == 0)]["layer"].drop_duplicates().tolist() == LAYERS
    # the whole-model layer comes back as <model>, the module named _model_ as itself
    assert set(back[back.stage == "probe"]["layer"]) == {*LAYERS, store.MODEL}
    # the parent folder holds one run: same table, no run column
    pd.testing.assert_frame_equal(tb.read_tensorboard(path.parent), back)
    # a single event file can be read too
    (event_file,) = path.glob("events.out.tfevents.*")
    pd.testing.assert_frame_equal(tb.read_tensorboard(event_file), back)


def test_read_tensorboard_several_runs(tmp_path: Path) -> None:
    df = _table()
    first = df[df["step"] <= 5]
    second = df[df["step"] > 5]
    for sub, part in [("exp/a", first), ("exp/b/nested", second)]:
        writer = SummaryWriter(str(tmp_path / sub))
        for step, metrics in tb.scalar_metrics(part).items():
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
        writer.close()
    SummaryWriter(str(tmp_path / "exp" / "no_bnprobe")).close()  # a run without our tags
    back = tb.read_tensorboard(tmp_path / "exp")
    assert list(back.columns) == [*store.COLUMNS, "run"]
    assert sorted(back["run"].unique()) == ["a", "b/nested"]
    for run_name, part in [("a", first), ("b/nested", second)]:
        mine = back[back["run"] == run_name].drop(columns="run")
        pd.testing.assert_frame_equal(_sorted(mine), _expected(part), check_exact=True)


def test_read_tensorboard_last_value_wins_and_missing_epoch(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("bnprobe/train/kl/bn", 1.0, 3)
    writer.add_scalar("bnprobe/train/kl/bn", 2.0, 3)
    writer.add_scalar("bnprobe/train/kl/bn", 4.0, 4, new_style=True)
    writer.add_scalar("train_loss", 0.5, 3)
    writer.close()
    back = tb.read_tensorboard(tmp_path)
    assert back[["step", "epoch", "value"]].values.tolist() == [[3, -1, 2.0], [4, -1, 4.0]]


def test_read_tensorboard_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        tb.read_tensorboard(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no TensorBoard event files at .*empty"):
        tb.read_tensorboard(empty)
    foreign = tmp_path / "foreign"
    writer = SummaryWriter(str(foreign))
    writer.add_scalar("train_loss", 0.5, 0)
    writer.add_histogram("bnprobe/train/hist/d/bn", np.arange(4.0), 0)
    writer.close()
    with pytest.raises(FileNotFoundError, match=r"no bnprobe scalars at .*foreign"):
        tb.read_tensorboard(foreign)


# --------------------------------------------------------------------------- layout


def test_layout_charts_match_every_layer(run: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    path, _ = run
    acc = _accumulator(path)
    (event,) = acc.Tensors("custom_scalars__config__")  # written once
    proto = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    assert [c.title for c in proto.category] == ["bnprobe/train", "bnprobe/val", "bnprobe/probe"]
    scalar_tags = acc.Tags()["scalars"]
    for category in proto.category:
        stage = category.title.split("/")[1]
        assert [c.title for c in category.chart] == list(tb.default_charts()[stage])
        for chart in category.chart:
            (regex,) = chart.multiline.tag
            hits = {t for t in scalar_tags if re.match(regex, t)}
            want = {t for t in scalar_tags if t.startswith(f"bnprobe/{stage}/{chart.title}/")}
            assert hits == want
    kl = next(c for c in proto.category[0].chart if c.title == "kl")
    assert {t for t in scalar_tags if re.match(kl.multiline.tag[0], t)} == {
        "bnprobe/train/kl/stem.bn",
        "bnprobe/train/kl/blocks.0.bn1",
        "bnprobe/train/kl/_model__",
    }


def test_layout_has_no_chart_that_can_never_have_data() -> None:
    """rank_divergence is measured only across processes: outside DDP its chart stays empty."""
    single = tb.layout()
    assert "rank_divergence" not in single["bnprobe/train"]
    assert "mean_shift" in single["bnprobe/train"]
    assert "rank_divergence" in tb.layout(world_size=2)["bnprobe/train"]
    for stage, charts in tb.default_charts().items():
        assert "rank_divergence" not in charts
        assert tb.default_charts(world_size=2)[stage] == tb.METRICS_BY_STAGE[stage]


def test_write_layout_once_per_writer(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    try:
        assert tb.write_layout(writer, stages=("train",)) is True
        assert tb.write_layout(writer, stages=("train",)) is False
    finally:
        writer.close()
    assert len(_accumulator(tmp_path).Tensors("custom_scalars__config__")) == 1


def test_layout_rejects_unknown_stage() -> None:
    with pytest.raises(ValueError, match="no metrics for stage 'test'"):
        tb.layout(stages=("train", "test"))
    with pytest.raises(ValueError, match="sequence of stage names"):
        tb.layout(stages="train")
    custom = tb.layout(stages=("val",), metrics_by_stage={"val": ["mean_shift"]})
    assert custom == {"bnprobe/val": {"mean_shift": ["Multiline", ["^bnprobe/val/mean_shift/"]]}}


def test_a_logger_prefix_gives_one_tag_root_that_reads_back() -> None:
    root = tb.tag_root("exp")
    assert root == "exp-bnprobe"
    assert tb.hist_tag("train", "d", "net.bn", root) == "exp-bnprobe/train/hist/d/net.bn"
    assert tb.figure_tag("probe", "gaps", root) == "exp-bnprobe/probe/figure/gaps"
    spec = tb.layout(stages=("train",), metrics_by_stage={"train": ["kl"]}, root=root)
    ((regex,),) = [chart[1] for chart in spec["exp-bnprobe/train"].values()]
    assert re.match(regex, "exp-" + tb.scalar_tag("train", "kl", "net.bn"))
    assert not re.match(regex, tb.scalar_tag("train", "kl", "net.bn"))
    for prefix in ("exp-", "a/b-", "team_"):
        tag = prefix + tb.scalar_tag("val", "mean_shift", store.MODEL)
        assert tb.parse_tag(tag) == ("val", "mean_shift", store.MODEL)
    for other in ("mybnprobe/train/kl/bn", "exp-bnprobe/train/hist/d/bn", "bnprobe/train/epoch"):
        with pytest.raises(ValueError, match="not a bnprobe scalar tag"):
            tb.parse_tag(other)


# --------------------------------------------------------------------------- histograms


def test_histograms_are_compact_and_exact(run: tuple[Path, pd.DataFrame]) -> None:
    path, _ = run
    acc = _accumulator(path)
    for name, values in _histograms().items():
        tag = f"bnprobe/train/hist/{name}/stem.bn"
        finite = values[torch.isfinite(values)].double()
        if finite.numel() == 0:
            assert tag not in acc.Tags()["histograms"]
            continue
        (event,) = acc.Histograms(tag)
        h = event.histogram_value
        assert event.step == 5
        assert h.num == finite.numel()
        assert sum(h.bucket) == finite.numel()
        assert h.min == pytest.approx(finite.min().item())
        assert h.max == pytest.approx(finite.max().item())
        assert h.sum == pytest.approx(finite.sum().item(), abs=1e-9)
        assert len(h.bucket) <= tb.HIST_BINS + 1


def test_histogram_bytes(tmp_path: Path) -> None:
    """30 bins keep a 64-channel histogram under 1 KB (torch's default binning: about 9 KB)."""
    n = 40
    for sub, bins in [("compact", None), ("default", "tensorflow")]:
        writer = SummaryWriter(str(tmp_path / sub))
        writer.flush()  # the file holds its header event now
        (event_file,) = (tmp_path / sub).glob("events.out.tfevents.*")
        start = event_file.stat().st_size
        g = torch.Generator().manual_seed(0)
        for step in range(n):
            d = torch.randn(64, generator=g)
            if bins is None:
                tb.add_histograms(writer, "train", "layer1.0.bn1", step, {"d": d})
            else:
                writer.add_histogram("bnprobe/train/hist/d/layer1.0.bn1", d, step, bins=bins)
        writer.close()
        per = (event_file.stat().st_size - start) / n
        if bins is None:
            assert per < 1000
        else:
            assert per > 5000


# --------------------------------------------------------------------------- figures


def test_shift_heatmap_shows_the_table() -> None:
    df = _table()
    fig = figures.shift_heatmap(df, "train", "var_shift")
    (ax, _cbar) = fig.axes
    grid = np.ma.getdata(ax.images[0].get_array())
    mask = np.ma.getmaskarray(ax.images[0].get_array())
    rows = df[(df.stage == "train") & (df.metric == "var_shift") & df.channel.isna()]
    rows = rows[rows["rank"] == 0]
    want = rows.pivot(index="layer", columns="step", values="value").reindex(LAYERS)
    assert grid.shape == (3, 4)
    np.testing.assert_array_equal(mask, ~np.isfinite(want.to_numpy()))
    np.testing.assert_array_equal(grid[~mask], want.to_numpy()[~mask])
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "5", "10", "15"]
    # the inf of stem.bn at step 5 is masked (grey), not drawn as a colour
    assert mask[0, 1] and mask.sum() == 1


def test_gap_bars_show_the_latest_probe() -> None:
    df = _table()
    fig = figures.gap_bars(df)
    ax = fig.axes[0]
    latest = df[(df.stage == "probe") & (df.step == 16)]
    for container, metric in zip(ax.containers, figures.GAP_METRICS, strict=True):
        widths = [patch.get_width() for patch in container]
        want = latest[latest.metric == metric].set_index("layer").loc[LAYERS, "value"]
        assert widths == pytest.approx(want.tolist())
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    title = ax.get_title()
    assert "step 16" in title and "logits_gap" in title and "pred_agreement" in title


def test_gap_bars_write_nan_and_inf_instead_of_drawing_them() -> None:
    import warnings

    df = _table()
    probe = (df.stage == "probe") & (df.step == 16)
    df.loc[probe & (df.metric == "local_gap") & (df.layer == LAYERS[0]), "value"] = np.nan
    df.loc[probe & (df.metric == "output_gap") & (df.layer == LAYERS[1]), "value"] = np.inf
    df.loc[probe & (df.metric == "logits_gap"), "value"] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's overflow warnings included
        fig = figures.gap_bars(df)
        tb.render(fig)
    ax = fig.axes[0]
    texts = [t.get_text().strip() for t in ax.texts]
    assert sorted(texts) == ["inf", "nan"]
    widths = [p.get_width() for c in ax.containers for p in c]
    assert all(np.isfinite(widths)) and ax.get_xlim()[1] < 1e6
    assert "logits_gap inf" in ax.get_title()


def test_gap_figure_gets_the_whole_model_rows_the_callback_selects(
    fitted: tuple[Path, bnprobe.BNProbe],
) -> None:
    """The callback draws from ``store.select(FIGURE_METRICS)``: it must hold the whole-model
    rows, or the chart loses its logits_gap / pred_agreement line."""
    _, probe = fitted
    fig = figures.gap_bars(probe.store.select(tb.FIGURE_METRICS))
    title = fig.axes[0].get_title()
    assert "logits_gap" in title and "pred_agreement" in title


def _cell_colour(fig: Any, i: int, j: int) -> tuple[float, ...]:
    image = fig.axes[0].images[0]
    return tuple(image.cmap(image.norm(image.get_array()[i, j])))


def test_heatmap_colours_are_fixed_by_the_threshold_not_by_the_run() -> None:
    """A healthy 0.016 is pale green in every run, even where another layer reaches 1.5;
    a value past the threshold is red; the colour bar marks the threshold."""
    df = _table()
    sel = (df.stage == "train") & (df.metric == "mean_shift") & df.channel.isna()
    quiet = df.copy()
    quiet.loc[sel, "value"] = 0.016
    loud = quiet.copy()
    loud.loc[sel & (loud.layer == LAYERS[2]), "value"] = 1.5
    a = figures.shift_heatmap(quiet, "train", "mean_shift")
    b = figures.shift_heatmap(loud, "train", "mean_shift")
    assert _cell_colour(a, 0, 0) == _cell_colour(b, 0, 0)
    r, g, _, _ = _cell_colour(a, 0, 0)
    assert g > r  # green: healthy
    r, g, _, _ = _cell_colour(b, 2, 0)
    assert r > 0.5 > g  # red: past train_mean_shift_max = 1.0
    bar = b.axes[1]
    assert bnprobe.diagnosis.DEFAULT_THRESHOLDS.train_mean_shift_max in bar.get_yticks()
    lim = figures.limit("train", "mean_shift")
    assert lim is not None and lim.value == 1.0 and lim.above
    shares = np.array([0.1, 0.49, 0.51, 0.99, 1.01, 5.0, np.nan])
    rgb = figures.scale_colours(shares)
    assert (rgb[:2, 1] > rgb[:2, 0]).all()  # healthy: green
    assert (rgb[2:4, 0] > 240).all() and (rgb[2:4, 1] > 100).all()  # borderline: amber
    assert (rgb[2:4, 2] < rgb[2:4, 1]).all()
    assert (rgb[4:6, 0] > 2 * rgb[4:6, 1]).all()  # past: red
    assert tuple(rgb[6]) == (217.0, 217.0, 217.0)  # missing: grey


def test_heatmap_draws_a_bounded_number_of_steps() -> None:
    """A long run draws at most FIGURE_STEPS columns, first and last step kept."""
    steps = np.arange(0, 5000, 2)
    rows = pd.DataFrame(
        {
            "step": np.repeat(steps, 2),
            "epoch": 0,
            "stage": "train",
            "rank": 0,
            "layer": np.tile(["a.bn", "b.bn"], len(steps)),
            "channel": pd.array([pd.NA] * (2 * len(steps)), dtype="Int64"),
            "metric": "mean_shift",
            "value": 0.1,
        }
    )
    fig = figures.shift_heatmap(rows)
    assert fig.axes[0].images[0].get_array().shape == (2, figures.FIGURE_STEPS)
    drawn = figures.downsample_steps(steps, 10)
    assert len(drawn) == 10 and drawn[0] == 0 and drawn[-1] == 4998


def test_figure_rows_cost_the_same_at_epoch_1_and_epoch_100() -> None:
    """FigureRows keeps at most max_steps steps per stage and the latest probe, however many
    epochs were added, and takes in only rows after each stage's last step."""
    kept = figures.FigureRows(max_steps=20)
    sizes = []
    for epoch in range(100):
        steps = np.arange(epoch * 50, (epoch + 1) * 50)
        train = _long_rows(steps, "train", epoch)
        probe = _long_rows(np.array([(epoch + 1) * 50]), "probe", epoch, "local_gap")
        table = pd.concat([train, probe], ignore_index=True)
        assert len(kept.new(table)) == len(table)  # nothing of it seen yet
        drawn = kept.add(table)
        assert kept.new(table).empty
        sizes.append(len(drawn))
        assert drawn.loc[drawn.stage == "train", "step"].nunique() <= 20
        assert set(drawn.loc[drawn.stage == "probe", "step"]) == {(epoch + 1) * 50}
    assert max(sizes[1:]) <= 20 * 3 + 3 and sizes[-1] == sizes[10]
    train = drawn[drawn.stage == "train"]
    assert train["step"].min() == 0 and train["step"].max() == 4999


def _long_rows(
    steps: np.ndarray, stage: str, epoch: int, metric: str = "mean_shift"
) -> pd.DataFrame:
    layers = ["a.bn", "b.bn", "c.bn"]
    n = len(steps) * len(layers)
    return pd.DataFrame(
        {
            "step": np.repeat(steps, len(layers)),
            "epoch": epoch,
            "stage": stage,
            "rank": 0,
            "layer": np.tile(layers, len(steps)),
            "channel": pd.array([pd.NA] * n, dtype="Int64"),
            "metric": metric,
            "value": 0.1,
        }
    )


def test_gap_bars_draw_the_threshold() -> None:
    fig = figures.gap_bars(_table())
    ax = fig.axes[0]
    (line,) = ax.lines
    assert line.get_xdata()[0] == bnprobe.diagnosis.DEFAULT_THRESHOLDS.local_gap_max == 0.6
    assert ax.get_xlim()[1] >= 0.6
    assert "threshold 0.6" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_figures_reject_missing_data() -> None:
    df = _table()
    with pytest.raises(ValueError, match="no layer aggregates of stage 'val', metric 'kl'"):
        figures.shift_heatmap(df, "val", "kl")
    with pytest.raises(ValueError, match="no probe rows"):
        figures.gap_bars(df[df.stage != "probe"])
    two = pd.concat([df.assign(run="a"), df.assign(run="b")], ignore_index=True)
    with pytest.raises(ValueError, match="2 runs"):
        figures.shift_heatmap(two)


def test_add_figures_logs_images(run: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    import matplotlib.image

    path, _ = run
    acc = _accumulator(path)
    for tag in acc.Tags()["images"]:
        (event,) = acc.Images(tag)
        assert event.step == 16
        pixels = matplotlib.image.imread(io.BytesIO(event.encoded_image_string), format="png")
        assert pixels.shape[:2] == (event.height, event.width)
        assert event.width == figures.FIGURE_WIDTH_PX == 640 and event.height >= 300
        assert pixels.std() > 0.05  # something is drawn
    # only the figures with data; nothing at all for an empty table
    writer = SummaryWriter(str(tmp_path / "partial"))
    try:
        only_probe = _table().query("stage == 'probe'")
        assert tb.add_figures(writer, only_probe, 1) == ["bnprobe/probe/figure/gaps"]
        assert tb.add_figures(writer, store.empty_frame(), 2) == []
    finally:
        writer.close()


# --------------------------------------------------------------------------- a real fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bnprobe.BNProbe]:
    """The demo net fitted for 2 epochs of 4 steps with BNProbe and a TensorBoardLogger."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    probe = bnprobe.BNProbe(every_n_steps=1)
    logger = TensorBoardLogger(root, name="demo", version=0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=root,
        logger=logger,
        callbacks=[probe],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DemoModule(), DemoDataModule(num_train=128, num_val=64, batch_size=32))
    return Path(logger.log_dir), probe


def _aggregates(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["channel"].isna() & (df["rank"] == 0)]


def _fit_histogram_tags(layers: list[str]) -> set[str]:
    """Train: gamma, beta, d, v per layer; val (no affine metrics there): d and v."""
    train = {tb.hist_tag("train", name, layer) for name in tb.HIST_NAMES for layer in layers}
    return train | {tb.hist_tag("val", name, layer) for name in ("d", "v") for layer in layers}


def test_fit_round_trip_memory_tensorboard_parquet(
    fitted: tuple[Path, bnprobe.BNProbe],
) -> None:
    """to_dataframe() == read_tensorboard() == load() for every aggregate row, in event files
    checksummed by TensorBoard's own code, which the probe leaves alone."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    assert record_writer.masked_crc32c is pywrap_tensorflow.masked_crc32c
    log_dir, probe = fitted
    memory = _aggregates(probe.to_dataframe())
    assert set(memory["stage"]) == {"train", "val", "probe"}
    assert sorted(memory.loc[memory.stage == "train", "step"].unique()) == list(range(8))
    assert memory.loc[
        memory.stage == "val", ["step", "epoch"]
    ].drop_duplicates().values.tolist() == [
        [4, 0],
        [8, 1],
    ]
    from_tb = bnprobe.read_tensorboard(log_dir)
    from_parquet = _aggregates(bnprobe.load(log_dir))
    assert len(from_tb) == len(memory) == len(from_parquet)
    pd.testing.assert_frame_equal(_sorted(from_tb), _expected(memory), check_exact=True)
    pd.testing.assert_frame_equal(_sorted(from_parquet), _sorted(memory), check_exact=True)
    # the folder above the run reads the same (one run: no run column)
    pd.testing.assert_frame_equal(bnprobe.read_tensorboard(log_dir.parent), from_tb)


def test_fit_event_files_hold_layout_histograms_and_figures(
    fitted: tuple[Path, bnprobe.BNProbe],
) -> None:
    log_dir, probe = fitted
    acc = _accumulator(log_dir)
    tags = acc.Tags()
    memory = _aggregates(probe.to_dataframe())
    layers = probe.layer_names
    assert layers == ["net.features.1", "net.features.5"]
    want = {
        tb.scalar_tag(s, m, la)
        for s, m, la in zip(memory["stage"], memory["metric"], memory["layer"], strict=True)
    } | {tb.epoch_tag(s) for s in ("train", "val", "probe")}
    assert {t for t in tags["scalars"] if t.startswith("bnprobe/")} == want
    assert "bnprobe/probe/logits_gap/_model_" in want
    assert set(tags["histograms"]) == _fit_histogram_tags(layers)
    for event in acc.Histograms(tb.hist_tag("train", "d", layers[1])):
        assert event.histogram_value.num == 128  # one value per channel
        assert len(event.histogram_value.bucket) <= tb.HIST_BINS + 1
    assert set(tags["images"]) == {
        "bnprobe/train/figure/mean_shift",
        "bnprobe/val/figure/mean_shift",
        "bnprobe/probe/figure/gaps",
    }
    for tag in tags["images"]:  # at the end of each epoch, after validation and the probe
        assert [e.step for e in acc.Images(tag)] == [4, 8]
    (layout,) = acc.Tensors("custom_scalars__config__")
    proto = layout_pb2.Layout.FromString(layout.tensor_proto.string_val[0])
    assert [c.title for c in proto.category] == ["bnprobe/train", "bnprobe/val", "bnprobe/probe"]


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(port: int, route: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{route}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_server_serves_the_run(
    fitted: tuple[Path, bnprobe.BNProbe], tmp_path: Path
) -> None:
    """A real TensorBoard process serves the scalars, histograms, images and layout."""
    log_dir, probe = fitted
    layers = probe.layer_names
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir.parent)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--load_fast=false"]
    log = tmp_path / "tensorboard.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        scalars: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"tensorboard exited with {proc.returncode}: {tail}")
            try:
                scalars = _get(port, "/data/plugin/scalars/tags")
            except OSError:
                scalars = {}
            if scalars.get("version_0"):
                break
            time.sleep(0.5)
        assert "version_0" in scalars, f"TensorBoard did not serve the run within 90 s: {log}"
        memory = _aggregates(probe.to_dataframe())
        want = {
            tb.scalar_tag(s, m, la)
            for s, m, la in zip(memory["stage"], memory["metric"], memory["layer"], strict=True)
        }
        served = {t for t in scalars["version_0"] if t.startswith("bnprobe/")}
        assert served == want | {tb.epoch_tag(s) for s in ("train", "val", "probe")}
        points = _get(
            port,
            "/data/plugin/scalars/scalars",
            run="version_0",
            tag="bnprobe/probe/logits_gap/_model_",
        )
        gap = memory[memory.metric == "logits_gap"]
        assert [p[1] for p in points] == gap["step"].tolist()
        assert [p[2] for p in points] == [float(np.float32(v)) for v in gap["value"]]

        hists = _get(port, "/data/plugin/histograms/tags")["version_0"]
        assert set(hists) == _fit_histogram_tags(layers)
        series = _get(
            port,
            "/data/plugin/histograms/histograms",
            run="version_0",
            tag=tb.hist_tag("train", "gamma", layers[0]),
        )
        assert [point[1] for point in series] == list(range(8))

        images = _get(port, "/data/plugin/images/tags")["version_0"]
        assert set(images) == {
            "bnprobe/train/figure/mean_shift",
            "bnprobe/val/figure/mean_shift",
            "bnprobe/probe/figure/gaps",
        }

        layout = _get(port, "/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles == ["bnprobe/train", "bnprobe/val", "bnprobe/probe"]
        train = layout["category"][0]["chart"]
        # rank_divergence only has a chart in multi-process runs
        single = [m for m in tb.METRICS_BY_STAGE["train"] if m != "rank_divergence"]
        assert [c["title"] for c in train] == single
        regex = train[0]["multiline"]["tag"][0]
        assert regex == "^bnprobe/train/mean_shift/"
        # the chart's regex makes the server send the series of every layer
        chart = _get(port, "/data/plugin/custom_scalars/scalars", run="version_0", tag=regex)
        assert chart["regex_valid"] is True
        assert set(chart["tag_to_events"]) == {
            tb.scalar_tag("train", "mean_shift", layer) for layer in layers
        }
        steps = [
            p[1] for p in chart["tag_to_events"][tb.scalar_tag("train", "mean_shift", layers[0])]
        ]
        assert steps == list(range(8))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_blocks_of_one_step_merge_into_one_event_the_later_value_winning() -> None:
    """Rank 0's rows, another rank's (not written) and the rank_divergence block of one step
    make one point per tag; a tag given twice keeps its later value; the cached merge gives
    the same at the next step with other values."""
    from bnprobe.store import Rows
    from bnprobe.tap import Snapshot
    from bnprobe.tensorboard.write import snapshot_metrics

    for step, scale in ((3, 1.0), (4, 2.0)):
        own = Rows(
            step, 1, "train", 0, ["a", "b"], ["mean_shift", "mean_shift"], [scale, 2 * scale]
        )
        other = Rows(step, 1, "train", 1, ["a", "b"], ["mean_shift", "mean_shift"], [9.0, 9.0])
        again = Rows(
            step, 1, "train", 0, ["b", "a"], ["mean_shift", "rank_divergence"], [5 * scale, 7.0]
        )
        got = snapshot_metrics(Snapshot([own, other, again]))
        assert list(got) == [step]
        assert got[step] == {
            "bnprobe/train/epoch": 1.0,
            "bnprobe/train/mean_shift/a": scale,
            "bnprobe/train/mean_shift/b": 5 * scale,
            "bnprobe/train/rank_divergence/a": 7.0,
        }
        assert list(got[step])[:3] == [
            "bnprobe/train/epoch",
            "bnprobe/train/mean_shift/a",
            "bnprobe/train/mean_shift/b",
        ]
