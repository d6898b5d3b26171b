"""The metric catalogue (bnprobe.metrics) is the one list: every other list of metric names, the
callback's "Logged keys" docstring and a real run's keys agree with it; the d/v/KL formulas are
written once and give bit for bit what the code computed before."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnprobe import BNProbe, callback, distributed, metrics, stats, store, tap
from bnprobe import tensorboard as tb
from bnprobe.diagnosis import report, variance
from bnprobe.diagnosis.batches import BATCH_METRICS
from bnprobe.mismatch import check_mismatch, recalibrate
from tests.reference import Lit, loader, make_model, trainer

# The store's name tuples as they were before the catalogue (their values are an interface).
OLD_STORE = {
    "MOMENT_METRICS": ("batch_mean", "batch_var"),
    "SHIFT_METRICS": (
        "running_mean", "running_var", "mean_shift", "var_shift", "kl", "mean_shift_max",
        "var_shift_max", "kl_max", "outlier_frac", "mean_shift_excess", "var_shift_excess",
        "mean_shift_excess_max", "var_shift_excess_max", "running_invalid",
    ),
    "WARMUP_METRICS": ("num_batches_tracked", "warmup_residual"),
    "COUNT_METRICS": ("nonfinite", "var_small_frac"),
    "AFFINE_METRICS": (
        "gamma_mean", "gamma_std", "beta_mean", "beta_std", "gamma_drift", "beta_drift",
        "gamma_small_frac",
    ),
    "STRUCTURE_METRICS": (
        "forward_calls", "train_mode", "model_train_mode", "momentum", "has_running_stats",
        "samples_per_channel", "batch_size", "eps",
    ),
    "TRACE_METRICS": ("input_bias", "input_dropout"),
    "PROBE_METRICS": (
        "output_gap", "local_gap", "num_batches_tracked", "warmup_residual", "running_invalid",
        "logits_gap", "pred_agreement", "recal_pred_change", "recal_logits_shift",
    ),
    "RECALIBRATE_METRICS": (
        "samples",
        *(f"{m}_{when}" for when in ("before", "after") for m in (
            "mean_shift", "mean_shift_max", "var_shift", "var_shift_max"
        )),
    ),
}  # fmt: skip


# -- every list derives from the catalogue ---------------------------------------------------
def test_store_name_tuples_keep_their_values() -> None:
    for name, old in OLD_STORE.items():
        assert getattr(store, name) == old, name
    assert store.STAGES == ("train", "val", "probe", "recalibrate")
    assert store.MODEL == "<model>"


def test_the_rows_a_tap_writes_follow_the_catalogue_order() -> None:
    """Layers with and without running statistics, affine parameters and a step counter: the
    metric names of each layer's train rows are ``layer_row_order`` of what the layer has."""
    kinds = {
        "full": nn.BatchNorm1d(3),
        "no_affine": nn.BatchNorm1d(3, affine=False),
        "no_running": nn.BatchNorm1d(3, track_running_stats=False),
        "bare": nn.BatchNorm1d(3, affine=False, track_running_stats=False),
    }
    model = nn.Sequential(*kinds.values())
    names = dict(zip(kinds, (str(i) for i in range(len(kinds))), strict=True))
    with tap.BNTap(model) as t:
        t.start()
        model(torch.randn(8, 3))
        rows = t.collect(step=1).rows
    layer_rows = rows[rows["channel"].isna()]
    for kind, layer in names.items():
        m = kinds[kind]
        running = m.running_mean is not None
        got = [x for x in layer_rows.loc[layer_rows["layer"] == layer, "metric"]]
        want = metrics.layer_row_order(running, m.affine, tracked=running)
        assert [x for x in got if x in want] == list(want), kind
        assert set(want) - set(got) == set(), kind
    assert metrics.layer_row_order(True, True, True) == tap.rows._ALL_METRICS
    c = np.array([3, 2])
    ones = np.ones(5)
    seg = stats.Segments(c, ones, ones, 0 * ones, ones, ones * 1e-5, ones, 0 * ones, ones, ones)
    table, _ = stats.segment_metrics(seg)
    assert set(table) == set(metrics.layer_row_order(True, True, True))


def test_chart_order_is_the_tensorboard_layout() -> None:
    assert metrics.charts_by_stage() == tb.METRICS_BY_STAGE
    for stage in metrics.STAGES:
        assert metrics.chart_order(stage) == tb.METRICS_BY_STAGE[stage]


def test_scalar_names_are_the_callbacks() -> None:
    assert metrics.scalar_names() == callback.scalar_metric_names()


def test_names_the_diagnosis_reads_are_in_the_catalogue() -> None:
    everything = set(metrics.names())
    for stage, chosen in report.SUMMARY_METRICS.items():
        assert set(chosen) <= set(metrics.names(stage)), stage  # type: ignore[arg-type]
    assert set(report.SUMMARY_MODEL_METRICS) <= set(metrics.logged("probe", model=True))
    assert set(variance.NONFINITE_METRICS) | set(variance.RUNNING_METRICS) <= everything
    assert set(BATCH_METRICS) <= set(metrics.names("train"))


def test_catalogue_is_consistent() -> None:
    for m in metrics.CATALOGUE:
        assert m.meaning and len(m.meaning) <= 90, m.name
        assert set(m.stages) <= set(metrics.STAGES), m.name
        if m.group in ("shift", "warmup") or m.stages in (("probe",), ("recalibrate",)):
            assert metrics.RUNNING in m.needs or m.group == "model" or m.name == "frozen", m.name
        if m.group == "affine" or m.name in ("gamma", "beta"):
            assert metrics.AFFINE in m.needs, m.name
        assert (m.group == "trace") == (metrics.FIRST_STEP in m.needs), m.name
        assert (m.name == "rank_divergence") == (metrics.DDP in m.needs), m.name
        assert (m.group == "model") == (metrics.MODEL in m.needs), m.name
    assert metrics.lookup("warmup_residual", "probe").group == "warmup"
    with pytest.raises(KeyError, match="no metric 'gamma' in stage 'val'"):
        metrics.lookup("gamma", "val")
    assert metrics.MODEL_LAYER == store.MODEL


def test_metrics_module_is_a_leaf() -> None:
    source = inspect.getsource(metrics)
    assert not re.search(r"^\s*(from|import) (bnprobe|torch|numpy|pandas)", source, re.M)


# -- one d/v/KL implementation -----------------------------------------------------------------
def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 257
    out = {
        "mean": rng.normal(size=n) * 3,
        "var": rng.gamma(0.5, 2.0, size=n),
        "mu_r": rng.normal(size=n),
        "var_r": rng.gamma(0.5, 2.0, size=n),
        "eps": np.full(n, 1e-5),
    }
    out["var"][:5] = 0.0  # dead channels
    out["var_r"][5:8] = 0.0
    return out


def test_numpy_formulas_are_the_ones_written_out_before_bit_for_bit() -> None:
    x = _inputs()
    d = stats.mean_shift(x["mean"], x["mu_r"], x["var_r"], x["eps"])
    v = stats.var_shift(x["var"], x["var_r"], x["eps"])
    kl = stats.kl_divergence(d, v)
    assert isinstance(d, np.ndarray)
    assert np.array_equal(d, (x["mean"] - x["mu_r"]) / np.sqrt(x["var_r"] + x["eps"]))
    assert np.array_equal(v, np.log((x["var"] + x["eps"]) / (x["var_r"] + x["eps"])))
    assert np.array_equal(kl, 0.5 * (np.exp(v) + d * d - 1.0 - v))
    # the closed form of the KL of two normals, independently
    s2b, s2r = x["var"] + x["eps"], x["var_r"] + x["eps"]
    ref = 0.5 * (s2b / s2r + (x["mean"] - x["mu_r"]) ** 2 / s2r - 1.0 - np.log(s2b / s2r))
    assert kl == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_torch_formulas_are_the_ones_written_out_before_bit_for_bit() -> None:
    x = {k: torch.from_numpy(v) for k, v in _inputs(1).items()}
    eps = 1e-3
    d = stats.mean_shift(x["mean"], x["mu_r"], x["var_r"], eps)
    v = stats.var_shift(x["var"], x["var_r"], eps)
    kl = stats.kl_divergence(d, v)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.float64
    assert torch.equal(d, (x["mean"] - x["mu_r"]) / torch.sqrt(x["var_r"] + eps))
    assert torch.equal(v, torch.log((x["var"] + eps) / (x["var_r"] + eps)))
    assert torch.equal(kl, 0.5 * (torch.exp(v) + d * d - 1.0 - v))
    n = {k: t.numpy() for k, t in x.items()}
    assert d.numpy() == pytest.approx(stats.mean_shift(n["mean"], n["mu_r"], n["var_r"], eps))
    batch = stats.Moments(x["mean"], x["var"], 10.0)
    d2, v2 = stats.shifts(batch, x["mu_r"].float(), x["var_r"].float(), eps)
    mu32, var32 = x["mu_r"].float().double(), x["var_r"].float().double()
    assert torch.equal(d2, (x["mean"] - mu32) / torch.sqrt(var32 + eps))
    assert torch.equal(v2, torch.log((x["var"] + eps) / (var32 + eps)))


def test_rank_divergence_is_the_formula_it_had() -> None:
    rng = np.random.default_rng(2)
    by_rank = [{"bn": (rng.normal(size=7), rng.gamma(1.0, size=7))} for _ in range(3)]
    by_rank[1]["bn"][1][0] = 0.0
    e = 1e-5
    got = distributed.rank_divergence(by_rank, {"bn": e})["bn"]
    mu = np.stack([r["bn"][0] for r in by_rank])
    var = np.stack([r["bn"][1] for r in by_rank])
    s2 = var.mean(axis=0) + e
    old = max(
        (np.abs(mu - mu.mean(axis=0)) / np.sqrt(s2)).max(), np.abs(np.log((var + e) / s2)).max()
    )
    assert got == old  # bit for bit


def test_the_diagnosis_does_not_load_torch() -> None:
    code = "import sys, bnprobe.diagnosis, bnprobe.stats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- rows of the functions outside the callback ----------------------------------------------------
def test_check_mismatch_and_recalibrate_write_catalogue_metrics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    model.train()
    x = torch.randn(8, 3, 8, 8)
    probe = check_mismatch(model, x, recal_batches=[torch.randn(8, 3, 8, 8)])
    layer = probe[probe["layer"] != store.MODEL]
    whole = probe[probe["layer"] == store.MODEL]
    assert tuple(dict.fromkeys(layer["metric"])) == metrics.logged("probe")
    assert set(whole["metric"]) == set(metrics.logged("probe", model=True))
    rows = recalibrate(model, [x, torch.randn(8, 3, 8, 8)], apply=True)
    assert tuple(dict.fromkeys(rows["metric"])) == metrics.names(
        "recalibrate", without=[metrics.FROZEN]
    )


# -- the callback's "Logged keys" docstring and a real run's keys -------------------------------
def _logged_keys_section() -> str:
    doc = inspect.cleandoc(callback.BNProbeBase.__doc__ or "")
    return doc[doc.index("Logged keys") :]


def test_logged_keys_docstring_is_generated_from_the_catalogue() -> None:
    assert _logged_keys_section() == metrics.logged_keys_doc()
    assert callback.BNProbe.__doc__ == callback.BNProbeBase.__doc__
    assert "{" + ",".join(tb.HIST_NAMES) + "}" in _logged_keys_section()


def _documented(stage: str) -> set[str]:
    """The metric names the docstring's bullet of ``stage`` lists (layer and whole model)."""
    bullets = re.split(r"\n- ", _logged_keys_section())
    (bullet,) = [b for b in bullets if b.startswith(f"``bnprobe/{stage}/<metric>/")]
    return set(re.findall(r"``([a-z_]+)``", bullet))


def test_logged_keys_are_a_real_runs_keys(tmp_path) -> None:
    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    probe = BNProbe(every_n_steps=2, summary=False)
    trainer(tmp_path, callbacks=[probe], logger=[logger], max_epochs=1).fit(
        Lit(make_model("res2d")), loader((3, 8, 8)), loader((3, 8, 8), seed=1)
    )
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    seen: dict[tuple[str, bool], set[str]] = {}
    for tag in acc.Tags()["scalars"]:
        try:
            parts = tb.parse_tag(tag)
        except ValueError:  # the epoch scalars
            continue
        seen.setdefault((parts.stage, parts.layer == store.MODEL), set()).add(parts.metric)
    assert {s for s, _ in seen} == set(metrics.LOGGED_STAGES)
    single = [metrics.DDP]  # one process: no rank_divergence
    for stage in metrics.LOGGED_STAGES:
        layer = {m.name for m in metrics.entries(stage, without=[*single, metrics.PER_CHANNEL])}
        layer -= set(metrics.logged(stage, model=True))
        model = set(metrics.logged(stage, model=True))
        assert seen[(stage, False)] == layer, stage
        assert seen.get((stage, True), set()) == model, stage
        ddp_only = {"rank_divergence"} if stage == "train" else set()
        assert _documented(stage) == layer | model | ddp_only, stage
    # every epoch tag, and nothing else outside the catalogue
    epochs = {t for t in acc.Tags()["scalars"] if t.endswith("/epoch")}
    assert epochs == {tb.epoch_tag(s) for s in metrics.LOGGED_STAGES}
