"""The diagnosis rules on tables built row by row: each rule, its threshold edge, de-duplication,
ordering, the report and exit codes. (Real training runs: tests/test_pathologies.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bnprobe import diagnosis as dg
from bnprobe import store
from bnprobe.diagnosis import Finding, Thresholds, diagnose, exit_code, format_report

TH = Thresholds()

L1, L2 = "features.1", "features.5"
LAYERS = (L1, L2)
TRAIN_STEPS = tuple(range(0, 101, 5))
VAL_STEPS = (0, 50, 100)  # step 0: Lightning's sanity check, before any training step
EPS = 1e-5

Metrics = dict[str, float]
Tweak = Callable[[str, str, int, int, Metrics], None]


def healthy_metrics(stage: str, layer: str, step: int) -> Metrics:
    """What a healthy layer shows: running stats warming up from (0, 1) towards the data."""
    mu, var = (0.3, 0.5) if layer == L1 else (-0.2, 3.0)
    left = 0.9**step  # (1 - momentum) ** updates
    rm, rv = mu * (1 - left), 1.0 + (var - 1.0) * (1 - left)
    d = abs(mu - rm) / math.sqrt(rv + EPS) + 0.04
    v = abs(math.log((var + EPS) / (rv + EPS))) + 0.05
    m: Metrics = {
        "batch_mean": mu,
        "batch_var": var,
        "running_mean": rm,
        "running_var": rv,
        "mean_shift": d,
        "mean_shift_max": 3 * d,
        "var_shift": v,
        "var_shift_max": 3 * v,
        "kl": 0.5 * (math.exp(v) + d * d - 1 - v),
        "kl_max": 2.0 * (math.exp(v) + d * d - 1 - v),
        "outlier_frac": 0.0,
        "samples_per_channel": 2048.0,
        "nonfinite": 0.0,
    }
    if stage == "train":
        m |= {
            "gamma_mean": 1.0 - 0.001 * step,
            "gamma_std": 0.0005 * step,
            "beta_mean": 0.0,
            "beta_std": 0.0002 * step,
            "gamma_drift": 0.0005 * step,
            "beta_drift": 0.0002 * step,
            "gamma_small_frac": 0.0,
            "forward_calls": 1.0,
            "batch_size": 64.0,
            "train_mode": 1.0,
            "model_train_mode": 1.0,
            "momentum": 0.1,
            "has_running_stats": 1.0,
        }
        if step == 0:
            m |= {"input_bias": 0.0, "input_dropout": 0.0}
    return m


def table(
    tweak: Tweak | None = None,
    *,
    train_steps: tuple[int, ...] = TRAIN_STEPS,
    val_steps: tuple[int, ...] = VAL_STEPS,
    probe_steps: tuple[int, ...] = (50, 100),
    ranks: tuple[int, ...] = (0,),
    layers: tuple[str, ...] = LAYERS,
) -> pd.DataFrame:
    """A healthy run as a bnprobe table; ``tweak(stage, layer, step, rank, metrics)`` edits the
    metrics of a row group in place before it is written (delete a key to drop a metric)."""
    frames = []
    plan = [("train", s) for s in train_steps] + [("val", s) for s in val_steps]
    plan += [("probe", s) for s in probe_steps]
    for stage, step in sorted(plan, key=lambda p: (p[1], p[0] != "train")):
        for rank in ranks:
            names: list[str] = []
            metrics: list[str] = []
            values: list[float] = []
            units = [*layers, store.MODEL] if stage == "probe" else list(layers)
            for layer in units:
                if stage == "probe":
                    m = (
                        {"logits_gap": 0.03, "pred_agreement": 0.98}
                        if layer == store.MODEL
                        else {"local_gap": 0.05, "output_gap": 0.08}
                    )
                else:
                    m = healthy_metrics(stage, layer, step)
                if tweak is not None:
                    tweak(stage, layer, step, rank, m)
                names += [layer] * len(m)
                metrics += list(m)
                values += list(m.values())
            frames.append(
                store.make_rows(
                    step=step,
                    epoch=step // 50,
                    stage=stage,
                    rank=rank,
                    layers=names,
                    metrics=metrics,
                    values=values,
                )
            )
    return store.concat(frames)


def only(findings: list[Finding], kind: str) -> list[Finding]:
    return [f for f in findings if f.kind == kind]


def serious(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("warning", "error")]


def one(findings: list[Finding], kind: str) -> Finding:
    hits = only(findings, kind)
    assert len(hits) == 1, [str(f) for f in findings]
    return hits[0]


def test_healthy_run_has_no_finding_at_all() -> None:
    df = table()
    # the table really does show the warm-up: large early shifts at train step 0 and at the
    # sanity-check validation before any training step
    early = df[(df["step"] == 0) & (df["metric"] == "var_shift") & (df["layer"] == L2)]
    assert (early["value"] > TH.val_var_shift_max).all()
    assert diagnose(df) == []


def test_healthy_run_that_ends_while_still_warming_up_has_no_warning() -> None:
    """At step 3, 73% of the initial running statistics are left: in a table without the
    warm-up-corrected metrics (older versions) a big plain validation shift is the warm-up's, and
    a layer still warming up with nothing else wrong stays quiet."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "val" and layer == L1:
            m["mean_shift"] = 2.0

    df = table(tweak, train_steps=(0, 1, 2), val_steps=(3,), probe_steps=(3,))
    assert diagnose(df) == []


# -- stale_running_stats -------------------------------------------------------------------------


def val_shift(metric: str, value: float, steps: tuple[int, ...] = (50, 100)) -> Tweak:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "val" and layer == L2 and step in steps:
            m[metric] = value

    return tweak


@pytest.mark.parametrize(
    ("metric", "limit"),
    [
        ("mean_shift", TH.val_mean_shift_max),
        ("var_shift", TH.val_var_shift_max),
        ("kl", TH.val_kl_max),
    ],
)
def test_stale_running_stats_threshold_edge(metric: str, limit: float) -> None:
    assert only(diagnose(table(val_shift(metric, 0.99 * limit))), "stale_running_stats") == []
    f = one(diagnose(table(val_shift(metric, 1.01 * limit))), "stale_running_stats")
    assert (f.layer, f.severity, f.step) == (L2, "warning", 50)
    assert f.evidence[metric] == pytest.approx(1.01 * limit)
    assert f.evidence["stage"] == "val"


def test_stale_running_stats_message_first_step_and_worst_evidence() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "val" and layer == L1 and step > 0:
            m["mean_shift"] = {50: 1.5, 100: 3.2}[step]
            m["mean_shift_max"] = {50: 5.0, 100: 11.0}[step]

    f = one(diagnose(table(tweak)), "stale_running_stats")
    assert (f.layer, f.step) == (L1, 50)
    assert f.evidence["mean_shift"] == 3.2 and f.evidence["step_worst"] == 100
    assert "Layer features.1: running statistics do not match the validation data" in f.message
    assert "mean shift 3.20 std, worst channel 11.0" in f.message
    assert "since step 50" in f.message
    assert f.advice.endswith(f"See {dg.DOCS_URL}#stale_running_stats.")


def test_stale_running_stats_that_recovered_is_not_reported() -> None:
    df = table(val_shift("mean_shift", 2.0, steps=(50,)))
    assert only(diagnose(df), "stale_running_stats") == []


def test_stale_running_stats_of_a_frozen_layer_is_not_excused_as_warm_up() -> None:
    """A layer in eval mode never warms up: a shift at step 12 is a warning, not info."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if layer == L1 and stage == "train":
            m["train_mode"] = 0.0
        if layer == L1 and stage == "val":
            m["mean_shift"] = 2.0

    df = table(tweak, train_steps=(0, 4, 8), val_steps=(12,), probe_steps=())
    f = next(f for f in only(diagnose(df), "stale_running_stats") if f.layer == L1)
    assert f.severity == "warning"


def train_shift(value: float, from_step: int, layer: str = L2) -> Tweak:
    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and name == layer and step >= from_step:
            m["mean_shift"] = value

    return tweak


def test_stale_running_stats_from_training_steps_without_validation() -> None:
    just_below = table(train_shift(0.99 * TH.train_mean_shift_max, 60), val_steps=())
    assert only(diagnose(just_below), "stale_running_stats") == []
    df = table(train_shift(1.01 * TH.train_mean_shift_max, 60), val_steps=())
    f = one(diagnose(df), "stale_running_stats")
    assert (f.layer, f.severity, f.evidence["stage"]) == (L2, "warning", "train")
    # the rolling median over 5 logged steps crosses the limit at the third bad step
    assert f.step == 70
    assert "lag the training batches" in f.message


def test_large_early_training_shifts_are_warm_up_not_stale() -> None:
    """Shifts of 3 std during the first 25 steps (residual > 5%) are not reported."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and step <= 25:
            m["mean_shift"] = 3.0
            m["var_shift"] = 3.0

    assert diagnose(table(tweak, val_steps=())) == []


# -- train_eval_gap ------------------------------------------------------------------------------


def probe(layer: str, metric: str, value: float) -> Tweak:
    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and name == layer and step == 100:
            m[metric] = value

    return tweak


def test_train_eval_gap_local_gap_edge() -> None:
    assert (
        only(diagnose(table(probe(L1, "local_gap", 0.99 * TH.local_gap_max))), "train_eval_gap")
        == []
    )
    f = one(diagnose(table(probe(L1, "local_gap", 1.2 * TH.local_gap_max))), "train_eval_gap")
    assert (f.layer, f.severity, f.step) == (L1, "warning", 100)
    assert f.evidence["local_gap"] == pytest.approx(1.2 * TH.local_gap_max)


def test_train_eval_gap_logits_gap_edge_names_the_worst_layer() -> None:
    def gaps(logits: float, local: float) -> Tweak:
        def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
            probe(store.MODEL, "logits_gap", logits)(stage, name, step, rank, m)
            probe(L2, "local_gap", local)(stage, name, step, rank, m)

        return tweak

    below = diagnose(table(gaps(0.99 * TH.logits_gap_max, 2 * TH.local_gap_max)))
    assert [f.layer for f in only(below, "train_eval_gap")] == [L2]
    found = diagnose(table(gaps(1.01 * TH.logits_gap_max, 2 * TH.local_gap_max)))
    f = next(f for f in only(found, "train_eval_gap") if f.layer == store.MODEL)
    assert (f.severity, f.step) == ("warning", 100)
    assert f.evidence["logits_gap"] == pytest.approx(1.01 * TH.logits_gap_max)
    assert "features.5 (local gap 1.20)" in f.message


def test_train_eval_gap_of_the_model_without_a_layer_to_blame_is_info() -> None:
    """Small local gaps that add up through a deep net (healthy early training) are info."""

    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        probe(store.MODEL, "logits_gap", 1.5 * TH.logits_gap_max)(stage, name, step, rank, m)
        probe(L2, "local_gap", 0.99 * TH.local_gap_max)(stage, name, step, rank, m)

    f = one(diagnose(table(tweak)), "train_eval_gap")
    assert (f.layer, f.severity) == (store.MODEL, "info")
    assert "No single layer's gap exceeds" in f.message
    assert "features.5 (local gap 0.59)" in f.message


def test_train_eval_gap_pred_agreement_edge() -> None:
    def tweak(agreement: float) -> Tweak:
        def edit(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
            probe(store.MODEL, "pred_agreement", agreement)(stage, name, step, rank, m)
            probe(L1, "local_gap", 2 * TH.local_gap_max)(stage, name, step, rank, m)

        return edit

    at_limit = diagnose(table(tweak(TH.pred_agreement_min)))
    assert [f.layer for f in only(at_limit, "train_eval_gap")] == [L1]
    found = diagnose(table(tweak(TH.pred_agreement_min - 0.02)))
    f = next(f for f in only(found, "train_eval_gap") if f.layer == store.MODEL)
    assert f.severity == "warning"
    assert f.evidence["pred_agreement"] == pytest.approx(TH.pred_agreement_min - 0.02)


# -- small_batch ---------------------------------------------------------------------------------


def samples(
    value: float,
    *,
    metric: str = "batch_size",
    layer: str = L2,
    rank: int | None = None,
    steps: int = 0,
) -> Tweak:
    def tweak(stage: str, name: str, step: int, r: int, m: Metrics) -> None:
        if stage == "train" and name == layer and step >= steps and rank in (None, r):
            m[metric] = value

    return tweak


def test_small_batch_edge_on_batch_size() -> None:
    assert only(diagnose(table(samples(TH.small_batch_min_batch))), "small_batch") == []
    f = one(diagnose(table(samples(TH.small_batch_min_batch - 1))), "small_batch")
    assert (f.layer, f.severity, f.step) == (L2, "warning", 0)
    assert f.evidence["batch_size_median"] == TH.small_batch_min_batch - 1
    assert f.evidence["samples_per_channel_median"] == 2048  # many values, but from 7 samples
    assert "batches of only 7 samples" in f.message


def test_small_batch_edge_on_samples_per_channel_without_batch_size() -> None:
    """Tables without the batch_size metric (older stores) are judged on N·H·W."""

    def tweak(value: float) -> Tweak:
        def edit(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
            m.pop("batch_size", None)
            samples(value, metric="samples_per_channel")(stage, name, step, rank, m)

        return edit

    limit = TH.small_batch_min_samples
    assert only(diagnose(table(tweak(limit))), "small_batch") == []
    f = one(diagnose(table(tweak(limit - 1))), "small_batch")
    assert (f.layer, f.evidence["samples_per_channel_median"]) == (L2, limit - 1)
    assert "batch_size_median" not in f.evidence
    assert "only 7 values per channel" in f.message


def test_small_batch_is_judged_on_the_median_not_one_short_last_batch() -> None:
    assert only(diagnose(table(samples(4.0, steps=95))), "small_batch") == []


def test_small_batch_per_rank_under_ddp() -> None:
    df = table(samples(4.0, rank=1), ranks=(0, 1))
    f = one(diagnose(df), "small_batch")
    assert (f.layer, f.evidence["rank"]) == (L2, 1)
    assert "on rank 1" in f.message


# -- dead_channels -------------------------------------------------------------------------------


def test_dead_channels_edge_first_step_worst_evidence() -> None:
    edge = TH.dead_channel_frac_max

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L1 and step >= 30:
            m["gamma_small_frac"] = {30: 0.2, 35: 0.5}.get(step, 0.25)

    assert only(diagnose(table(lambda *a: tweak_frac(edge, *a))), "dead_channels") == []
    f = one(diagnose(table(tweak)), "dead_channels")
    assert (f.layer, f.step, f.severity) == (L1, 30, "warning")
    assert f.evidence["gamma_small_frac"] == 0.5
    assert f.evidence["gamma_small_frac_latest"] == 0.25
    assert "25% of its channels" in f.message and "worst: 50% at step 35" in f.message


def test_dead_channels_are_judged_on_the_current_state() -> None:
    """Channels that were dead and came back are not reported."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L1 and 30 <= step < 90:
            m["gamma_small_frac"] = 0.5

    assert only(diagnose(table(tweak)), "dead_channels") == []


def tweak_frac(value: float, stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
    if stage == "train" and layer == L1:
        m["gamma_small_frac"] = value


def test_dead_channels_all_gammas_zero() -> None:
    """abs(gamma) < 1% of max abs(gamma) counts nothing when every gamma is 0."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2:
            m |= {"gamma_mean": 0.0, "gamma_std": 0.0, "gamma_small_frac": 0.0}

    f = one(diagnose(table(tweak)), "dead_channels")
    assert (f.layer, f.evidence["gamma_small_frac"]) == (L2, 1.0)
    # all zero since the first measurement: the zero-init pattern that has not moved yet
    assert f.severity == "info" and "zero-initialized" in f.message


def test_zero_init_gammas_that_grow_are_no_finding() -> None:
    """Zero-init residual BNs (gamma = 0 at the start, Goyal et al. 2017) whose gammas grow: no
    dead_channels, even while a share of them is still small relative to the largest."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2:
            g = 0.002 * step
            m |= {
                "gamma_mean": g,
                "gamma_std": g / 2,
                "gamma_small_frac": 1.0 if step == 0 else 0.3,
            }

    assert only(diagnose(table(tweak)), "dead_channels") == []


def test_dead_channels_in_a_layer_not_zero_initialized_stay_a_warning() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2 and step >= 50:
            m |= {"gamma_mean": 0.0, "gamma_std": 0.0, "gamma_small_frac": 0.0}

    f = one(diagnose(table(tweak)), "dead_channels")
    assert (f.layer, f.step, f.severity) == (L2, 50, "warning")
    assert "100% of its channels" in f.message


# -- variance_collapse ---------------------------------------------------------------------------


def variance(value: float, layer: str = L2, from_step: int = 0) -> Tweak:
    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and name == layer and step >= from_step:
            m["batch_var"] = value

    return tweak


def test_small_input_variance_from_the_start_is_info_edge_against_eps() -> None:
    """Variance comparable to eps from the first step and stable (depthwise init): info."""
    floor = TH.var_small_eps_factor * dg.DEFAULT_EPS
    assert only(diagnose(table(variance(1.01 * floor))), "small_input_variance") == []
    found = diagnose(table(variance(0.99 * floor)))
    assert only(found, "variance_collapse") == []
    f = one(found, "small_input_variance")
    assert (f.layer, f.step, f.severity) == (L2, 0, "info")
    assert f.evidence["batch_var"] == pytest.approx(0.99 * floor)
    assert "depthwise conv" in f.message and "nan" not in f.message


def test_variance_collapse_edge_against_zero() -> None:
    """Variance ~0 (below var_zero_eps_factor x eps) is a collapse even from the start."""
    floor = TH.var_zero_eps_factor * dg.DEFAULT_EPS
    assert only(diagnose(table(variance(1.01 * floor))), "variance_collapse") == []
    f = one(diagnose(table(variance(0.99 * floor))), "variance_collapse")
    assert (f.layer, f.step, f.severity) == (L2, 0, "warning")
    assert f.evidence["batch_var"] == pytest.approx(0.99 * floor)


def test_variance_that_falls_to_eps_during_training_is_a_collapse() -> None:
    floor = TH.var_small_eps_factor * dg.DEFAULT_EPS
    f = one(diagnose(table(variance(0.5 * floor, from_step=40))), "variance_collapse")
    assert (f.layer, f.step, f.severity) == (L2, 40, "warning")
    assert "fell from 3 to 5e-05" in f.message


def test_variance_collapse_over_time() -> None:
    """A drop to below VAR_COLLAPSE_DROP of the warmed-up peak, still far above eps."""

    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and name == L1:
            m["batch_var"] = 10.0 if step < 80 else 10.0 * factor

    factor = 1.01 * TH.var_collapse_drop
    assert only(diagnose(table(tweak)), "variance_collapse") == []
    factor = 0.99 * TH.var_collapse_drop
    f = one(diagnose(table(tweak)), "variance_collapse")
    assert (f.layer, f.step) == (L1, 80)
    assert "fold drop" in f.message


def test_variance_collapse_of_some_channels_with_per_channel_rows() -> None:
    floor = TH.var_small_eps_factor * EPS

    def with_channels(collapsed: int, from_step: int = 40) -> pd.DataFrame:
        per_channel = [
            store.make_rows(
                step=s,
                epoch=0,
                stage="train",
                rank=0,
                layers=[L1] * 10,
                metrics=["batch_var"] * 10,
                values=[
                    floor / 2 if (c < collapsed and s >= from_step) else 0.5 for c in range(10)
                ],
                channels=list(range(10)),
            )
            for s in TRAIN_STEPS
        ]
        return store.concat([table(), *per_channel])

    # 1 of 10 channels is not more than var_small_channel_frac = 10%
    assert only(diagnose(with_channels(1)), "variance_collapse") == []
    f = one(diagnose(with_channels(3)), "variance_collapse")
    assert (f.layer, f.step, f.evidence["collapsed_frac"]) == (L1, 40, 0.3)
    assert "30% of its channels now have a batch variance below" in f.message
    # the same channels small from the first step on: the depthwise-init pattern, info
    found = diagnose(with_channels(3, from_step=0))
    assert only(found, "variance_collapse") == []
    assert one(found, "small_input_variance").severity == "info"


def test_variance_collapse_of_some_channels_from_the_var_small_frac_metric() -> None:
    def frac(value: float) -> Tweak:
        def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
            if stage == "train":
                m["var_small_frac"] = value if (layer == L2 and step >= 40) else 0.0

        return tweak

    limit = TH.var_small_channel_frac
    assert only(diagnose(table(frac(limit))), "variance_collapse") == []
    f = one(diagnose(table(frac(0.25))), "variance_collapse")
    assert (f.layer, f.step, f.evidence["collapsed_frac"]) == (L2, 40, 0.25)
    assert "25% of its channels now have a batch variance below" in f.message


# -- nonfinite -----------------------------------------------------------------------------------


def poisoned(from_step: int = 25) -> Tweak:
    """A NaN batch at ``from_step`` in L1 that poisons L1's and then L2's running stats."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage != "train" or step < from_step:
            return
        if layer == L1:
            if step == from_step:
                m |= {"batch_mean": math.nan, "batch_var": math.nan, "nonfinite": 64.0}
            else:
                m |= {"running_mean": math.nan, "running_var": math.nan, "mean_shift": math.nan}
        elif step > from_step:
            m |= {"batch_mean": math.nan, "running_mean": math.nan, "running_var": math.inf}

    return tweak


def test_nonfinite_is_an_error_from_the_first_step_with_its_origin() -> None:
    found = diagnose(table(poisoned()))
    errors = only(found, "nonfinite")
    assert [(f.layer, f.step, f.severity) for f in errors] == [
        (L1, 25, "error"),
        (L2, 30, "error"),
    ]
    first, second = errors
    assert first.evidence["nonfinite_channels"] == 64
    assert "first layer where it appears" in first.message
    assert "running statistics are invalid from then on" in first.message
    assert "appeared first in layer features.1 at step 25" in second.message
    assert found[:2] == errors  # errors come first
    json.dumps([f.to_dict() for f in errors], allow_nan=False)  # evidence is JSON-safe


def test_nonfinite_edge_zero_count_and_finite_values_is_fine() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        m["nonfinite"] = 0.0

    assert only(diagnose(table(tweak)), "nonfinite") == []

    def one_channel(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "val" and layer == L2 and step == 100:
            m["nonfinite"] = 1.0

    f = one(diagnose(table(one_channel)), "nonfinite")
    assert (f.layer, f.step, f.evidence["stage"]) == (L2, 100, "val")


# -- frozen_bn -----------------------------------------------------------------------------------


def test_frozen_bn_eval_mode_while_model_trains() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2 and step >= 40:
            m["train_mode"] = 0.0

    f = one(diagnose(table(tweak)), "frozen_bn")
    assert (f.layer, f.step, f.severity) == (L2, 40, "warning")
    assert f.evidence["steps_in_eval_mode"] == 13

    def whole_model_eval(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train":
            m["train_mode"] = m["model_train_mode"] = 0.0

    assert only(diagnose(table(whole_model_eval)), "frozen_bn") == []


def running_stats_moving_by(delta: float, layer: str = L1) -> Tweak:
    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        if name == layer and stage == "train":
            m["running_mean"] = 0.25 + delta * step
            m["running_var"] = 0.5
            m["momentum"] = 0.0

    return tweak


def test_frozen_bn_running_stats_never_change() -> None:
    assert only(diagnose(table(running_stats_moving_by(1e-6))), "frozen_bn") == []
    f = one(diagnose(table(running_stats_moving_by(0.0))), "frozen_bn")
    assert (f.layer, f.step, f.severity) == (L1, 0, "warning")
    assert "never changed over 21 logged training steps" in f.message
    assert "momentum is 0" in f.message


def test_frozen_bn_with_too_few_steps_is_not_judged() -> None:
    df = table(running_stats_moving_by(0.0), train_steps=(0, 5), val_steps=(), probe_steps=())
    assert only(diagnose(df), "frozen_bn") == []


def test_frozen_affine_parameters_are_info() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2:
            m["gamma_drift"] = m["beta_drift"] = 0.0

    f = one(diagnose(table(tweak)), "frozen_bn")
    assert (f.layer, f.severity) == (L2, "info")


# -- unused_layer, no_running_stats --------------------------------------------------------------


def test_unused_layer() -> None:
    spare = "spare_bn"

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if layer == spare:
            m.clear()
            if stage == "train":
                m["forward_calls"] = 0.0

    found = diagnose(table(tweak, layers=(L1, spare, L2)))
    f = one(found, "unused_layer")
    assert (f.layer, f.step, f.severity) == (spare, 0, "warning")
    assert serious(found) == [f]

    def sometimes(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2 and step != 50:
            m["forward_calls"] = 0.0

    assert only(diagnose(table(sometimes)), "unused_layer") == []


def test_no_running_stats_is_info_and_buffers_kept_is_frozen() -> None:
    running = ("running_mean", "running_var", "mean_shift", "mean_shift_max", "var_shift")
    running += ("var_shift_max", "kl", "kl_max", "outlier_frac")

    def no_stats(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if layer == L1 and stage in ("train", "val"):
            for key in running:
                m.pop(key)
            if stage == "train":
                m["has_running_stats"] = 0.0

    found = diagnose(table(no_stats))
    f = one(found, "no_running_stats")
    assert (f.layer, f.severity) == (L1, "info")
    assert serious(found) == []

    def buffers_kept(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if layer == L1 and stage == "train":
            m |= {"has_running_stats": 0.0, "running_mean": 0.0, "running_var": 1.0}

    found = diagnose(table(buffers_kept))
    assert only(found, "no_running_stats") == []
    f = one(found, "frozen_bn")
    assert "track_running_stats=False" in f.message


# -- structure: momentum, bias, dropout ----------------------------------------------------------


def structural(metric: str, value: float, layer: str = L2) -> Tweak:
    def tweak(stage: str, name: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and name == layer and metric in m:
            m[metric] = value

    return tweak


def test_suspicious_momentum_edge() -> None:
    below = TH.tf_momentum_min - 0.01
    assert only(diagnose(table(structural("momentum", below))), "suspicious_momentum") == []
    f = one(diagnose(table(structural("momentum", 0.9))), "suspicious_momentum")
    assert (f.layer, f.severity, f.evidence["momentum"]) == (L2, "warning", 0.9)
    assert "momentum=0.1" in f.advice
    at_edge = one(
        diagnose(table(structural("momentum", TH.tf_momentum_min))), "suspicious_momentum"
    )
    assert at_edge.severity == "warning"


def test_momentum_none_is_info() -> None:
    f = one(diagnose(table(structural("momentum", math.nan))), "suspicious_momentum")
    assert (f.layer, f.severity, f.evidence["momentum"]) == (L2, "info", "None")


def test_bias_before_bn_is_info() -> None:
    found = diagnose(table(structural("input_bias", 1.0, layer=L1)))
    f = one(found, "bias_before_bn")
    assert (f.layer, f.severity, f.step) == (L1, "info", 0)
    assert "bias=False" in f.advice
    assert serious(found) == []


def test_dropout_before_bn_edge() -> None:
    edge = TH.dropout_before_bn_min_p
    assert only(diagnose(table(structural("input_dropout", edge))), "dropout_before_bn") == []
    f = one(diagnose(table(structural("input_dropout", 0.3))), "dropout_before_bn")
    assert (f.layer, f.severity, f.evidence["input_dropout"]) == (L2, "warning", 0.3)
    assert "Li et al., 2019" in f.message


# -- rank_divergence -----------------------------------------------------------------------------


def test_rank_divergence_metric_edge() -> None:
    def divergence(value: float) -> Tweak:
        def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
            if stage == "train" and rank == 0:
                m["rank_divergence"] = value if (layer == L1 and step >= 60) else 0.0

        return tweak

    edge = TH.rank_divergence_max
    assert only(diagnose(table(divergence(edge))), "rank_divergence") == []
    f = one(diagnose(table(divergence(2 * edge))), "rank_divergence")
    # the rolling median of 5 logged steps crosses at the third step above the limit
    assert (f.layer, f.step, f.evidence["rank_divergence_median"]) == (L1, 70, 2 * edge)


def test_rank_divergence_spikes_and_divergence_that_went_away_are_not_reported() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and rank == 0:
            spike = step in (20, 60)  # single steps: the median ignores them
            gone = 30 <= step <= 70  # persistent, but over by the end
            m["rank_divergence"] = 1.0 if (layer == L1 and spike) or (layer == L2 and gone) else 0.0

    assert only(diagnose(table(tweak)), "rank_divergence") == []


def test_rank_divergence_from_per_rank_rows() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "train" and layer == L2 and rank == 1 and step >= 20:
            m["running_mean"] += offset * math.sqrt(m["running_var"] + EPS)

    offset = 0.99 * TH.rank_divergence_max
    assert only(diagnose(table(tweak, ranks=(0, 1))), "rank_divergence") == []
    offset = 3 * TH.rank_divergence_max
    f = one(diagnose(table(tweak, ranks=(0, 1))), "rank_divergence")
    assert (f.layer, f.step, f.evidence["rank"]) == (L2, 30, 1)
    assert f.evidence["rank_divergence_median"] == pytest.approx(offset, rel=1e-4)


# -- de-duplication, ordering, runs --------------------------------------------------------------


def test_one_finding_per_kind_and_layer_sorted_by_severity_then_step() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        structural("input_bias", 1.0, layer=L1)(stage, layer, step, rank, m)
        structural("input_dropout", 0.2, layer=L2)(stage, layer, step, rank, m)
        poisoned(from_step=90)(stage, layer, step, rank, m)
        if stage == "train" and layer == L2 and step >= 50:
            m["gamma_small_frac"] = 0.5  # at 11 logged steps: one finding

    found = diagnose(table(tweak))
    keys = [(f.kind, f.layer) for f in found]
    assert len(keys) == len(set(keys))
    severities = [dg.SEVERITIES.index(f.severity) for f in found]
    assert severities == sorted(severities)
    assert [(f.severity, f.kind, f.layer, f.step) for f in found] == [
        ("error", "nonfinite", L1, 90),
        ("error", "nonfinite", L2, 95),
        ("warning", "dropout_before_bn", L2, 0),
        ("warning", "dead_channels", L2, 50),
        ("info", "bias_before_bn", L1, 0),
    ]


def test_several_runs_are_diagnosed_separately() -> None:
    healthy = table().assign(run="healthy")
    bad = table(structural("momentum", 0.99)).assign(run="tf_momentum")
    found = diagnose(pd.concat([healthy, bad], ignore_index=True))
    f = one(found, "suspicious_momentum")
    assert f.run == "tf_momentum" and f.to_dict()["run"] == "tf_momentum"
    assert f.message.startswith("Layer features.5")
    assert str(f).startswith("WARNING suspicious_momentum (run tf_momentum: features.5, step 0)")
    assert diagnose(healthy) == []


def test_empty_table_has_no_findings_and_bad_input_is_explained() -> None:
    assert diagnose(store.empty_frame()) == []
    with pytest.raises(ValueError, match=r"missing columns \['metric', 'value'\]"):
        diagnose(table().drop(columns=["metric", "value"]))
    with pytest.raises(TypeError, match="DataFrame"):
        diagnose([1, 2, 3])  # type: ignore[arg-type]


def test_finding_validates_severity_and_kind() -> None:
    with pytest.raises(ValueError, match="severity must be one of error, warning, info"):
        Finding("nonfinite", "fatal", L1, "m", "a", 1, {})
    with pytest.raises(ValueError, match="kind must be one of"):
        Finding("bad_vibes", "info", L1, "m", "a", 1, {})


# -- report, JSON, exit codes --------------------------------------------------------------------


def sick_table() -> pd.DataFrame:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        structural("momentum", 0.9)(stage, layer, step, rank, m)
        structural("input_bias", 1.0, layer=L1)(stage, layer, step, rank, m)
        poisoned(from_step=95)(stage, layer, step, rank, m)

    return table(tweak)


def test_text_report_has_a_layer_table_and_findings_by_severity() -> None:
    df = sick_table()
    text = format_report(df)
    lines = text.splitlines()
    assert lines[0] == "bnprobe report"
    stages = next(line for line in lines if "- train -" in line)
    assert "- val -" in stages and "- probe -" in stages
    header = next(line for line in lines if line.strip().startswith("layer"))
    train_cols = ["mean_shift", "var_shift", "gamma_drift", "samples"]
    assert header.split() == ["layer", *train_cols, "mean_shift", "var_shift", "local_gap"]
    row = next(line for line in lines if line.strip().startswith(L2))
    latest_probe = "0.05"
    assert row.split()[-1] == latest_probe
    assert "model at the latest probe (step 100): logits_gap 0.03, pred_agreement 0.98" in text
    assert "Findings: 2 errors, 1 warning, 1 info" in text
    assert text.index("ERROR nonfinite") < text.index("WARNING suspicious_momentum")
    assert text.index("WARNING suspicious_momentum") < text.index("INFO bias_before_bn")
    assert "Fix: " in text and f"{dg.DOCS_URL}#nonfinite" in text
    assert max(len(line) for line in lines) <= 100


def test_text_report_of_a_healthy_run() -> None:
    text = format_report(table())
    assert text.endswith(
        "No findings: the 2 watched BatchNorm layers look healthy (2 BatchNorm layers, training "
        "steps 0..100 (21 measured), 3 validation epochs, 2 train/eval probes)."
    )


def test_json_report_round_trip() -> None:
    df = sick_table()
    findings = diagnose(df)
    doc = json.loads(format_report(df, findings, fmt="json"))
    assert list(doc) == ["version", "counts", "runs", "findings"]
    assert doc["version"] == dg.REPORT_VERSION
    assert doc["counts"] == {"error": 2, "warning": 1, "info": 1}
    assert [Finding.from_dict(d) for d in doc["findings"]] == findings
    run = doc["runs"][0]
    assert run["run"] is None
    assert [entry["layer"] for entry in run["layers"]] == [L1, L2]
    l1 = run["layers"][0]
    assert l1["train"]["step"] == 100 and l1["train"]["mean_shift"] is None  # NaN -> null
    assert l1["val"]["mean_shift"] == pytest.approx(healthy_metrics("val", L1, 100)["mean_shift"])
    assert run["model"] == {
        "step": 100,
        "logits_gap": 0.03,
        "pred_agreement": 0.98,
        "recal_pred_change": None,
    }
    assert run["counts"] == doc["counts"]
    assert run["steps"]["val"] == {"count": 3, "first": 0, "last": 100}


def test_format_report_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="fmt must be 'text' or 'json'; got 'yaml'"):
        format_report(table(), [], fmt="yaml")


def test_exit_codes() -> None:
    info = Finding("bias_before_bn", "info", L1, "m", "a", 0, {})
    warn = Finding("small_batch", "warning", L1, "m", "a", 0, {})
    err = Finding("nonfinite", "error", L1, "m", "a", 0, {})
    assert exit_code([err, warn], None) == 0
    assert exit_code([info], "warning") == 0
    assert exit_code([info, warn], "warning") == 1
    assert exit_code([err], "warning") == 1
    assert exit_code([info, warn], "error") == 0
    assert exit_code([err], "error") == 1
    assert exit_code([], "warning") == 0
    with pytest.raises(ValueError, match="fail_on must be 'warning', 'error' or None; got 'warn'"):
        exit_code([], "warn")


def test_str_of_a_finding_reads_in_a_terminal() -> None:
    f = one(diagnose(table(structural("momentum", 0.99))), "suspicious_momentum")
    text = str(f)
    assert text.startswith("WARNING suspicious_momentum (features.5, step 0)\n  Layer features.5")
    assert "\n  Fix: Use `momentum=0.01`" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_every_kind_has_a_rule_and_a_docs_section_the_advice_links_to() -> None:
    assert tuple(dg.RULES) == dg.KINDS
    docs = Path(__file__).resolve().parents[1] / "docs" / "diagnosis.md"
    headings = set(re.findall(r"^## (\w+)\s*$", docs.read_text(), flags=re.M))
    assert set(dg.KINDS) <= headings
    for field in dataclasses.fields(Thresholds):
        assert f"`{field.name}`" in docs.read_text(), f"{field.name} is not documented"
    for kind in dg.Kind:
        assert dg.doc_link(kind) == f"{dg.DOCS_URL}#{kind}"
    assert dg.DOCS_URL.startswith("https://")


def test_values_are_float64_and_evidence_is_plain_python() -> None:
    f = one(diagnose(table(samples(4.0))), "small_batch")
    assert all(type(v) in (int, float, str) for v in f.evidence.values())
    assert np.isfinite(f.evidence["batch_size_median"])


def test_worst_values_measure_what_the_rules_compare_after_warm_up() -> None:
    worst = dg.worst_values(table())
    assert set(worst) == set(dg.CALIBRATION)
    for constant, direction in dg.CALIBRATION.values():
        assert isinstance(getattr(TH, constant), float | int) and direction in ("max", "min")
    warm = [healthy_metrics("val", la, s)["mean_shift"] for la in LAYERS for s in (50, 100)]
    assert worst["val_mean_shift"] == pytest.approx(max(warm))
    assert worst["val_mean_shift"] < healthy_metrics("val", L1, 0)["mean_shift"]  # step 0 left out
    assert worst["local_gap"] == pytest.approx(0.05)
    assert worst["logits_gap"] == pytest.approx(0.03)
    assert worst["pred_change"] == pytest.approx(0.02)
    assert worst["batch_size"] == 64.0 and worst["samples_per_channel"] == 2048.0
    assert worst["momentum"] == pytest.approx(0.1)
    assert worst["var_over_eps"] == pytest.approx(0.5 / dg.DEFAULT_EPS)
    assert math.isnan(worst["rank_divergence"])


# -- the warm-up model (tables with the warm-up-corrected metrics) --------------------------------


def corrected(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
    """Add what the tap writes now: the update count, the warm-up residual and the shifts the
    warm-up cannot explain (healthy: the sampling noise only; 0 before any update)."""
    if stage in ("train", "val", "probe") and layer != store.MODEL:
        m |= {"num_batches_tracked": float(step), "warmup_residual": 0.9**step}
    if stage in ("train", "val"):
        noise = 0.0 if step == 0 else 1.0
        m |= {
            "mean_shift_excess": 0.04 * noise,
            "mean_shift_excess_max": 0.12 * noise,
            "var_shift_excess": 0.05 * noise,
            "var_shift_excess_max": 0.15 * noise,
            "running_invalid": 0.0,
        }


def both(*tweaks: Tweak) -> Tweak:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        for t in tweaks:
            t(stage, layer, step, rank, m)

    return tweak


def test_healthy_corrected_table_is_quiet_while_warming_up_and_after() -> None:
    assert diagnose(table(corrected)) == []
    early = table(corrected, train_steps=(0, 1, 2, 3), val_steps=(0, 3), probe_steps=(3,))
    assert diagnose(early) == []


def test_a_shift_beyond_the_warm_up_is_a_warning_at_step_20_as_at_step_100() -> None:
    """The plain shift at step 20 is large in every healthy layer (12% of the initial values
    are left); only the excess is judged, with the same limit early and late."""

    def shifted(at: int) -> Tweak:
        def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
            if stage == "val" and layer == L1 and step == at:
                m |= {"mean_shift": 4.5, "mean_shift_excess": 4.0, "mean_shift_excess_max": 6.0}

        return tweak

    for at in (20, 100):
        df = table(both(corrected, shifted(at)), val_steps=(0, at), probe_steps=())
        f = one(diagnose(df), "stale_running_stats")
        assert (f.layer, f.severity, f.step) == (L1, "warning", at)
        assert f.evidence["mean_shift_excess"] == 4.0
        assert "mean shift 4.00 std" in f.message
        if at == 20:
            assert f.evidence["warmup_residual"] == pytest.approx(0.9**20, rel=1e-5)
            assert "12% of the initial running statistics" in f.message

    # just below the limit, the same large plain shift is the warm-up's: quiet
    def below(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "val" and layer == L1 and step == 20:
            m |= {"mean_shift": 4.5, "mean_shift_excess": 0.99 * TH.val_mean_shift_max}

    assert diagnose(table(both(corrected, below), val_steps=(0, 20), probe_steps=())) == []


def test_a_frozen_layer_has_no_warm_up_and_is_judged_on_its_plain_shift() -> None:
    """An eval-mode layer keeps its buffers: the tap's residual stays 1 and the excess 0 (nothing
    learned), but no warm-up is under way: its plain validation shift is what eval mode gets."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if layer != L1:
            return
        if stage == "train":
            m["train_mode"] = 0.0
        if stage in ("train", "val"):
            m |= {"warmup_residual": 1.0, "mean_shift_excess": 0.0, "var_shift_excess": 0.0}
        if stage == "val":
            m["mean_shift"] = 2.0

    df = table(both(corrected, tweak), val_steps=(50, 100), probe_steps=())
    f = one(diagnose(df), "stale_running_stats")
    assert (f.layer, f.severity, f.step) == (L1, "warning", 50)
    assert f.evidence["mean_shift"] == 2.0


def model_probe(agreement: float, gap: float = 0.3, **extra: float) -> Tweak:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and layer == store.MODEL and step == 10:
            m |= {"pred_agreement": agreement, "logits_gap": gap, **extra}

    return tweak


def test_predictions_that_change_in_eval_mode_are_a_warning_whatever_the_warm_up() -> None:
    """Step 10 at momentum 0.1: 35% of the initial statistics are left in every layer; 25% of
    the predictions change between train and eval mode."""
    steps = {"train_steps": tuple(range(11)), "val_steps": (), "probe_steps": (10,)}
    edge = TH.pred_agreement_min
    quiet = table(both(corrected, model_probe(edge)), **steps)
    assert only(diagnose(quiet), "train_eval_gap") == []
    f = one(diagnose(table(both(corrected, model_probe(0.75)), **steps)), "train_eval_gap")
    assert (f.layer, f.severity, f.step) == (store.MODEL, "warning", 10)
    assert "25% of the probe batch's predictions change" in f.message
    assert "Likely cause: the running statistics are still warming up (35% of the initial" in (
        f.message.replace("\n", " ")
    )
    assert "momentum 0.1" in f.message and "`bnprobe.recalibrate(" in f.advice
    assert f.evidence["pred_agreement"] == 0.75 and f.evidence["step_latest"] == 10


def test_changed_predictions_past_the_warm_up_need_a_layer_to_blame() -> None:
    """Past the warm-up, near-tied predictions of a barely trained net flip at small gaps that
    add up over many layers: info; with a layer whose own gap is beyond its limit: warning."""
    steps = {"train_steps": tuple(range(0, 101, 10)), "val_steps": (), "probe_steps": (10, 100)}

    def late(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and layer == store.MODEL and step == 100:
            m |= {"pred_agreement": 0.6, "logits_gap": 0.4}

    f = one(diagnose(table(both(corrected, late), **steps)), "train_eval_gap")
    assert (f.layer, f.severity) == (store.MODEL, "info")
    assert "No single layer's gap exceeds" in f.message

    def blamed(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        late(stage, layer, step, rank, m)
        if stage == "probe" and layer == L2 and step == 100:
            m["local_gap"] = 2 * TH.local_gap_max

    found = only(diagnose(table(both(corrected, blamed), **steps)), "train_eval_gap")
    assert {(f.layer, f.severity) for f in found} == {(store.MODEL, "warning"), (L2, "warning")}


def test_layer_gaps_while_warming_up_stay_quiet() -> None:
    steps = {"train_steps": tuple(range(11)), "val_steps": (), "probe_steps": (10,)}

    def gap(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and layer == L1:
            m["local_gap"] = 2 * TH.local_gap_max

    assert only(diagnose(table(both(corrected, gap), **steps)), "train_eval_gap") == []


def test_recalibration_gain_is_an_actionable_warning() -> None:
    steps = {"train_steps": tuple(range(0, 101, 5)), "val_steps": (), "probe_steps": (10,)}

    def gain(change: float, shift: float = 0.2) -> pd.DataFrame:
        extra = {"recal_pred_change": change, "recal_logits_shift": shift}
        return table(both(corrected, model_probe(0.97, 0.2, **extra)), **steps)

    assert only(diagnose(gain(TH.recal_pred_change_max)), "train_eval_gap") == []
    assert only(diagnose(gain(0.06, shift=0.5 * TH.recal_logits_shift_min)), "train_eval_gap") == []
    f = one(diagnose(gain(0.06)), "train_eval_gap")
    assert (f.layer, f.severity) == (store.MODEL, "warning")
    assert "Recalibrating would change 6% of the eval-mode predictions" in f.message
    assert f.evidence["recal_pred_change"] == 0.06
    assert "bnprobe.recalibrate(model, loader, num_batches=100)" in f.advice


def test_invalid_running_statistics_are_an_error_on_their_layer_from_the_probe() -> None:
    """What check_mismatch gives for a model with one negative running variance in L2: only
    probe rows; the NaN gaps of the layer are not mapped to 0 nor blamed on another layer."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and layer == L2:
            m |= {"running_invalid": 1.0, "local_gap": math.nan, "output_gap": math.nan}
        elif stage == "probe" and layer == L1:
            m |= {"running_invalid": 0.0}

    df = table(tweak, train_steps=(), val_steps=(), probe_steps=(100,))
    found = diagnose(df)
    f = one(found, "nonfinite")
    assert (f.layer, f.severity, f.step) == (L2, "error", 100)
    assert "invalid running statistics in 1 channel (non-finite, or a negative running" in (
        f.message
    )
    assert f.evidence["running_invalid_channels"] == 1
    assert "nan%" not in f.message and "blame" not in f.message
    assert "nan%" not in format_report(df, found)


def test_standalone_probe_rows_of_a_trained_model_warn_like_the_callback() -> None:
    """check_mismatch rows carry num_batches_tracked: 1000 updates, no warm-up left."""

    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and layer == L1:
            m |= {"num_batches_tracked": 1000.0, "warmup_residual": 0.9**1000, "local_gap": 0.9}
        elif stage == "probe" and layer == L2:
            m |= {"num_batches_tracked": 1000.0, "warmup_residual": 0.9**1000}

    df = table(tweak, train_steps=(), val_steps=(), probe_steps=(0,))
    f = one(diagnose(df), "train_eval_gap")
    assert (f.layer, f.severity, f.step) == (L1, "warning", 0)


def test_thresholds_are_a_frozen_dataclass_users_can_pass() -> None:
    df = table(probe(L1, "local_gap", 0.5))
    assert only(diagnose(df), "train_eval_gap") == []
    f = one(diagnose(df, thresholds=Thresholds(local_gap_max=0.4)), "train_eval_gap")
    assert f.evidence["threshold_local_gap"] == 0.4
    with pytest.raises(dataclasses.FrozenInstanceError):
        TH.local_gap_max = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"Thresholds.local_gap_max must be a finite number >= 0"):
        Thresholds(local_gap_max=-1.0)
    with pytest.raises(TypeError, match=r"thresholds must be a bnprobe\.diagnosis\.Thresholds"):
        diagnose(df, thresholds={"local_gap_max": 0.4})  # type: ignore[arg-type]


def test_kind_and_severity_are_str_enums_that_compare_with_strings() -> None:
    f = Finding("nonfinite", "error", L1, "m", "a", 1, {})
    assert f.kind is dg.Kind.NONFINITE and f.severity is dg.Severity.ERROR
    assert f.kind == "nonfinite" and f.severity == "error" and f"{f.severity}" == "error"
    assert json.dumps(f.to_dict())  # plain strings in the dict
    assert Finding.from_dict(f.to_dict()) == f
    assert tuple(k.value for k in dg.Kind) == dg.KINDS


# -- the report: runs, honest text ----------------------------------------------------------------


def test_report_prints_one_section_per_run_and_never_merges_them() -> None:
    healthy = table().assign(run="a/healthy")
    bad = table(structural("momentum", 0.99)).assign(run="b/tf")
    df = pd.concat([healthy, bad], ignore_index=True)
    text = format_report(df)
    assert text.startswith(
        "2 runs, judged each on its own. Findings over all runs: 0 errors, 1 warning"
    )
    a, b = text.index("bnprobe report - run a/healthy"), text.index("bnprobe report - run b/tf")
    assert a < b
    assert "No findings: the 2 watched BatchNorm layers look healthy" in text[a:b]
    assert "WARNING suspicious_momentum (run b/tf: features.5, step 0)" in text[b:]
    doc = json.loads(format_report(df, fmt="json"))
    assert [r["run"] for r in doc["runs"]] == ["a/healthy", "b/tf"]
    assert [r["counts"]["warning"] for r in doc["runs"]] == [0, 1]
    assert {f["run"] for f in doc["findings"]} == {"b/tf"}
    assert exit_code(diagnose(df), "warning") == 1
    # findings a caller made without their run are still printed, in a section of their own
    loose = Finding("bias_before_bn", "info", L1, "loose finding", "a", 0, {})
    assert "loose finding" in format_report(df, [loose])


def test_report_text_is_honest_about_what_was_watched() -> None:
    no_bn = format_report(store.empty_frame())
    assert "no BatchNorm measurements in this table" in no_bn
    assert "No findings: there was no BatchNorm layer to judge." in no_bn
    assert "healthy" not in no_bn
    one_layer = format_report(table(layers=(L1,)))
    assert "1 BatchNorm layer," in one_layer and "1 BatchNorm layers" not in one_layer
    assert one_layer.endswith(
        "No findings: the 1 watched BatchNorm layer looks healthy (1 BatchNorm layer, training "
        "steps 0..100 (21 measured), 3 validation epochs, 2 train/eval probes)."
    )
    recal_only = table(train_steps=(), val_steps=(), probe_steps=()).iloc[0:0]
    assert "healthy" not in format_report(recal_only)


def test_latest_and_worst_are_named_where_both_appear() -> None:
    def tweak(stage: str, layer: str, step: int, rank: int, m: Metrics) -> None:
        if stage == "probe" and layer == store.MODEL:
            m["pred_agreement"] = {50: 0.4, 100: 0.7}[step]

    df = table(tweak)
    text = format_report(df)
    assert "model at the latest probe (step 100): logits_gap 0.03, pred_agreement 0.7" in text
    f = one(diagnose(df), "train_eval_gap")
    assert "At the latest probe (step 100)" in f.message and "30% of the probe batch" in f.message


def test_spans_and_latest_are_what_the_groupby_and_the_sort_give() -> None:
    from bnprobe.diagnosis.table import by_layer, latest, spans

    rng = np.random.default_rng(3)
    n = 80
    df = pd.DataFrame(
        {
            "rank": rng.integers(0, 2, n),
            "layer": rng.choice(["a.bn", "b.bn", "c.bn"], n),
            "step": rng.integers(0, 20, n),
            "score": rng.random(n),
        }
    )
    df.loc[[3, 7, 11], "score"] = np.nan
    want = []
    for layer, g in df.groupby("layer", sort=False):
        top = np.argmax(np.nan_to_num(g["score"].to_numpy(float), nan=-np.inf))
        want.append((layer, int(g["step"].min()), int(df.index.get_loc(g.index[top]))))
    assert spans(df) == want
    assert spans(df.drop(columns="score")) == [
        (la, s, int(df.index.get_loc(g.index[0])))
        for (la, s), (_, g) in zip(
            [(la, int(g["step"].min())) for la, g in df.groupby("layer", sort=False)],
            df.groupby("layer", sort=False),
            strict=True,
        )
    ]
    one = (
        df[df["rank"] == 0]
        .drop_duplicates(["layer", "step"])
        .sort_values(["layer", "step"])
        .reset_index(drop=True)
    )
    for frame in (df, one):  # several ranks (sorted), one rank in step order (no sort)
        for pos in by_layer(frame).values():
            want_row = frame.iloc[pos].sort_values("step").iloc[-1]
            pd.testing.assert_series_equal(latest(frame, pos), want_row)
