"""Running the rules: :func:`diagnose`, :func:`exit_code`, and :func:`worst_values`, which
measures on a run what every threshold is compared with (by the rules' own code)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import pandas as pd

from bnprobe.diagnosis import batches, parameters, shifts, structure, variance
from bnprobe.diagnosis.findings import SEVERITIES, Finding, Kind, Severity, dedupe, sort
from bnprobe.diagnosis.table import Columns, Run, check_table, runs
from bnprobe.diagnosis.thresholds import DEFAULT_THRESHOLDS, Thresholds

Rule = Callable[[Run], list[Finding]]

RULES: dict[str, Rule] = {
    Kind.STALE_RUNNING_STATS: shifts.rule_stale_running_stats,
    Kind.TRAIN_EVAL_GAP: shifts.rule_train_eval_gap,
    Kind.SMALL_BATCH: batches.rule_small_batch,
    Kind.DEAD_CHANNELS: parameters.rule_dead_channels,
    Kind.VARIANCE_COLLAPSE: variance.rule_variance_collapse,
    Kind.SMALL_INPUT_VARIANCE: variance.rule_small_input_variance,
    Kind.NONFINITE: variance.rule_nonfinite,
    Kind.FROZEN_BN: parameters.rule_frozen_bn,
    Kind.UNUSED_LAYER: structure.rule_unused_layer,
    Kind.NO_RUNNING_STATS: structure.rule_no_running_stats,
    Kind.SUSPICIOUS_MOMENTUM: structure.rule_suspicious_momentum,
    Kind.BIAS_BEFORE_BN: structure.rule_bias_before_bn,
    Kind.DROPOUT_BEFORE_BN: structure.rule_dropout_before_bn,
    Kind.RANK_DIVERGENCE: batches.rule_rank_divergence,
}
"""One rule per finding kind, in ``Kind`` order."""


def _thresholds(thresholds: Thresholds | None) -> Thresholds:
    if thresholds is None:
        return DEFAULT_THRESHOLDS
    if not isinstance(thresholds, Thresholds):
        raise TypeError(
            "thresholds must be a bnprobe.diagnosis.Thresholds, e.g. "
            f"Thresholds(local_gap_max=0.8); got {type(thresholds).__name__}"
        )
    return thresholds


def diagnose(df: pd.DataFrame, *, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every BatchNorm problem the table shows, most severe first, then by step.

    ``df`` has the bnprobe schema (``store.COLUMNS``). With a ``run`` column (a folder of runs
    read by :func:`bnprobe.load` or :func:`bnprobe.read_tensorboard`) each run is judged on its
    own, never merged with another, and its findings carry ``run`` (the run's name);
    findings are grouped by run in table order. ``thresholds`` replaces the default limits
    (:class:`~bnprobe.diagnosis.Thresholds`). An empty table gives no findings.
    """
    check_table(df)
    th = _thresholds(thresholds)
    found: list[Finding] = []
    for name, part in runs(df):
        found += [f if name is None else replace(f, run=name) for f in _diagnose_run(part, th)]
    return found


def diagnose_columns(rows: Columns, *, thresholds: Thresholds | None = None) -> list[Finding]:
    """:func:`diagnose` of one run's rows given as :class:`~bnprobe.diagnosis.table.Columns`
    (what a :class:`~bnprobe.diagnosis.digest.Digest` keeps): no table is built."""
    return _diagnose_run(rows, _thresholds(thresholds))


def _diagnose_run(df: pd.DataFrame | Columns, th: Thresholds) -> list[Finding]:
    if len(df) == 0:
        return []
    run = Run(df, th)
    findings: list[Finding] = []
    for kind, rule in RULES.items():
        for f in rule(run):
            if f.kind != kind:  # pragma: no cover - a programming error in a rule
                raise RuntimeError(f"rule for {kind} produced a {f.kind} finding")
            findings.append(f)
    return sort(dedupe(findings), run.order)


def exit_code(findings: Iterable[Finding], fail_on: str | None) -> int:
    """1 when a finding is at least as severe as ``fail_on`` ("warning" or "error"), else 0.

    ``fail_on=None`` always gives 0. Meant for CI: ``bnprobe report RUN --fail-on warning``.
    With findings of several runs, 1 when any run has one.
    """
    if fail_on is not None and fail_on not in ("warning", "error"):
        raise ValueError(f"fail_on must be 'warning', 'error' or None; got {fail_on!r}")
    if fail_on is None:
        return 0
    limit = SEVERITIES.index(fail_on)
    return int(any(Severity(f.severity).rank <= limit for f in findings))


CALIBRATION: dict[str, tuple[str, str]] = {
    "val_mean_shift": ("val_mean_shift_max", "max"),
    "val_var_shift": ("val_var_shift_max", "max"),
    "val_kl": ("val_kl_max", "max"),
    "train_median_mean_shift": ("train_mean_shift_max", "max"),
    "train_median_var_shift": ("train_var_shift_max", "max"),
    "local_gap": ("local_gap_max", "max"),
    "logits_gap": ("logits_gap_max", "max"),
    "pred_change": ("pred_change_max", "max"),
    "recal_pred_change": ("recal_pred_change_max", "max"),
    "batch_size": ("small_batch_min_batch", "min"),
    "samples_per_channel": ("small_batch_min_samples", "min"),
    "gamma_small_frac": ("dead_channel_frac_max", "max"),
    "var_over_eps": ("var_small_eps_factor", "min"),
    "batch_var_over_eps": ("var_zero_eps_factor", "min"),
    "var_drop": ("var_collapse_drop", "min"),
    "momentum": ("tf_momentum_min", "max"),
    "rank_divergence": ("rank_divergence_max", "max"),
}
"""What :func:`worst_values` measures: name -> (the :class:`Thresholds` field it is compared
with, whether the rule fires above it ("max") or below it ("min"))."""


def worst_values(df: pd.DataFrame, *, thresholds: Thresholds | None = None) -> dict[str, float]:
    """The worst value of every quantity a threshold is compared with, over one run.

    Measured by the rules' own functions, the way the rules see it: validation and training
    shifts beyond the warm-up (training ones as rolling medians), layer gaps of layers past the
    warm-up, batch sizes as per-layer medians; "worst" is the maximum for quantities that fire
    above their threshold and the minimum for the others (``CALIBRATION``). NaN where the table
    lacks the metric. This is how the thresholds were calibrated on healthy runs
    (``python tools/calibrate_thresholds.py``).
    """
    check_table(df)
    run = Run(df, _thresholds(thresholds))
    out = dict.fromkeys(CALIBRATION, math.nan)

    def worst(name: str, values: pd.Series | np.ndarray) -> None:
        arr = np.asarray(values, dtype=float)
        arr = arr[np.isfinite(arr)]
        if arr.size:
            out[name] = float(arr.max() if CALIBRATION[name][1] == "max" else arr.min())

    val = shifts.val_shifts(run)
    if len(val):
        for m in ("mean_shift", "var_shift", "kl"):
            worst(f"val_{m}", val[f"judged_{m}"])
    train = shifts.train_shifts(run)
    if len(train):
        for m in ("mean_shift", "var_shift"):
            worst(f"train_median_{m}", train[f"median_{m}"])
    layers = shifts.probe_layers(run)
    if len(layers) and "local_gap" in layers:
        past = layers["residual"].to_numpy(dtype=float) < run.th.warmup_residual
        worst("local_gap", layers.loc[past, "local_gap"])
    model = shifts.probe_model(run)
    if len(model):
        for m in ("logits_gap", "recal_pred_change"):
            if m in model:
                worst(m, model[m])
        worst("pred_change", model["disagreement"])
    medians = batches.batch_medians(run)
    if len(medians):
        for m in batches.BATCH_METRICS:
            worst(m, medians[m])
    dead = parameters.dead_fractions(run)
    if len(dead):
        worst("gamma_small_frac", dead.loc[~dead["zero_init"].to_numpy(bool), "dead_frac"])
    levels = variance.variance_levels(run)
    if len(levels):
        worst("var_over_eps", levels["var_over_eps"])
        worst("batch_var_over_eps", levels["zero_over_eps"])
        worst("var_drop", levels["var_drop"])
    worst("momentum", structure.momenta(run))
    div = batches.divergence_rows(run)
    if len(div):
        worst("rank_divergence", div["median_divergence"])
    return out
