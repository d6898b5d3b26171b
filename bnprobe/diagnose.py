"""Findings: BatchNorm problems named in plain words, read from the bnprobe table alone.

:func:`diagnose` takes the tidy table (``BNProbe.to_dataframe()``, :func:`bnprobe.load`,
:func:`bnprobe.read_tensorboard`) and returns one :class:`Finding` per problem and layer: what is
wrong, where, since which step, the evidence, and what to do. One rule function per finding
kind (``RULES``); every threshold is a named constant below, documented in docs/diagnosis.md
together with the values measured on healthy runs.

Two ideas run through the rules:

* **Warm-up.** Running statistics start at mean 0, variance 1 and follow the data as an
  exponential average, ``running <- (1 - m) running + m batch``. After ``n`` updates a fraction
  ``(1 - m)**n`` of the initial values is left; until that fraction drops below
  ``WARMUP_RESIDUAL`` every shift between batch and running statistics is expected, so the
  rules that compare the two only report it as ``info``.
* **Persistence.** Shifts and gaps are judged where they last stood: a problem is reported when
  the latest measurement shows it, with the first step of the unbroken stretch that leads up to
  it. Structural facts (mode, momentum, the layer before) and hard failures (NaN, dead channels)
  are reported from the first step they were seen.

Findings are de-duplicated to one per ``(kind, layer)``: the first step the problem was seen,
and the evidence of the step where it was worst.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from bnprobe import store

# --------------------------------------------------------------------------------------------
# Thresholds. Each rule fires when a measurement is strictly beyond its threshold.
# docs/diagnosis.md lists them with the largest values seen on healthy runs.
# --------------------------------------------------------------------------------------------

WARMUP_RESIDUAL = 0.05
"""Running statistics count as warmed up once less than this fraction of their initial values
(mean 0, variance 1) is left: ``(1 - momentum) ** updates < WARMUP_RESIDUAL``; 29 updates at the
default momentum 0.1. Before that, shifts and train/eval gaps are reported as ``info`` only."""

DEFAULT_MOMENTUM = 0.1
"""Momentum assumed for the warm-up when the table has no ``momentum`` row (PyTorch's default)."""

DEFAULT_EPS = 1e-5
"""``eps`` assumed when the table has no ``eps`` row (PyTorch's default)."""

VAL_MEAN_SHIFT_MAX = 0.75
"""stale_running_stats: validation-stage ``mean_shift`` (channel mean of abs(d), in running
standard deviations) above this means the running mean does not fit the data eval sees."""

VAL_VAR_SHIFT_MAX = 1.0
"""stale_running_stats: validation-stage ``var_shift`` (channel mean of abs(log variance
ratio)) above this: the variances differ by more than a factor e = 2.7."""

VAL_KL_MAX = 0.5
"""stale_running_stats: validation-stage ``kl`` (channel mean of the Gaussian KL divergence)
above this. A pure mean shift of 1 standard deviation gives KL 0.5."""

TRAIN_MEAN_SHIFT_MAX = 1.0
"""stale_running_stats without validation data: the median training-stage ``mean_shift`` over
the last ``TRAIN_WINDOW`` warmed-up steps above this. Higher than ``VAL_MEAN_SHIFT_MAX``
because single training batches add sampling noise that pooled validation moments do not."""

TRAIN_VAR_SHIFT_MAX = 1.0
"""stale_running_stats without validation data: the same for ``var_shift``."""

TRAIN_WINDOW = 5
"""Logged training steps in the rolling median of the training-stage stale rule."""

TRAIN_MIN_STEPS = 3
"""Warmed-up logged training steps the training-stage stale rule needs before it judges."""

LOCAL_GAP_MAX = 0.6
"""train_eval_gap: probe-stage ``local_gap`` of one layer above this (the layer's output in eval
mode differs from its output in train mode by more than 60% of its size)."""

LOGITS_GAP_MAX = 1.0
"""train_eval_gap: probe-stage ``logits_gap`` (relative gap of the model outputs) above this: the
eval-mode outputs differ from the train-mode outputs by more than their own size."""

PRED_AGREEMENT_MIN = 0.5
"""train_eval_gap: probe-stage ``pred_agreement`` below this (more than half the predictions
change between train and eval mode). Barely trained models with near-tied logits flip some
predictions at small gaps, so this limit is loose; ``logits_gap`` is the main signal."""

SMALL_BATCH_MIN_BATCH = 8.0
"""small_batch: median ``batch_size`` (samples along the batch dimension of a layer's input, per
rank under DDP) below this. BatchNorm degrades clearly below 8 samples per device even when
each sample contributes many spatial positions (Wu and He, Group Normalization, 2018)."""

SMALL_BATCH_MIN_SAMPLES = 8.0
"""small_batch: median ``samples_per_channel`` (N·H·W) below this. The standard error of a batch
mean is 1/sqrt(n) standard deviations: 0.35 at n = 8."""

DEAD_CHANNEL_FRAC_MAX = 0.1
"""dead_channels: ``gamma_small_frac`` (fraction of channels with abs(gamma) below 1% of the
largest) above this."""

VAR_COLLAPSE_EPS_FACTOR = 10.0
"""variance_collapse: channel-mean batch or running variance below this many times ``eps``
(or, with per-channel rows, more than ``VAR_COLLAPSE_CHANNEL_FRAC`` of the channels below it)."""

VAR_COLLAPSE_CHANNEL_FRAC = 0.1
"""variance_collapse with per-channel rows: fraction of channels whose batch variance is below
``VAR_COLLAPSE_EPS_FACTOR * eps``."""

VAR_COLLAPSE_DROP = 1e-3
"""variance_collapse over time: batch variance below this fraction of its own peak over earlier
warmed-up steps (a 30-fold drop in scale)."""

FROZEN_MIN_STEPS = 3
"""frozen_bn: logged training steps, with the layer running in training mode, over which the
running statistics must stay unchanged before they count as frozen."""

FROZEN_REL_CHANGE = 1e-9
"""frozen_bn: running statistics (and gamma/beta drift) count as unchanged when they move by less
than this, relative to their size."""

TF_MOMENTUM_MIN = 0.5
"""suspicious_momentum: momentum at or above this is almost surely written in TensorFlow's
convention (the weight of the OLD value), which PyTorch reads as the weight of the NEW batch."""

DROPOUT_BEFORE_BN_MIN_P = 0.0
"""dropout_before_bn: dropout probability of the module feeding the layer above this."""

RANK_DIVERGENCE_MAX = 0.5
"""rank_divergence: the rolling median (``TRAIN_WINDOW`` steps) of the ``rank_divergence``
metric (largest distance of a rank's running statistics from the mean over ranks, over channels:
mean difference in running standard deviations, or abs(log variance ratio)) above this. Ranks
that average their own shuffled batches (``broadcast_buffers=False``) drift apart by sampling
noise alone: up to 0.12 at 32 samples per rank and 0.21 at 16 (BatchNorm1d MLP, 2 CPU ranks);
ranks that see different data (one pair of classes each) are apart by 1.2 to 1.7."""

# --------------------------------------------------------------------------------------------

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
"""Most severe first."""

KINDS: tuple[str, ...] = (
    "stale_running_stats",
    "train_eval_gap",
    "small_batch",
    "dead_channels",
    "variance_collapse",
    "nonfinite",
    "frozen_bn",
    "unused_layer",
    "no_running_stats",
    "suspicious_momentum",
    "bias_before_bn",
    "dropout_before_bn",
    "rank_divergence",
)

DOCS = "docs/diagnosis.md"
"""Where each kind is explained; advice links to ``DOCS#<kind>``."""

REPORT_VERSION = 1
"""``version`` of the JSON document :func:`format_report` writes."""

SUMMARY_METRICS: dict[str, tuple[str, ...]] = {
    "train": ("mean_shift", "var_shift", "gamma_drift", "samples_per_channel"),
    "val": ("mean_shift", "var_shift"),
    "probe": ("local_gap",),
}
"""The latest values shown per layer and stage in :func:`format_report`."""

MODEL_METRICS: tuple[str, ...] = ("logits_gap", "pred_agreement")

_MOMENT_METRICS = ("batch_mean", "batch_var", "running_mean", "running_var")
_AFFINE_METRICS = ("gamma_mean", "gamma_std", "beta_mean", "beta_std", "gamma", "beta")
_NONFINITE_METRICS = frozenset(_MOMENT_METRICS + _AFFINE_METRICS)


@dataclass(frozen=True)
class Finding:
    """One problem of one layer: what, where, since when, the evidence and what to do.

    ``step`` is the first step the problem was seen (None for facts without a step);
    ``evidence`` holds the measurements of the step where it was worst, by metric name.
    """

    kind: str
    severity: str
    layer: str
    message: str
    advice: str
    step: int | None
    evidence: dict[str, float | int | str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(
                f"Finding severity must be one of {', '.join(SEVERITIES)}; got {self.severity!r}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"Finding kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    def __str__(self) -> str:
        where = self.layer if self.step is None else f"{self.layer}, step {self.step}"
        head = f"{self.severity.upper()} {self.kind} ({where})"
        body = _wrap(self.message, "  ")
        fix = _wrap(self.advice, "  Fix: ", "       ")
        return f"{head}\n{body}\n{fix}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the keys kind, severity, layer, step, message, advice,
        evidence."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layer": self.layer,
            "step": self.step,
            "message": self.message,
            "advice": self.advice,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """The inverse of :meth:`to_dict`."""
        step = data.get("step")
        return cls(
            kind=str(data["kind"]),
            severity=str(data["severity"]),
            layer=str(data["layer"]),
            message=str(data["message"]),
            advice=str(data["advice"]),
            step=None if step is None else int(step),
            evidence=dict(data.get("evidence", {})),
        )


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def diagnose(df: pd.DataFrame) -> list[Finding]:
    """Every BatchNorm problem the table shows, most severe first, then by step.

    ``df`` has the bnprobe schema (``store.COLUMNS``). With a ``run`` column holding several
    runs (:func:`bnprobe.read_tensorboard` on a folder of runs) each run is diagnosed on its
    own; its findings carry ``evidence["run"]`` and a message starting with ``[run NAME]``.
    An empty table gives no findings.
    """
    _check_table(df)
    if "run" in df.columns and df["run"].nunique(dropna=False) > 1:
        findings: list[Finding] = []
        order: dict[str, int] = {}
        for run, part in df.groupby("run", sort=False, dropna=False):
            name = str(run)
            order.update({layer: i for i, layer in enumerate(_layer_order(part))})
            for f in _diagnose_run(part):
                evidence: dict[str, float | int | str] = {**f.evidence, "run": name}
                findings.append(replace(f, message=f"[run {name}] {f.message}", evidence=evidence))
        return _sort(findings, order)
    return _diagnose_run(df)


def exit_code(findings: Iterable[Finding], fail_on: str | None) -> int:
    """1 when a finding is at least as severe as ``fail_on`` ("warning" or "error"), else 0.

    ``fail_on=None`` always gives 0. Meant for CI: ``bnprobe report RUN --fail-on warning``.
    """
    if fail_on is not None and fail_on not in ("warning", "error"):
        raise ValueError(f"fail_on must be 'warning', 'error' or None; got {fail_on!r}")
    if fail_on is None:
        return 0
    limit = SEVERITIES.index(fail_on)
    return int(any(SEVERITIES.index(f.severity) <= limit for f in findings))


def format_report(
    df: pd.DataFrame, findings: Sequence[Finding] | None = None, *, fmt: str = "text"
) -> str:
    """A readable report: latest key metrics per layer, then the findings by severity.

    ``findings`` default to ``diagnose(df)``. ``fmt="json"`` gives a JSON document with the
    keys ``version``, ``counts`` (per severity), ``runs`` (one summary per run: ``run``,
    ``steps``, ``layers``, ``model``) and ``findings`` (:meth:`Finding.to_dict`).
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"fmt must be 'text' or 'json'; got {fmt!r}")
    _check_table(df)
    found = list(diagnose(df) if findings is None else findings)
    summaries = _summaries(df)
    counts = {s: sum(f.severity == s for f in found) for s in SEVERITIES}
    if fmt == "json":
        doc = {
            "version": REPORT_VERSION,
            "counts": counts,
            "runs": summaries,
            "findings": [_jsonable(f.to_dict()) for f in found],
        }
        return json.dumps(_jsonable(doc), indent=2, allow_nan=False)
    parts = [_summary_text(s) for s in summaries]
    parts.append(_findings_text(found, counts))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# The run: wide views of the table and what the rules share
# --------------------------------------------------------------------------------------------


class _Run:
    """One run's table with wide per-stage views (rank, layer, step) x metric."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df
        self.order = {layer: i for i, layer in enumerate(_layer_order(df))}
        self._wide: dict[str, pd.DataFrame] = {}
        train = self.wide("train")
        self.momentum: dict[str, float] = {}
        self.eval_only: set[str] = set()
        self.eps: dict[str, float] = {}
        for layer, g in train.groupby("layer", sort=False):
            name = str(layer)
            # rows where the layer ran; there a NaN momentum means momentum=None
            ran = (
                _col(g, "train_mode").notna() if "train_mode" in g else _col(g, "momentum").notna()
            )
            if "momentum" in g and ran.any():
                self.momentum[name] = float(g.loc[ran, "momentum"].iloc[-1])
            mode = _col(g, "train_mode").dropna()
            if len(mode) and float(mode.iloc[-1]) == 0.0:
                self.eval_only.add(name)
            eps = _col(g, "eps").dropna()
            self.eps[name] = float(eps.iloc[-1]) if len(eps) else DEFAULT_EPS

    def wide(self, stage: str) -> pd.DataFrame:
        """Layer-aggregate rows of ``stage`` as columns step, rank, layer, <metric>..."""
        if stage not in self._wide:
            self._wide[stage] = _pivot(self.df, stage)
        return self._wide[stage]

    def channels(self, stage: str, metric: str) -> pd.DataFrame:
        """Per-channel rows of one metric: columns step, rank, layer, channel, value."""
        d = self.df
        sel = (d["stage"] == stage) & (d["metric"] == metric) & d["channel"].notna()
        return d.loc[sel, ["step", "rank", "layer", "channel", "value"]]

    def residual(self, layer: str, step: int) -> float:
        """Fraction of the initial running statistics left after ``step`` updates.

        ``(1 - m) ** step``; 0 when the layer never updates them (eval mode, momentum 0): then
        a mismatch is not a warm-up effect. momentum=None (cumulative average) replaces the
        initial values at the first update.
        """
        if layer in self.eval_only:
            return 0.0
        m = self.momentum.get(layer, DEFAULT_MOMENTUM)
        if math.isnan(m):
            return 0.0 if step >= 1 else 1.0
        if m <= 0.0:
            return 0.0
        return float((1.0 - min(m, 1.0)) ** max(step, 0))

    def warm(self, layer: str, step: int) -> bool:
        return self.residual(layer, step) < WARMUP_RESIDUAL

    def unused(self) -> set[str]:
        """Layers with forward_calls == 0 at every logged training step."""
        train = self.wide("train")
        if "forward_calls" not in train:
            return set()
        calls = train.groupby("layer", sort=False)["forward_calls"]
        return {str(k) for k, v in calls.max().items() if v == 0.0}

    def layer_key(self, layer: str) -> int:
        return self.order.get(layer, len(self.order))


Rule = Callable[[_Run], list[Finding]]


def _diagnose_run(df: pd.DataFrame) -> list[Finding]:
    if len(df) == 0:
        return []
    run = _Run(df)
    findings: list[Finding] = []
    for kind, rule in RULES.items():
        for f in rule(run):
            if f.kind != kind:  # pragma: no cover - a programming error in a rule
                raise RuntimeError(f"rule for {kind} produced a {f.kind} finding")
            findings.append(f)
    return _sort(_dedupe(findings), run.order)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, layer): the most severe, then the earliest."""
    best: dict[tuple[str, str], Finding] = {}
    for f in findings:
        key = (f.kind, f.layer)
        old = best.get(key)
        if old is None or _rank(f) < _rank(old):
            best[key] = f
    return list(best.values())


def _rank(f: Finding) -> tuple[int, float]:
    return SEVERITIES.index(f.severity), math.inf if f.step is None else f.step


def _sort(findings: list[Finding], order: dict[str, int]) -> list[Finding]:
    def key(f: Finding) -> tuple[int, float, int, int]:
        return (*_rank(f), order.get(f.layer, len(order)), KINDS.index(f.kind))

    return sorted(findings, key=key)


# --------------------------------------------------------------------------------------------
# Rules, one per kind
# --------------------------------------------------------------------------------------------


def _advice(kind: str, text: str) -> str:
    return f"{text} See {DOCS}#{kind}."


def rule_stale_running_stats(run: _Run) -> list[Finding]:
    """Running statistics that do not fit the data eval sees.

    With validation rows: the latest validation-stage ``mean_shift``, ``var_shift`` or ``kl``
    beyond ``VAL_*``; the finding starts at the first step of the unbroken stretch of such
    validation epochs that ends with the latest one. Without validation rows: the rolling median
    (``TRAIN_WINDOW`` steps) of the training-stage shifts over warmed-up steps beyond ``TRAIN_*``.
    While the running statistics are still warming up the finding is ``info``.
    """
    out: list[Finding] = []
    val = run.wide("val")
    val_layers = set(val["layer"]) if len(val) else set()
    if len(val):
        score = _score(
            val,
            {"mean_shift": VAL_MEAN_SHIFT_MAX, "var_shift": VAL_VAR_SHIFT_MAX, "kl": VAL_KL_MAX},
        )
        bad = _trailing(val.assign(score=score), score > 1.0, _warm_rows(run, val))
        for layer, first, worst in _episodes(bad):
            step = int(worst["step"])
            latest = int(bad.loc[bad["layer"] == layer, "step"].max())
            warm = run.warm(layer, latest)
            ms, msm = _get(worst, "mean_shift"), _get(worst, "mean_shift_max")
            vs, kl = _get(worst, "var_shift"), _get(worst, "kl")
            numbers = (
                f"mean shift {ms:.2f} std, worst channel {msm:.1f}; "
                f"variance log-ratio {vs:.2f}; KL {kl:.2f}"
            )
            evidence = _evidence(
                worst,
                ("mean_shift", "mean_shift_max", "var_shift", "var_shift_max", "kl", "kl_max"),
                stage="val",
                step_worst=step,
                threshold_mean_shift=VAL_MEAN_SHIFT_MAX,
                threshold_var_shift=VAL_VAR_SHIFT_MAX,
                threshold_kl=VAL_KL_MAX,
            )
            if warm:
                message = (
                    f"Layer {layer}: running statistics do not match the validation data "
                    f"({numbers}) since step {first}. In eval mode this layer normalizes with "
                    "a mean and variance that the data it sees does not have."
                )
                severity = "warning"
            else:
                residual = run.residual(layer, latest)
                evidence["warmup_residual"] = _num(residual)
                message = (
                    f"Layer {layer}: running statistics do not match the validation data yet "
                    f"({numbers}) at step {latest}, but they are still warming up: "
                    f"{residual:.0%} of their initial values (mean 0, variance 1) are left. "
                    "Eval-mode results this early are not representative."
                )
                severity = "info"
            advice = _advice(
                "stale_running_stats",
                "First check that validation data is prepared like training data (same "
                "normalization and transforms). If it should differ, or training is short, "
                "recompute the running statistics on data like the deployment data after "
                "training: `bnprobe.recalibrate(model, loader, num_batches=100)`. "
                "If the statistics lag a fast-changing network, keep momentum at 0.1 or above.",
            )
            out.append(
                Finding("stale_running_stats", severity, layer, message, advice, first, evidence)
            )
    train = _active(run, run.wide("train"))
    if not len(train):
        return out
    train = train[~train["layer"].isin(val_layers)]
    if "train_mode" in train:
        train = train[train["train_mode"] != 0.0]
    warm_rows = _warm_rows(run, train)
    train = train.loc[warm_rows]
    pieces = []
    for _, g in train.groupby(["rank", "layer"], sort=False):
        if len(g) < TRAIN_MIN_STEPS:
            continue
        med = g[[c for c in ("mean_shift", "var_shift") if c in g]].rolling(
            TRAIN_WINDOW, min_periods=TRAIN_MIN_STEPS
        )
        pieces.append(g.assign(**{f"median_{c}": s for c, s in med.median().items()}))
    if not pieces:
        return out
    rolled = pd.concat(pieces)
    score = _score(
        rolled, {"median_mean_shift": TRAIN_MEAN_SHIFT_MAX, "median_var_shift": TRAIN_VAR_SHIFT_MAX}
    )
    bad = _trailing(rolled.assign(score=score), score > 1.0)
    for layer, first, worst in _episodes(bad):
        ms, vs = _get(worst, "median_mean_shift"), _get(worst, "median_var_shift")
        message = (
            f"Layer {layer}: running statistics lag the training batches (median mean shift "
            f"{ms:.2f} std, variance log-ratio {vs:.2f} over the last {TRAIN_WINDOW} logged "
            f"steps) since step {first}. Eval mode will normalize with statistics the data no "
            "longer has. Without validation rows this is judged from training batches only."
        )
        advice = _advice(
            "stale_running_stats",
            "Run validation (with BNProbe attached) to measure the statistics against the data "
            "eval sees. If batches are not shuffled (sorted by class or source), shuffle them. "
            "Recompute the statistics after training: `bnprobe.recalibrate(model, loader)`.",
        )
        evidence = _evidence(
            worst,
            ("median_mean_shift", "median_var_shift", "mean_shift", "var_shift"),
            stage="train",
            step_worst=int(worst["step"]),
            threshold_mean_shift=TRAIN_MEAN_SHIFT_MAX,
            threshold_var_shift=TRAIN_VAR_SHIFT_MAX,
        )
        out.append(
            Finding("stale_running_stats", "warning", layer, message, advice, first, evidence)
        )
    return out


def rule_train_eval_gap(run: _Run) -> list[Finding]:
    """The train/eval probe: outputs that change when BN switches to running statistics.

    Per layer: the latest probe-stage ``local_gap`` above ``LOCAL_GAP_MAX``. For the model
    (layer ``<model>``): the latest ``logits_gap`` above ``LOGITS_GAP_MAX`` or
    ``pred_agreement`` below ``PRED_AGREEMENT_MIN``; a ``warning`` only when a layer is to blame
    (its ``local_gap`` above ``LOCAL_GAP_MAX`` at that probe), else ``info``: small gaps of many
    layers add up in deep nets early in training. ``info`` while running stats warm up.
    """
    probe = run.wide("probe")
    if not len(probe):
        return []
    out: list[Finding] = []
    advice = _advice(
        "train_eval_gap",
        "Read the other findings for the cause (stale_running_stats, small_batch, "
        "dropout_before_bn, suspicious_momentum). Common fixes: recompute the running "
        "statistics after training with `bnprobe.recalibrate(model, loader)`, a larger batch, "
        "no dropout right before a BN layer. Check again on any model and batch with "
        "`bnprobe.check_mismatch(model, batch)`.",
    )
    layers = probe[probe["layer"] != store.MODEL]
    if len(layers) and "local_gap" in layers:
        score = _score(layers, {"local_gap": LOCAL_GAP_MAX})
        bad = _trailing(layers.assign(score=score), score > 1.0, _warm_rows(run, layers))
        for layer, first, worst in _episodes(bad):
            step = int(worst["step"])
            gap = _get(worst, "local_gap")
            evidence = _evidence(
                worst,
                ("local_gap", "output_gap"),
                step_worst=step,
                threshold_local_gap=LOCAL_GAP_MAX,
            )
            warm = run.warm(layer, int(bad.loc[bad["layer"] == layer, "step"].max()))
            message = (
                f"Layer {layer}: its output changes by {gap:.0%} (relative) when it uses its "
                f"running statistics instead of the batch statistics (train/eval probe, since "
                f"step {first})."
            )
            if not warm:
                message += " Its running statistics are still warming up."
            out.append(
                Finding(
                    "train_eval_gap",
                    "warning" if warm else "info",
                    layer,
                    message,
                    advice,
                    first,
                    evidence,
                )
            )
    model = probe[probe["layer"] == store.MODEL]
    if len(model):
        limits = {"logits_gap": LOGITS_GAP_MAX}
        score = _score(model, limits)
        if "pred_agreement" in model:
            agreement = model["pred_agreement"].to_numpy(dtype=float)
            low = (1.0 - agreement) / (1.0 - PRED_AGREEMENT_MIN)
            score = np.asarray(np.fmax(score, np.nan_to_num(low, nan=0.0)), dtype=float)
        watched = [la for la in run.order if la != store.MODEL]
        model_warm = np.array([all(run.warm(la, int(s)) for la in watched) for s in model["step"]])
        bad = _trailing(model.assign(score=score), score > 1.0, model_warm)
        for _, first, worst in _episodes(bad):
            step = int(worst["step"])
            gap, agree = _get(worst, "logits_gap"), _get(worst, "pred_agreement")
            latest = int(bad["step"].max())
            warm = all(run.warm(la, latest) for la in watched)
            at_latest = layers[layers["step"] == latest] if len(layers) else layers
            local = _col(at_latest, "local_gap").to_numpy(dtype=float)
            blamed = bool(np.any(np.nan_to_num(local, nan=0.0, posinf=0.0) > LOCAL_GAP_MAX))
            culprit = ""
            if np.isfinite(local).any():
                top = at_latest.iloc[int(np.nanargmax(np.where(np.isfinite(local), local, -1)))]
                culprit = (
                    f" The largest single-layer gap is at {top['layer']} "
                    f"(local gap {float(top['local_gap']):.2f})."
                )
            message = (
                f"The model's outputs differ between train and eval mode: relative logits gap "
                f"{gap:.0%}, {1.0 - agree:.0%} of predictions change (train/eval probe, since "
                f"step {first}).{culprit}"
            )
            if not warm:
                message += " The running statistics are still warming up."
            elif not blamed:
                message += (
                    f" No single layer's gap exceeds {LOCAL_GAP_MAX:g}: the small gaps of many "
                    "layers add up (part of them is the sampling noise of the probe batch), "
                    "which is common early in training and shrinks as the network settles."
                )
            evidence = _evidence(
                worst,
                ("logits_gap", "pred_agreement"),
                step_worst=step,
                threshold_logits_gap=LOGITS_GAP_MAX,
                threshold_pred_agreement=PRED_AGREEMENT_MIN,
            )
            severity = "warning" if warm and blamed else "info"
            out.append(
                Finding("train_eval_gap", severity, store.MODEL, message, advice, first, evidence)
            )
    return out


def rule_small_batch(run: _Run) -> list[Finding]:
    """Too few samples for reliable batch moments, per layer and rank (the median over the
    logged training steps, so that the short last batch of an epoch does not count):
    ``batch_size`` (samples along the batch dimension, when the table has it) below
    ``SMALL_BATCH_MIN_BATCH``, or ``samples_per_channel`` (N·H·W) below
    ``SMALL_BATCH_MIN_SAMPLES``. The worst rank is reported."""
    train = _active(run, run.wide("train"))
    limits = {"batch_size": SMALL_BATCH_MIN_BATCH, "samples_per_channel": SMALL_BATCH_MIN_SAMPLES}
    present = {m: limit for m, limit in limits.items() if m in train}
    if not present:
        return []
    out: list[Finding] = []
    worst: dict[str, tuple[float, int, pd.DataFrame]] = {}  # layer -> (score, first, group)
    for _, g in train.groupby(["rank", "layer"], sort=False):
        score, small = 0.0, np.zeros(len(g), dtype=bool)
        for m, limit in present.items():
            values = g[m].dropna()
            if len(values) and float(values.median()) < limit:
                score = max(score, limit / max(float(values.median()), 1e-12))
                small |= (g[m] < limit).to_numpy()
        if score == 0.0:
            continue
        layer = str(g["layer"].iloc[0])
        first = int(g.loc[small, "step"].min()) if small.any() else int(g["step"].min())
        old = worst.get(layer)
        if old is None or score > old[0]:
            worst[layer] = (score, min(first, old[1]) if old else first, g)
        else:
            worst[layer] = (old[0], min(first, old[1]), old[2])
    multi_rank = run.df["rank"].nunique() > 1
    for layer, (_, first, g) in worst.items():
        rank = int(g["rank"].iloc[0])
        on_rank = f" on rank {rank}" if multi_rank else ""
        batch = float(_col(g, "batch_size").median())
        samples = float(_col(g, "samples_per_channel").median())
        if not math.isnan(batch) and batch < SMALL_BATCH_MIN_BATCH:
            what = (
                f"batches of only {batch:g} samples (median over {len(g)} logged steps{on_rank}; "
                f"{samples:g} values per channel)"
            )
        else:
            what = (
                f"moments taken over only {samples:g} values per channel (median over {len(g)} "
                f"logged steps{on_rank})"
            )
        message = (
            f"Layer {layer} normalizes each training batch with {what} since step {first}. "
            "Moments from so few samples are noisy: every batch is normalized differently, and "
            "differently from what eval mode will use."
        )
        advice = _advice(
            "small_batch",
            f"Use a larger batch per device (at least {SMALL_BATCH_MIN_BATCH:g} samples). Under "
            "DDP, synchronize the statistics across devices: `Trainer(sync_batchnorm=True)` or "
            "`model = nn.SyncBatchNorm.convert_sync_batchnorm(model)`. Or use a normalization "
            "that does not depend on the batch: `nn.GroupNorm(32, C)` or `nn.LayerNorm(C)`.",
        )
        evidence: dict[str, float | int | str] = {}
        for m in present:
            values = g[m].dropna()
            evidence[f"{m}_median"] = _num(float(values.median()))
            evidence[f"{m}_min"] = _num(float(values.min()))
        evidence |= {
            "logged_steps": len(g),
            "rank": rank,
            "threshold_batch_size": SMALL_BATCH_MIN_BATCH,
            "threshold_samples_per_channel": SMALL_BATCH_MIN_SAMPLES,
        }
        out.append(Finding("small_batch", "warning", layer, message, advice, first, evidence))
    return out


def rule_dead_channels(run: _Run) -> list[Finding]:
    """Channels whose scale gamma is ~0: ``gamma_small_frac`` above ``DEAD_CHANNEL_FRAC_MAX``
    at any logged training step (every gamma exactly 0 counts as all channels dead)."""
    train = _active(run, run.wide("train"))
    if "gamma_small_frac" not in train:
        return []
    frac = train["gamma_small_frac"].to_numpy(dtype=float)
    all_zero = (_col(train, "gamma_mean").abs() == 0.0) & (_col(train, "gamma_std").abs() == 0.0)
    frac = np.where(all_zero.to_numpy(), 1.0, frac)
    train = train.assign(dead_frac=frac, score=np.nan_to_num(frac / DEAD_CHANNEL_FRAC_MAX))
    bad = train[train["score"] > 1.0]
    out = []
    for layer, first, worst in _episodes(bad):
        latest = train[train["layer"] == layer].sort_values("step").iloc[-1]
        worst_frac, last_frac = float(worst["dead_frac"]), float(latest["dead_frac"])
        message = (
            f"Layer {layer}: {worst_frac:.0%} of its channels have a scale gamma near zero "
            f"(below 1% of the largest) since step {first}; {last_frac:.0%} at step "
            f"{int(latest['step'])}. Those channels output only their shift beta and pass no "
            "signal on."
        )
        advice = _advice(
            "dead_channels",
            "Exclude BN parameters from weight decay (an optimizer parameter group with "
            "`weight_decay=0` for every `bn.weight` and `bn.bias`), check any L1 penalty on "
            "gamma (network slimming: then prune those channels on purpose) and any code that "
            "writes `bn.weight`, and try a lower learning rate.",
        )
        evidence = _evidence(
            worst,
            ("gamma_mean", "gamma_std"),
            gamma_small_frac=worst_frac,
            gamma_small_frac_latest=last_frac,
            step_worst=int(worst["step"]),
            threshold=DEAD_CHANNEL_FRAC_MAX,
        )
        out.append(Finding("dead_channels", "warning", layer, message, advice, first, evidence))
    return out


def rule_variance_collapse(run: _Run) -> list[Finding]:
    """Inputs whose variance is (nearly) gone.

    Channel-mean ``batch_var`` or ``running_var`` below ``VAR_COLLAPSE_EPS_FACTOR * eps``; more
    than ``VAR_COLLAPSE_CHANNEL_FRAC`` of the channels below it (the ``var_small_frac`` metric,
    or per-channel rows); or the
    batch variance fallen below ``VAR_COLLAPSE_DROP`` times its earlier peak.
    """
    train = _active(run, run.wide("train"))
    if not len(train):
        return []
    eps = train["layer"].map(lambda la: run.eps.get(str(la), DEFAULT_EPS)).to_numpy(dtype=float)
    floor = VAR_COLLAPSE_EPS_FACTOR * eps
    bv = _col(train, "batch_var").to_numpy(dtype=float)
    rv = _col(train, "running_var").to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        tiny = np.nan_to_num(np.fmax(floor / bv, floor / rv), nan=0.0, posinf=1e12)
    warm = _warm_rows(run, train)
    peak = (
        train.assign(bv_warm=np.where(warm, bv, np.nan))
        .groupby(["rank", "layer"], sort=False)["bv_warm"]
        .transform(lambda s: s.cummax().shift(1))
        .to_numpy(dtype=float)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.nan_to_num(VAR_COLLAPSE_DROP * peak / bv, nan=0.0, posinf=1e12)
    drop = np.where(warm, drop, 0.0)
    cols = train.assign(
        eps=eps, peak_batch_var=peak, score_tiny=tiny, score_drop=drop, score=np.fmax(tiny, drop)
    )
    cols = _with_channel_collapse(run, cols)
    bad = cols[cols["score"] > 1.0]
    out = []
    for layer, first, worst in _episodes(bad):
        bvw, rvw, e = _get(worst, "batch_var"), _get(worst, "running_var"), _get(worst, "eps")
        step = int(worst["step"])
        if _get(worst, "score_channels") > 1.0 and worst["score_channels"] == worst["score"]:
            what = (
                f"{_get(worst, 'collapsed_frac'):.0%} of its channels have a batch variance "
                f"below {VAR_COLLAPSE_EPS_FACTOR:g} x eps = {VAR_COLLAPSE_EPS_FACTOR * e:.1e}"
            )
        elif worst["score_drop"] >= worst["score_tiny"]:
            what = (
                f"the variance of its input fell from {_get(worst, 'peak_batch_var'):.3g} to "
                f"{bvw:.3g}, a {_get(worst, 'peak_batch_var') / bvw:.0f}-fold drop"
            )
        else:
            what = (
                f"the variance of its input is tiny (mean batch variance {bvw:.2g}, running "
                f"variance {rvw:.2g}; eps = {e:g})"
            )
        message = (
            f"Layer {layer}: {what} (since step {first}, worst at step {step}). BatchNorm "
            "divides by sqrt(var + eps): with a variance this close to eps the output no longer "
            "has unit variance, and the division amplifies noise and rounding."
        )
        advice = _advice(
            "variance_collapse",
            "Look upstream for what makes the input (nearly) constant: dead ReLUs, zeroed or "
            "tiny weights, a saturated activation, inputs in very small units. Check the weight "
            "initialization and learning rate, and rescale the inputs; if tiny variances are "
            "expected, lower `eps` (e.g. `nn.BatchNorm2d(C, eps=1e-8)`).",
        )
        evidence = _evidence(
            worst,
            ("batch_var", "running_var", "peak_batch_var", "collapsed_frac"),
            eps=e,
            step_worst=step,
            threshold_eps_factor=VAR_COLLAPSE_EPS_FACTOR,
            threshold_drop=VAR_COLLAPSE_DROP,
        )
        out.append(Finding("variance_collapse", "warning", layer, message, advice, first, evidence))
    return out


def _with_channel_collapse(run: _Run, cols: pd.DataFrame) -> pd.DataFrame:
    """Add ``collapsed_frac`` and ``score_channels``: the fraction of channels whose batch
    variance is below ``VAR_COLLAPSE_EPS_FACTOR * eps``, from the ``var_small_frac`` metric when
    the table has it, else from per-channel ``batch_var`` rows."""
    if "var_small_frac" in cols:
        frac_given = cols["var_small_frac"].to_numpy(dtype=float)
        score = np.nan_to_num(frac_given) / VAR_COLLAPSE_CHANNEL_FRAC
        return cols.assign(
            collapsed_frac=frac_given, score_channels=score, score=np.fmax(cols["score"], score)
        )
    chan = run.channels("train", "batch_var")
    if not len(chan):
        return cols.assign(collapsed_frac=np.nan, score_channels=0.0)
    eps = chan["layer"].map(lambda la: run.eps.get(str(la), DEFAULT_EPS)).to_numpy(dtype=float)
    low = chan["value"].to_numpy(dtype=float) < VAR_COLLAPSE_EPS_FACTOR * eps
    frac = (
        chan.assign(low=low.astype(float))
        .groupby(["rank", "layer", "step"], sort=False)["low"]
        .mean()
        .rename("collapsed_frac")
        .reset_index()
    )
    merged = cols.merge(frac, on=["rank", "layer", "step"], how="left")
    score = np.nan_to_num(merged["collapsed_frac"].to_numpy(dtype=float)) / (
        VAR_COLLAPSE_CHANNEL_FRAC
    )
    return merged.assign(score_channels=score, score=np.fmax(merged["score"], score))


def rule_nonfinite(run: _Run) -> list[Finding]:
    """NaN or inf in the batch moments, running statistics or affine parameters (an error):
    a ``nonfinite`` count above 0, or a non-finite value of a moment or parameter row, at the
    training or validation stage. Reported from the first step, per layer."""
    d = run.df
    unused = run.unused()
    stage_ok = d["stage"].isin(["train", "val"]) & ~d["layer"].isin(unused)
    counted = (d["metric"] == "nonfinite") & (d["value"] > 0)
    values = d["value"].to_numpy(dtype=float)
    moments = d["metric"].isin(_NONFINITE_METRICS) & ~np.isfinite(values)
    bad = d[stage_ok & (counted | moments)]
    if not len(bad):
        return []
    stage_order = bad["stage"].map({"train": 0, "val": 1})
    bad = bad.assign(stage_order=stage_order).sort_values(["step", "stage_order"], kind="stable")
    firsts = bad.groupby("layer", sort=False)["step"].min()
    origin_step = int(firsts.min())
    origin = min((str(la) for la, s in firsts.items() if s == origin_step), key=run.layer_key)
    train = run.wide("train")
    out = []
    for layer, g in bad.groupby("layer", sort=False):
        name = str(layer)
        first_row = g.iloc[0]
        first, stage, rank = int(first_row["step"]), str(first_row["stage"]), int(first_row["rank"])
        at_first = g[(g["step"] == first) & (g["stage"] == stage)]
        names = sorted(set(at_first["metric"]) - {"nonfinite"})
        count = g.loc[g["metric"] == "nonfinite", "value"]
        channels = int(count.max()) if len(count) else 0
        last = train[train["layer"] == name].sort_values("step")
        poisoned = False
        if len(last):
            tail = last.iloc[-1]
            poisoned = any(
                not math.isfinite(_get(tail, m, 0.0)) for m in ("running_mean", "running_var")
            )
        what = _nonfinite_what(names, channels)
        on_rank = f", rank {rank}" if run.df["rank"].nunique() > 1 else ""
        message = f"Layer {name}: NaN or inf in {what} at step {first} ({stage} stage{on_rank})."
        if name == origin:
            message += " This is the first layer where it appears."
        else:
            message += (
                f" It appeared first in layer {origin} at step {origin_step} and most likely "
                "flows from there."
            )
        if poisoned:
            message += (
                " The running statistics are non-finite from then on: every eval-mode output "
                "of this layer is NaN."
            )
        advice = _advice(
            "nonfinite",
            "Find the source: check the inputs (`assert torch.isfinite(x).all()`), lower the "
            "learning rate or clip gradients (`Trainer(gradient_clip_val=1.0)`), and run a few "
            "steps under `torch.autograd.set_detect_anomaly(True)`. One bad batch poisons the "
            "running statistics for good: reset them (`bn.reset_running_stats()`) and recompute "
            "them with `bnprobe.recalibrate(model, loader)`, or go back to an earlier "
            "checkpoint.",
        )
        evidence: dict[str, float | int | str] = {
            "stage": stage,
            "rank": rank,
            "metrics": ", ".join(names) if names else "nonfinite",
            "nonfinite_channels": channels,
            "running_stats_nonfinite": int(poisoned),
            "origin_layer": origin,
            "origin_step": origin_step,
        }
        out.append(Finding("nonfinite", "error", name, message, advice, first, evidence))
    return out


def _nonfinite_what(names: Sequence[str], channels: int) -> str:
    parts = []
    if channels or any(n.startswith("batch_") for n in names):
        parts.append(
            f"the batch moments ({channels} channels)" if channels else "the batch moments"
        )
    if any(n.startswith("running_") for n in names):
        parts.append("the running statistics")
    if any(n.startswith(("gamma", "beta")) for n in names):
        parts.append("the affine parameters gamma/beta")
    return " and ".join(parts) or "its measurements"


def rule_frozen_bn(run: _Run) -> list[Finding]:
    """A BN layer that does not learn while the model trains.

    ``warning``: the layer is in eval mode (``train_mode`` 0) while the model is in training
    mode; or its running statistics never change over at least ``FROZEN_MIN_STEPS`` logged
    training steps (momentum 0, ``track_running_stats`` switched off with buffers kept).
    ``info``: gamma and beta never move while other layers' parameters do.
    """
    train = _active(run, run.wide("train"))
    if not len(train):
        return []
    out = []
    model_mode = _col(train, "model_train_mode").fillna(1.0)
    in_eval = (_col(train, "train_mode") == 0.0) & (model_mode != 0.0)
    bad = train[in_eval.to_numpy()].assign(score=1.0)
    for layer, first, _ in _episodes(bad):
        rows = train[train["layer"] == layer]
        k = int((bad["layer"] == layer).sum())
        message = (
            f"Layer {layer} is in eval mode while the model trains ({k} of {len(rows)} logged "
            f"training steps since step {first}). It normalizes with its running statistics "
            "and never updates them, so eval mode uses statistics that never saw this training."
        )
        advice = _advice(
            "frozen_bn",
            "If it is not intended, find the code that calls `.eval()` on this layer (a "
            "`train()` override, a freezing helper, `model.apply(...)`) and remove it. If it is "
            "intended (fine-tuning with frozen BN), load running statistics from a model "
            "trained on similar data, and this warning is expected.",
        )
        evidence: dict[str, float | int | str] = {
            "train_mode": 0,
            "model_train_mode": 1,
            "steps_in_eval_mode": k,
            "logged_steps": len(rows),
        }
        out.append(Finding("frozen_bn", "warning", layer, message, advice, first, evidence))
    flagged = set(bad["layer"])
    out += _frozen_running_stats(run, train, flagged)
    out += _frozen_affine(train, flagged | {f.layer for f in out})
    return out


def _frozen_running_stats(run: _Run, train: pd.DataFrame, skip: set[str]) -> list[Finding]:
    if "running_mean" not in train or "running_var" not in train:
        return []
    out = []
    for layer, g in train.groupby("layer", sort=False):
        name = str(layer)
        if name in skip:
            continue
        g = g[g["running_mean"].notna() & g["running_var"].notna()]
        steps = g["step"].nunique()
        if steps < FROZEN_MIN_STEPS:
            continue
        unchanged = True
        for _, r in g.groupby("rank", sort=False):
            for col in ("running_mean", "running_var"):
                x = r[col].to_numpy(dtype=float)
                scale = max(float(np.max(np.abs(x))), 1e-12)
                if np.max(np.abs(x - x[0])) > FROZEN_REL_CHANGE * scale:
                    unchanged = False
        if not unchanged:
            continue
        first, last = int(g["step"].min()), int(g["step"].max())
        momentum = run.momentum.get(name, DEFAULT_MOMENTUM)
        tracked = _col(g, "has_running_stats")
        why = ""
        if momentum == 0.0:
            why = " Its momentum is 0, so its running statistics never update."
        elif len(tracked.dropna()) and float(tracked.dropna().iloc[-1]) == 0.0:
            why = (
                " It does not track running statistics (track_running_stats=False) but keeps "
                "its buffers, which eval mode still uses."
            )
        message = (
            f"Layer {name}: its running statistics never changed over {steps} logged training "
            f"steps (steps {first} to {last}) while the model trained.{why} Eval mode will "
            "normalize with statistics that never saw the data."
        )
        advice = _advice(
            "frozen_bn",
            "Check `momentum` (0 means never update; PyTorch's default is 0.1), "
            "`track_running_stats` (switched off after construction, the layer stops updating "
            "its buffers but eval mode still uses them), and any code that restores or "
            "overwrites `running_mean`/`running_var` during training.",
        )
        evidence: dict[str, float | int | str] = {
            "running_mean": _num(float(g["running_mean"].iloc[-1])),
            "running_var": _num(float(g["running_var"].iloc[-1])),
            "logged_steps": steps,
            "momentum": _num(momentum),
        }
        out.append(Finding("frozen_bn", "warning", name, message, advice, first, evidence))
    return out


def _frozen_affine(train: pd.DataFrame, skip: set[str]) -> list[Finding]:
    if "gamma_drift" not in train or "beta_drift" not in train:
        return []
    later = train[train["step"] > train["step"].min()]
    drift = later[["gamma_drift", "beta_drift"]].abs().max(axis=1)
    moving = later.loc[drift > FROZEN_REL_CHANGE, "layer"]
    if not len(moving):
        return []  # nothing moves at all (lr 0, or too few steps): no comparison possible
    out = []
    for layer, g in later.groupby("layer", sort=False):
        name = str(layer)
        d = g[["gamma_drift", "beta_drift"]].dropna()
        if name in skip or len(d) < FROZEN_MIN_STEPS - 1:
            continue
        if float(d.abs().to_numpy().max()) > FROZEN_REL_CHANGE:
            continue
        first = int(train.loc[train["layer"] == name, "step"].min())
        message = (
            f"Layer {name}: gamma and beta did not change over {len(d) + 1} logged training "
            "steps while other layers' parameters did: its affine parameters are frozen "
            "(requires_grad=False, or left out of the optimizer)."
        )
        advice = _advice(
            "frozen_bn",
            "Fine if intended. Otherwise check `bn.weight.requires_grad` and that the layer's "
            "parameters are in the optimizer (`configure_optimizers`).",
        )
        evidence: dict[str, float | int | str] = {
            "gamma_drift": 0.0,
            "beta_drift": 0.0,
            "logged_steps": len(d) + 1,
        }
        out.append(Finding("frozen_bn", "info", name, message, advice, first, evidence))
    return out


def rule_unused_layer(run: _Run) -> list[Finding]:
    """A BN layer that never ran: ``forward_calls`` 0 at every logged training step."""
    train = run.wide("train")
    out = []
    for layer in sorted(run.unused(), key=run.layer_key):
        rows = train[train["layer"] == layer]
        first = int(rows["step"].min())
        message = (
            f"Layer {layer} was never called: forward_calls is 0 at all {len(rows)} logged "
            "training steps. Its running statistics keep their initial values and its "
            "parameters get no gradient."
        )
        advice = _advice(
            "unused_layer",
            "If the layer should be used, call it in `forward()` (a common slip: defining "
            "`self.bn2` but applying `self.bn1` twice). If it is left over, delete it, or watch "
            "only the layers in use with `BNProbe(layers=[...])`.",
        )
        evidence: dict[str, float | int | str] = {"forward_calls": 0, "logged_steps": len(rows)}
        out.append(Finding("unused_layer", "warning", layer, message, advice, first, evidence))
    return out


def rule_no_running_stats(run: _Run) -> list[Finding]:
    """A layer without running statistics (``has_running_stats`` 0 and no running-moment rows):
    eval mode normalizes with the statistics of whatever batch it gets (``info``)."""
    train = _active(run, run.wide("train"))
    if "has_running_stats" not in train:
        return []
    bad = train[train["has_running_stats"] == 0.0]
    out = []
    running = _col(train, "running_mean").notna()
    for layer, first, _ in _episodes(bad.assign(score=1.0)):
        if running[train["layer"] == layer].any():
            continue  # buffers kept but not updated: frozen_bn reports it
        message = (
            f"Layer {layer} keeps no running statistics (track_running_stats=False): in eval "
            "mode it normalizes with the statistics of the batch it is given, so an eval "
            "output depends on the other samples in its batch, and a batch of one sample "
            "cannot be normalized."
        )
        advice = _advice(
            "no_running_stats",
            "Fine if intended (e.g. GAN discriminators, test-time adaptation). Otherwise "
            "create the layer with `track_running_stats=True` (the default), or evaluate with "
            "fixed, large batches.",
        )
        evidence: dict[str, float | int | str] = {"has_running_stats": 0}
        out.append(Finding("no_running_stats", "info", layer, message, advice, first, evidence))
    return out


def rule_suspicious_momentum(run: _Run) -> list[Finding]:
    """``momentum`` at or above ``TF_MOMENTUM_MIN`` (``warning``): a TensorFlow-convention value.
    ``momentum=None`` (cumulative average) is ``info``."""
    train = _active(run, run.wide("train"))
    if "momentum" not in train:
        return []
    has_stats = _col(train, "has_running_stats").fillna(1.0) != 0.0
    rows = train[has_stats.to_numpy() & _col(train, "train_mode").notna().to_numpy()]
    out = []
    for layer, g in rows.groupby("layer", sort=False):
        name = str(layer)
        m = g["momentum"].to_numpy(dtype=float)
        first = int(g["step"].min())
        if np.isnan(m).any():
            message = (
                f"Layer {name} uses momentum=None: its running statistics are a cumulative "
                "average over every batch since the start, so the batches of the early, "
                "untrained network weigh as much as the latest ones."
            )
            advice = _advice(
                "suspicious_momentum",
                "That suits a recalibration pass after training; while training, use an "
                "exponential average (`momentum=0.1`), or recompute the statistics after "
                "training with `bnprobe.recalibrate(model, loader)`.",
            )
            evidence: dict[str, float | int | str] = {"momentum": "None"}
            out.append(
                Finding("suspicious_momentum", "info", name, message, advice, first, evidence)
            )
            continue
        worst = float(np.max(m))
        if worst < TF_MOMENTUM_MIN:
            continue
        message = (
            f"Layer {name} has momentum {worst:g}. In PyTorch momentum is the weight of the NEW "
            "batch (running = (1 - momentum) * running + momentum * batch), the opposite of "
            "TensorFlow/Keras, where 0.9 or 0.99 keeps 90-99% of the old value. With "
            f"{worst:g} the running statistics are mostly the last batch: eval mode normalizes "
            "with the statistics of one noisy batch."
        )
        advice = _advice(
            "suspicious_momentum",
            f"Use `momentum={1.0 - worst:.2g}` (1 minus the TensorFlow value) or PyTorch's "
            "default: `nn.BatchNorm2d(C, momentum=0.1)`.",
        )
        evidence = {"momentum": _num(worst), "threshold": TF_MOMENTUM_MIN}
        out.append(
            Finding("suspicious_momentum", "warning", name, message, advice, first, evidence)
        )
    return out


def rule_bias_before_bn(run: _Run) -> list[Finding]:
    """The module feeding the layer is a conv/linear with a bias (``input_bias`` 1; ``info``):
    BN subtracts the batch mean, which cancels any per-channel constant."""
    train = run.wide("train")
    if "input_bias" not in train:
        return []
    bad = train[train["input_bias"] == 1.0].assign(score=1.0)
    out = []
    for layer, first, _ in _episodes(bad):
        message = (
            f"Layer {layer} follows a convolution or linear layer with a bias. BatchNorm "
            "subtracts the batch mean, which cancels any per-channel constant, so that bias "
            "has no effect on the output: its parameters are wasted and their gradient is zero."
        )
        advice = _advice(
            "bias_before_bn",
            "Create the layer before BN with `bias=False`, e.g. "
            "`nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)` or "
            "`nn.Linear(d_in, d_out, bias=False)`; BN's beta already provides the shift.",
        )
        evidence: dict[str, float | int | str] = {"input_bias": 1}
        out.append(Finding("bias_before_bn", "info", layer, message, advice, first, evidence))
    return out


def rule_dropout_before_bn(run: _Run) -> list[Finding]:
    """The module feeding the layer is dropout with p above ``DROPOUT_BEFORE_BN_MIN_P``
    (``input_dropout``): the variance shift of Li et al. (2019)."""
    train = run.wide("train")
    if "input_dropout" not in train:
        return []
    bad = train[train["input_dropout"] > DROPOUT_BEFORE_BN_MIN_P]
    out = []
    for layer, first, worst in _episodes(bad.assign(score=bad["input_dropout"])):
        p = float(worst["input_dropout"])
        message = (
            f"Layer {layer} takes its input straight from dropout (p={p:g}). In training, "
            f"dropout zeroes a fraction {p:g} of the values and scales the rest by "
            f"1/(1-p) = {1.0 / (1.0 - p):.2g}; in eval mode it does nothing. So the variance "
            "this layer sees in training is larger than at inference, and its running variance "
            "does not fit eval-mode inputs (the 'variance shift' of Li et al., 2019)."
        )
        advice = _advice(
            "dropout_before_bn",
            "Move dropout after the last BatchNorm layer (e.g. just before the classifier), "
            "or lower p. If you keep it, recompute the running statistics after training with "
            "dropout off: `bnprobe.recalibrate(model, loader)`.",
        )
        evidence: dict[str, float | int | str] = {
            "input_dropout": _num(p),
            "threshold": DROPOUT_BEFORE_BN_MIN_P,
        }
        out.append(Finding("dropout_before_bn", "warning", layer, message, advice, first, evidence))
    return out


def rule_rank_divergence(run: _Run) -> list[Finding]:
    """Running statistics that differ between DDP ranks, persistently: the rolling median over
    ``TRAIN_WINDOW`` logged steps of the ``rank_divergence`` metric above
    ``RANK_DIVERGENCE_MAX`` at the latest step. Tables without that metric but with rows of
    several ranks: the difference of each rank's running statistics from rank 0's (channel-mean
    running mean difference in rank-0 running standard deviations, or abs(log variance
    ratio)) instead."""
    train = _active(run, run.wide("train"))
    if not len(train):
        return []
    if "rank_divergence" in train:
        given = train[train["rank_divergence"].notna()]
        rows = given.assign(divergence=given["rank_divergence"], other_rank=-1)
    elif train["rank"].nunique() > 1 and "running_mean" in train and "running_var" in train:
        rows = _cross_rank(run, train)
    else:
        return []
    if not len(rows):
        return []
    rows = rows.sort_values(["rank", "layer", "step"], kind="stable").reset_index(drop=True)
    median = rows.groupby(["rank", "layer"], sort=False)["divergence"].transform(
        lambda x: x.rolling(TRAIN_WINDOW, min_periods=TRAIN_MIN_STEPS).median()
    )
    rows = rows.assign(median_divergence=median, score=median.to_numpy(float) / RANK_DIVERGENCE_MAX)
    bad = _trailing(rows, np.nan_to_num(rows["score"].to_numpy(float)) > 1.0)
    out = []
    for layer, first, worst in _episodes(bad):
        x = float(worst["median_divergence"])
        other = int(worst["other_rank"])
        versus = f", rank {other} vs rank 0" if other >= 0 else ""
        message = (
            f"Layer {layer}: running statistics differ between DDP ranks (divergence {x:.2f}, "
            f"median of {TRAIN_WINDOW} logged steps{versus}) since step {first}. Each rank "
            "evaluates with different statistics, and a checkpoint saved by rank 0 holds only "
            "rank 0's."
        )
        advice = _advice(
            "rank_divergence",
            "Keep DDP's default `broadcast_buffers=True`, or synchronize BN: "
            "`Trainer(sync_batchnorm=True)` or "
            "`model = nn.SyncBatchNorm.convert_sync_batchnorm(model)`. Make sure every rank sees "
            "a shuffled sample of the same data (DistributedSampler with shuffle=True).",
        )
        evidence: dict[str, float | int | str] = {
            "rank_divergence_median": _num(x),
            "rank_divergence": _num(float(worst["divergence"])),
            "step_worst": int(worst["step"]),
            "threshold": RANK_DIVERGENCE_MAX,
        }
        if other >= 0:
            evidence["rank"] = other
        out.append(Finding("rank_divergence", "warning", layer, message, advice, first, evidence))
    return out


def _cross_rank(run: _Run, train: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, step, rank != 0): how far that rank's running statistics are from rank 0's."""
    base_rank = int(train["rank"].min())
    base = train[train["rank"] == base_rank][["layer", "step", "running_mean", "running_var"]]
    others = train[train["rank"] != base_rank][
        ["layer", "step", "rank", "running_mean", "running_var"]
    ]
    m = others.merge(base, on=["layer", "step"], suffixes=("", "_base"))
    eps = m["layer"].map(lambda la: run.eps.get(str(la), DEFAULT_EPS)).to_numpy(dtype=float)
    rv0 = m["running_var_base"].to_numpy(dtype=float) + eps
    rv = m["running_var"].to_numpy(dtype=float) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        dm = np.abs(m["running_mean"].to_numpy(dtype=float) - m["running_mean_base"]) / np.sqrt(rv0)
        dv = np.abs(np.log(rv / rv0))
    div = np.fmax(np.nan_to_num(np.asarray(dm, dtype=float)), np.nan_to_num(dv))
    return m.assign(divergence=div, other_rank=m["rank"].astype(int))


RULES: dict[str, Rule] = {
    "stale_running_stats": rule_stale_running_stats,
    "train_eval_gap": rule_train_eval_gap,
    "small_batch": rule_small_batch,
    "dead_channels": rule_dead_channels,
    "variance_collapse": rule_variance_collapse,
    "nonfinite": rule_nonfinite,
    "frozen_bn": rule_frozen_bn,
    "unused_layer": rule_unused_layer,
    "no_running_stats": rule_no_running_stats,
    "suspicious_momentum": rule_suspicious_momentum,
    "bias_before_bn": rule_bias_before_bn,
    "dropout_before_bn": rule_dropout_before_bn,
    "rank_divergence": rule_rank_divergence,
}
"""One rule per finding kind, in ``KINDS`` order."""


CALIBRATION: dict[str, tuple[str, str]] = {
    "val_mean_shift": ("VAL_MEAN_SHIFT_MAX", "max"),
    "val_var_shift": ("VAL_VAR_SHIFT_MAX", "max"),
    "val_kl": ("VAL_KL_MAX", "max"),
    "train_median_mean_shift": ("TRAIN_MEAN_SHIFT_MAX", "max"),
    "train_median_var_shift": ("TRAIN_VAR_SHIFT_MAX", "max"),
    "local_gap": ("LOCAL_GAP_MAX", "max"),
    "logits_gap": ("LOGITS_GAP_MAX", "max"),
    "pred_agreement": ("PRED_AGREEMENT_MIN", "min"),
    "batch_size": ("SMALL_BATCH_MIN_BATCH", "min"),
    "samples_per_channel": ("SMALL_BATCH_MIN_SAMPLES", "min"),
    "gamma_small_frac": ("DEAD_CHANNEL_FRAC_MAX", "max"),
    "var_over_eps": ("VAR_COLLAPSE_EPS_FACTOR", "min"),
    "var_drop": ("VAR_COLLAPSE_DROP", "min"),
    "momentum": ("TF_MOMENTUM_MIN", "max"),
    "rank_divergence": ("RANK_DIVERGENCE_MAX", "max"),
}
"""What :func:`worst_values` measures: name -> (the threshold constant it is compared with,
whether the rule fires above it ("max") or below it ("min"))."""


def worst_values(df: pd.DataFrame) -> dict[str, float]:
    """The worst value of every quantity a threshold is compared with, over one run.

    Measured the way the rules see it: shifts and gaps only at warmed-up steps, training shifts
    as the rolling median, batch sizes as the per-layer median; "worst" is the maximum for
    quantities that fire above their threshold and the minimum for the others (``CALIBRATION``).
    NaN where the table lacks the metric. This is how the thresholds were calibrated on healthy
    runs (``python examples/pathologies.py --calibrate``).
    """
    _check_table(df)
    run = _Run(df)
    out = dict.fromkeys(CALIBRATION, math.nan)

    def worst(name: str, values: pd.Series | np.ndarray) -> None:
        arr = np.asarray(values, dtype=float)
        arr = arr[np.isfinite(arr)]
        if arr.size:
            out[name] = float(arr.max() if CALIBRATION[name][1] == "max" else arr.min())

    val = run.wide("val")
    if len(val):
        warm = val.loc[_warm_rows(run, val)]
        for m in ("mean_shift", "var_shift", "kl"):
            worst(f"val_{m}", _col(warm, m))
    train = _active(run, run.wide("train"))
    if len(train):
        moving = train[_col(train, "train_mode").fillna(1.0).to_numpy() != 0.0]
        moving = moving.loc[_warm_rows(run, moving)]
        for m in ("mean_shift", "var_shift"):
            if m in moving and len(moving):
                med = moving.groupby(["rank", "layer"], sort=False)[m].transform(
                    lambda x: x.rolling(TRAIN_WINDOW, min_periods=TRAIN_MIN_STEPS).median()
                )
                worst(f"train_median_{m}", med)
        for m in ("batch_size", "samples_per_channel"):
            if m in train:
                worst(m, train.groupby(["rank", "layer"], sort=False)[m].median())
        worst("gamma_small_frac", _col(train, "gamma_small_frac"))
        eps = train["layer"].map(lambda la: run.eps.get(str(la), DEFAULT_EPS)).to_numpy(float)
        var = np.fmin(_col(train, "batch_var").to_numpy(float), _col(train, "running_var"))
        worst("var_over_eps", var / eps)
        warm_bv = np.where(_warm_rows(run, train), _col(train, "batch_var"), np.nan)
        peak = (
            train.assign(_bv=warm_bv)
            .groupby(["rank", "layer"], sort=False)["_bv"]
            .transform(lambda x: x.cummax().shift(1))
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            worst("var_drop", np.where(warm_bv > 0, warm_bv / peak.to_numpy(float), np.nan))
        worst("momentum", _col(train, "momentum"))
        if "rank_divergence" in train:
            div = train[train["rank_divergence"].notna()].sort_values("step", kind="stable")
            med = div.groupby("layer", sort=False)["rank_divergence"].transform(
                lambda x: x.rolling(TRAIN_WINDOW, min_periods=TRAIN_MIN_STEPS).median()
            )
            worst("rank_divergence", med)
    probe = run.wide("probe")
    if len(probe):
        layers = probe[probe["layer"] != store.MODEL]
        worst("local_gap", _col(layers.loc[_warm_rows(run, layers)], "local_gap"))
        model = probe[probe["layer"] == store.MODEL]
        watched = [la for la in run.order if la != store.MODEL]
        warm_model = [all(run.warm(la, int(s)) for la in watched) for s in model["step"]]
        model = model.loc[np.array(warm_model, dtype=bool)]
        worst("logits_gap", _col(model, "logits_gap"))
        worst("pred_agreement", _col(model, "pred_agreement"))
    return out


# --------------------------------------------------------------------------------------------
# Table helpers
# --------------------------------------------------------------------------------------------


def _check_table(df: object) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(
            f"expected a pandas DataFrame with the bnprobe schema; got {type(df).__name__}. "
            "Use BNProbe.to_dataframe(), bnprobe.load(path) or bnprobe.read_tensorboard(path)."
        )
    missing = [c for c in store.COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"the table is missing columns {missing}; a bnprobe table has the columns "
            f"{list(store.COLUMNS)} (BNProbe.to_dataframe(), bnprobe.load, "
            "bnprobe.read_tensorboard)"
        )


def _layer_order(df: pd.DataFrame) -> list[str]:
    return [str(x) for x in pd.unique(df["layer"])]


def _pivot(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """Layer-aggregate rows of one stage, one row per (rank, layer, step), one column per
    metric, sorted by rank, layer (in table order) and step."""
    sel = df[(df["stage"] == stage) & df["channel"].isna()]
    if not len(sel):
        return pd.DataFrame({"rank": [], "layer": [], "step": []}).astype(
            {"rank": "int64", "layer": object, "step": "int64"}
        )
    sel = sel.drop_duplicates(["rank", "layer", "step", "metric"], keep="last")
    wide = sel.pivot(index=["rank", "layer", "step"], columns="metric", values="value")
    wide.columns = [str(c) for c in wide.columns]
    wide = wide.reset_index()
    order = {la: i for i, la in enumerate(_layer_order(sel))}
    wide = wide.assign(_order=wide["layer"].map(order)).sort_values(
        ["rank", "_order", "step"], kind="stable"
    )
    wide = wide.drop(columns="_order").reset_index(drop=True)
    return wide.astype({"rank": "int64", "step": "int64", "layer": object})


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-NaN when the table does not have that metric."""
    if name in df:
        return df[name].astype(float)
    return pd.Series(np.nan, index=df.index, dtype=float)


def _active(run: _Run, train: pd.DataFrame) -> pd.DataFrame:
    """Training rows of layers that ran at that step (``forward_calls`` > 0, when known)."""
    if not len(train) or "forward_calls" not in train:
        return train
    return train[train["forward_calls"].fillna(1.0) > 0.0]


def _warm_rows(run: _Run, df: pd.DataFrame) -> np.ndarray:
    """Per row of a wide table: are the layer's running statistics warmed up at that step?"""
    pairs = zip(df["layer"], df["step"], strict=True)
    return np.array([run.warm(str(la), int(s)) for la, s in pairs], dtype=bool)


def _score(df: pd.DataFrame, limits: dict[str, float]) -> np.ndarray:
    """max over metrics of value / limit. NaN, inf and missing metrics count 0: non-finite
    values are the nonfinite rule's business."""
    score = np.zeros(len(df), dtype=float)
    for metric, limit in limits.items():
        if metric in df:
            ratio = df[metric].to_numpy(dtype=float) / limit
            score = np.fmax(score, np.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0))
    return score


def _trailing(df: pd.DataFrame, bad: np.ndarray, warm: np.ndarray | None = None) -> pd.DataFrame:
    """Rows of the unbroken stretch of bad rows that ends at the latest row, per (rank, layer).

    ``df`` is sorted by step within each (rank, layer); a group whose latest row is fine
    contributes nothing. With ``warm`` (per row), rows before the first warmed-up row of the
    stretch are dropped: a mismatch during warm-up (e.g. Lightning's sanity-check validation
    before the first training step) is expected and does not date the problem.
    """
    keep = np.zeros(len(df), dtype=bool)
    positions = np.arange(len(df))
    for _, idx in df.assign(_pos=positions).groupby(["rank", "layer"], sort=False)["_pos"]:
        pos = idx.to_numpy()
        i = len(pos)
        while i > 0 and bad[pos[i - 1]]:
            i -= 1
        if warm is not None and i < len(pos) and warm[pos[i:]].any():
            i += int(np.argmax(warm[pos[i:]]))
        keep[pos[i:]] = True
    return df[keep]


def _episodes(bad: pd.DataFrame) -> Iterator[tuple[str, int, pd.Series]]:
    """Per layer of ``bad`` (in table order): (layer, first step, the row with the top score)."""
    for layer, g in bad.groupby("layer", sort=False):
        first = int(g["step"].min())
        worst = _top(g, "score") if "score" in g else g.iloc[0]
        yield str(layer), first, worst


def _top(df: pd.DataFrame, col: str) -> pd.Series:
    """The first row with the largest value of ``col`` (NaN counts as smallest)."""
    values = np.nan_to_num(df[col].to_numpy(dtype=float), nan=-np.inf)
    return df.iloc[int(np.argmax(values))]


def _get(row: pd.Series, name: str, default: float = math.nan) -> float:
    if name not in row.index:
        return default
    value = row[name]
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _num(x: float) -> float | str:
    """A float for evidence: 6 significant digits; non-finite values as text ("nan", "inf")."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.6g}")


def _evidence(
    row: pd.Series, metrics: Sequence[str], **extra: float | int | str
) -> dict[str, float | int | str]:
    """Evidence from the metrics of one wide row (those present and not NaN) plus ``extra``."""
    ev: dict[str, float | int | str] = {}
    for m in metrics:
        value = _get(row, m)
        if not math.isnan(value):
            ev[m] = _num(value)
    for key, item in extra.items():
        ev[key] = _num(item) if isinstance(item, float) else item
    if "rank" in row.index and "rank" not in ev:
        ev["rank"] = int(row["rank"])
    return ev


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _summaries(df: pd.DataFrame) -> list[dict[str, Any]]:
    if "run" in df.columns and df["run"].nunique(dropna=False) > 1:
        return [_summary(part, str(run)) for run, part in df.groupby("run", sort=False)]
    return [_summary(df, None)]


def _summary(df: pd.DataFrame, run: str | None) -> dict[str, Any]:
    """Latest key metrics per layer and stage (lowest rank), and the model-level probe."""
    base = df[df["rank"] == df["rank"].min()] if len(df) else df
    agg = base[base["channel"].isna()]
    steps: dict[str, Any] = {}
    latest: dict[str, pd.DataFrame] = {}
    for stage in ("train", "val", "probe"):
        rows = agg[agg["stage"] == stage]
        steps[stage] = {
            "count": int(rows["step"].nunique()),
            "first": int(rows["step"].min()) if len(rows) else None,
            "last": int(rows["step"].max()) if len(rows) else None,
        }
        latest[stage] = rows.sort_values("step", kind="stable").drop_duplicates(
            ["layer", "metric"], keep="last"
        )
    layers = []
    for layer in _layer_order(agg):
        if layer == store.MODEL:
            continue
        entry: dict[str, Any] = {"layer": layer}
        for stage, metrics in SUMMARY_METRICS.items():
            rows = latest[stage]
            rows = rows[rows["layer"] == layer]
            values: dict[str, Any] = {"step": int(rows["step"].max()) if len(rows) else None}
            for m in metrics:
                hit = rows.loc[rows["metric"] == m, "value"]
                values[m] = float(hit.iloc[0]) if len(hit) else None
            entry[stage] = values
        layers.append(entry)
    probe = latest["probe"]
    model_rows = probe[probe["layer"] == store.MODEL]
    model: dict[str, Any] = {
        "step": int(model_rows["step"].max()) if len(model_rows) else None,
    }
    for m in MODEL_METRICS:
        hit = model_rows.loc[model_rows["metric"] == m, "value"]
        model[m] = float(hit.iloc[0]) if len(hit) else None
    return {"run": run, "steps": steps, "layers": layers, "model": model}


def _summary_text(s: dict[str, Any]) -> str:
    title = "bnprobe report" + (f" - run {s['run']}" if s["run"] is not None else "")
    st = s["steps"]
    layers: list[dict[str, Any]] = s["layers"]
    if not layers:
        return f"{title}\n(no BatchNorm measurements in this table)"
    lines = [title]
    facts = [f"{len(layers)} BatchNorm layers"]
    if st["train"]["count"]:
        facts.append(
            f"training steps {st['train']['first']}..{st['train']['last']} "
            f"({st['train']['count']} measured)"
        )
    if st["val"]["count"]:
        facts.append(f"{st['val']['count']} validation epochs")
    if st["probe"]["count"]:
        facts.append(f"{st['probe']['count']} train/eval probes")
    lines.append(", ".join(facts))
    groups: list[tuple[str, list[str]]] = []
    for stage, metrics in SUMMARY_METRICS.items():
        if st[stage]["count"]:
            groups.append(
                (stage, ["samples" if m == "samples_per_channel" else m for m in metrics])
            )
    body: list[list[str]] = []
    for entry in layers:
        row = [str(entry["layer"])]
        for stage, metrics in SUMMARY_METRICS.items():
            if st[stage]["count"]:
                row += [_fmt(entry[stage][m]) for m in metrics]
        body.append(row)
    names = ["layer"] + [m for _, ms in groups for m in ms]
    widths = [max(len(r[i]) for r in [names, *body]) for i in range(len(names))]
    top = [" " * widths[0]]
    col = 1
    for stage, ms in groups:
        span = sum(widths[col : col + len(ms)]) + 2 * (len(ms) - 1)
        top.append(f" {stage} ".center(span, "-"))
        col += len(ms)
    lines.append("")
    lines.append("latest values (channel means; shifts in running std, gaps relative):")
    lines.append("  " + "  ".join(top).rstrip())
    for r in [names, *body]:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells).rstrip())
    model = s["model"]
    if model["step"] is not None:
        lines.append(
            f"model (probe at step {model['step']}): logits_gap {_fmt(model['logits_gap'])}, "
            f"pred_agreement {_fmt(model['pred_agreement'])}"
        )
    return "\n".join(lines)


def _findings_text(findings: Sequence[Finding], counts: dict[str, int]) -> str:
    if not findings:
        return "No findings: every watched BatchNorm layer looks healthy."
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    head = "Findings: " + ", ".join(
        f"{counts[s]} {plural[s] if counts[s] != 1 else s}" for s in SEVERITIES
    )
    blocks = [head]
    if not counts["error"] and not counts["warning"]:
        blocks.append("No warnings or errors.")
    for severity in SEVERITIES:
        group = [f for f in findings if f.severity == severity]
        if group:
            blocks.append("\n\n".join(str(f) for f in group))
    return "\n\n".join(blocks)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x)}"
    return f"{x:.3g}"


def _wrap(text: str, first: str, rest: str | None = None) -> str:
    """Fill to 100 columns without breaking inside `code`."""
    glued = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\x00"), text)
    filled = textwrap.fill(
        glued,
        width=100,
        initial_indent=first,
        subsequent_indent=rest if rest is not None else first,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return filled.replace("\x00", " ")


def _jsonable(x: Any) -> Any:
    """Replace NaN and inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


__all__ = [
    "CALIBRATION",
    "KINDS",
    "RULES",
    "SEVERITIES",
    "Finding",
    "diagnose",
    "exit_code",
    "format_report",
    "worst_values",
]
