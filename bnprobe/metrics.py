"""The metric catalogue: every metric bnprobe records, once.

For each metric: its name, the stages that record it, what a layer (or run) needs to have it, the
family it belongs to, whether it also has per-channel rows, which Custom Scalars chart section
shows it, and a one-line meaning. The order of :data:`CATALOGUE` is the order of the table: a
layer's rows of one stage come in catalogue order (the store, the tap and docs/metrics.md follow
it). Everything that lists metric names derives from here: the store's name tuples, the tap's
row order, the TensorBoard layout, ``BNProbe(scalars=...)``, the callback's "Logged keys"
docstring (:func:`logged_keys_doc`), and docs/metrics.md (checked by tests/test_metrics.py).

A new metric goes into :data:`CATALOGUE` (and a row of docs/metrics.md); its maths goes into
:mod:`bnprobe.stats`. This module is a leaf: it imports nothing from bnprobe (and no torch,
numpy or pandas), so every other module may import it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Literal

Stage = Literal["train", "val", "probe", "recalibrate"]
STAGES: tuple[Stage, ...] = ("train", "val", "probe", "recalibrate")

MODEL_LAYER = "<model>"
"""The layer name of whole-model rows (``store.MODEL``)."""

# What a layer (or the run) must have for a metric to be recorded.
RUNNING = "running_stats"
"""The layer tracks running statistics (``track_running_stats=True`` and the buffers exist)."""
TRACKED = "num_batches_tracked"
"""The layer has a ``num_batches_tracked`` buffer (train and val; the probe falls back to the
step)."""
AFFINE = "affine"
"""The layer has ``weight`` and ``bias`` (``affine=True``)."""
FIRST_STEP = "first_measured_step"
"""Recorded at the first measured training step only (the producer trace)."""
DDP = "ddp"
"""Recorded only when training runs in several processes (rank 0's rows)."""
MODEL = "model"
"""A whole-model row: layer ``<model>``, one per probe."""
APPLIED = "applied"
"""Only when :func:`bnprobe.recalibrate` wrote the new statistics (``apply=True``)."""
FROZEN = "frozen"
"""Only for a layer :func:`bnprobe.recalibrate` kept frozen (its one row)."""
PER_CHANNEL = "per_channel"
"""Only as per-channel rows (``BNProbe(per_channel=True)``), never as a layer row."""
NEEDS: tuple[str, ...] = (RUNNING, TRACKED, AFFINE, FIRST_STEP, DDP, MODEL, APPLIED, FROZEN)
NEEDS += (PER_CHANNEL,)

Group = Literal[
    "moment", "shift", "warmup", "count", "affine", "structure", "trace", "distributed",
    "channel", "probe", "model", "recalibrate",
]  # fmt: skip
"""The family of a metric: the store's name tuples (``store.SHIFT_METRICS`` is group
``shift``...) are the groups."""

CHART_SECTIONS: tuple[str, ...] = (
    "shift", "outlier", "moment", "samples", "count", "affine", "ranks", "probe", "recalibrate"
)  # fmt: skip
"""The order of a stage's Custom Scalars charts: what a user looks at first (the shifts), then
the raw moments, the sample count, the counts of bad channels, the affine parameters and the
rank divergence; within a section, catalogue order."""


@dataclass(frozen=True)
class Metric:
    """One metric of the table (module docstring)."""

    name: str
    group: Group
    stages: tuple[Stage, ...]
    meaning: str
    needs: frozenset[str] = frozenset()
    per_channel: bool = False
    """Also written per channel with ``per_channel=True`` (the channel mean is the layer row)."""
    chart: str | None = None
    """The Custom Scalars section (:data:`CHART_SECTIONS`) that charts it; None: not charted."""
    constant: bool = False
    """Constant in practice (what the layer is, not what its data are): the store keeps a row
    only when the value changes (per stage, rank and layer), and its readers give the value in
    force at every step the layer was measured (every step with a ``batch_mean`` row,
    :data:`ANCHOR`). The tap writes it exactly when it writes that layer's ``batch_mean``."""


ANCHOR = "batch_mean"
"""The metric whose layer row marks "this layer was measured at this step": a ``constant``
metric has a value at exactly those steps (bnprobe.store fills it in from its last change)."""


def _m(
    name: str,
    group: Group,
    stages: Iterable[Stage],
    meaning: str,
    *needs: str,
    per_channel: bool = False,
    chart: str | None = None,
    constant: bool = False,
) -> Metric:
    return Metric(
        name, group, tuple(stages), meaning, frozenset(needs), per_channel, chart, constant
    )


_TV: tuple[Stage, ...] = ("train", "val")
_T: tuple[Stage, ...] = ("train",)
_P: tuple[Stage, ...] = ("probe",)
_R: tuple[Stage, ...] = ("recalibrate",)

CATALOGUE: tuple[Metric, ...] = (
    # -- stages train and val: batch vs running statistics (bnprobe.stats.segment_metrics)
    _m("batch_mean", "moment", _TV, "mean over channels of the batch mean mu_B",
       per_channel=True, chart="moment"),
    _m("batch_var", "moment", _TV, "mean over channels of the biased batch variance var_B",
       per_channel=True, chart="moment"),
    _m("running_mean", "shift", _TV, "mean over channels of mu_R before this batch's update",
       RUNNING, per_channel=True, chart="moment"),
    _m("running_var", "shift", _TV, "mean over channels of var_R before this batch's update",
       RUNNING, per_channel=True, chart="moment"),
    _m("mean_shift", "shift", _TV,
       "mean over channels of abs(d), d = (mu_B - mu_R)/sqrt(var_R + eps)",
       RUNNING, per_channel=True, chart="shift"),
    _m("var_shift", "shift", _TV,
       "mean over channels of abs(v), v = log((var_B + eps)/(var_R + eps))",
       RUNNING, per_channel=True, chart="shift"),
    _m("kl", "shift", _TV, "mean over channels of KL(batch || running) = (exp(v) + d^2 - 1 - v)/2",
       RUNNING, per_channel=True, chart="shift"),
    _m("mean_shift_max", "shift", _TV, "max over channels of abs(d)", RUNNING, chart="shift"),
    _m("var_shift_max", "shift", _TV, "max over channels of abs(v)", RUNNING, chart="shift"),
    _m("kl_max", "shift", _TV, "max over channels of the KL", RUNNING, chart="shift"),
    _m("outlier_frac", "shift", _TV, "fraction of channels beyond Batch Renorm's clip bounds",
       RUNNING, chart="outlier"),
    _m("mean_shift_excess", "shift", _TV, "mean abs(d*) against warm-up-corrected running stats",
       RUNNING, chart="shift"),
    _m("var_shift_excess", "shift", _TV, "mean abs(v*) against warm-up-corrected running stats",
       RUNNING, chart="shift"),
    _m("mean_shift_excess_max", "shift", _TV, "max over channels of abs(d*)", RUNNING,
       chart="shift"),
    _m("var_shift_excess_max", "shift", _TV, "max over channels of abs(v*)", RUNNING,
       chart="shift"),
    _m("running_invalid", "shift", _TV,
       "channels whose running moments are non-finite or var_R < 0",
       RUNNING),
    _m("num_batches_tracked", "warmup", _TV, "the num_batches_tracked buffer before this update",
       RUNNING, TRACKED),
    _m("warmup_residual", "warmup", _TV, "r, the share of the initial running stats still in them",
       RUNNING, TRACKED),
    _m("nonfinite", "count", _TV, "channels where any derived value is NaN or inf", chart="count"),
    _m("var_small_frac", "count", _TV, "fraction of channels with var_B < 10 eps", chart="count"),
    _m("gamma_mean", "affine", _T, "mean over channels of the weight gamma", AFFINE,
       chart="affine"),
    _m("gamma_std", "affine", _T, "standard deviation (n-1) of gamma over channels", AFFINE,
       chart="affine"),
    _m("beta_mean", "affine", _T, "mean over channels of the bias beta", AFFINE, chart="affine"),
    _m("beta_std", "affine", _T, "standard deviation (n-1) of beta over channels", AFFINE,
       chart="affine"),
    _m("gamma_drift", "affine", _T,
       "||gamma - gamma_0|| / ||gamma_0|| since the probe first saw it",
       AFFINE, chart="affine"),
    _m("beta_drift", "affine", _T, "||beta - beta_0|| / sqrt(C)", AFFINE, chart="affine"),
    _m("gamma_small_frac", "affine", _T,
       "fraction of channels with abs(gamma) < 0.01 max abs(gamma)",
       AFFINE, chart="affine"),
    # -- stage train: what the layer is rather than what its data are
    _m("forward_calls", "structure", _T, "forward calls of the layer in the measured step"),
    _m("train_mode", "structure", _T, "1 if the BN layer was in training mode", constant=True),
    _m("model_train_mode", "structure", _T, "1 if the whole model was in training mode",
       constant=True),
    _m("momentum", "structure", _T, "the layer's momentum; NaN for momentum=None",
       constant=True),
    _m("has_running_stats", "structure", _T, "1 if the layer tracks running statistics",
       constant=True),
    _m("input_bias", "trace", _T, "1 if the module producing the input has a bias", FIRST_STEP),
    _m("input_dropout", "trace", _T, "dropout p of the module producing the input", FIRST_STEP),
    _m("samples_per_channel", "structure", _TV, "elements per channel the moments were taken over",
       chart="samples", constant=True),
    _m("batch_size", "structure", _T, "samples along the batch dimension of the input",
       constant=True),
    _m("eps", "structure", _T, "the layer's eps", constant=True),
    _m("rank_divergence", "distributed", _T, "largest distance of one rank's running stats from "
       "the mean over ranks", RUNNING, DDP, chart="ranks"),
    _m("gamma", "channel", _T, "the weight gamma of one channel", AFFINE, PER_CHANNEL,
       per_channel=True),
    _m("beta", "channel", _T, "the bias beta of one channel", AFFINE, PER_CHANNEL,
       per_channel=True),
    # -- stage probe: the train/eval gap (bnprobe.check_mismatch)
    _m("output_gap", "probe", _P, "||y_train - y_eval|| / ||y_train|| at the layer's output",
       RUNNING, chart="probe"),
    _m("local_gap", "probe", _P, "the same gap for this layer alone, on the same input", RUNNING,
       chart="probe"),
    _m("num_batches_tracked", "warmup", _P, "the num_batches_tracked buffer (else the step)",
       RUNNING, chart="probe"),
    _m("warmup_residual", "warmup", _P, "r = (1 - m)^n, initial buffers (0, 1) at n = 0 assumed",
       RUNNING, chart="probe"),
    _m("running_invalid", "warmup", _P,
       "channels whose running moments are non-finite or var_R < 0",
       RUNNING, chart="probe"),
    _m("logits_gap", "model", _P, "relative gap of the model outputs, train vs eval mode", MODEL,
       chart="probe"),
    _m("pred_agreement", "model", _P, "fraction of rows whose argmax agrees in the two modes",
       MODEL, chart="probe"),
    _m("recal_pred_change", "model", _P, "fraction of rows whose eval argmax changes after "
       "re-estimating the running stats", MODEL, chart="probe"),
    _m("recal_logits_shift", "model", _P, "||y_eval_recal - y_eval|| / ||y_eval||", MODEL,
       chart="probe"),
    # -- stage recalibrate (bnprobe.recalibrate)
    _m("samples", "recalibrate", _R, "elements per channel pooled over every batch",
       RUNNING, chart="recalibrate"),
    *(
        _m(f"{m}_{when}", "recalibrate", _R, f"{what} against the {ref} running moments",
           RUNNING, *((APPLIED,) if when == "after" else ()), chart="recalibrate")
        for when, ref in (("before", "old"), ("after", "written"))
        for m, what in (
            ("mean_shift", "mean over channels of abs(d)"),
            ("mean_shift_max", "max over channels of abs(d)"),
            ("var_shift", "mean over channels of abs(v)"),
            ("var_shift_max", "max over channels of abs(v)"),
        )
    ),
    _m("frozen", "recalibrate", _R, "1 for a layer kept frozen (its statistics untouched)",
       FROZEN),
)  # fmt: skip
"""Every metric, in table order. A name may have one entry per stage family where its meaning
differs (``num_batches_tracked``, ``warmup_residual`` and ``running_invalid`` in the probe)."""


def _check() -> None:
    seen: set[tuple[str, str]] = set()
    for m in CATALOGUE:
        for stage in m.stages:
            if (stage, m.name) in seen:
                raise AssertionError(f"metric {m.name!r} twice in stage {stage!r}")
            seen.add((stage, m.name))
        if not m.needs <= set(NEEDS) or (m.chart is not None and m.chart not in CHART_SECTIONS):
            raise AssertionError(f"metric {m.name!r}: unknown need or chart section")
        if m.constant and (m.per_channel or ANCHOR not in _names_of(m.stages)):
            raise AssertionError(f"constant metric {m.name!r}: a layer row of stages with {ANCHOR}")


def _names_of(stages: Iterable[Stage]) -> set[str]:
    return {m.name for m in CATALOGUE if set(m.stages) & set(stages)}


_check()


# --------------------------------------------------------------------------- lookups


def entries(
    stage: Stage | None = None,
    *,
    group: Group | Collection[Group] | None = None,
    without: Collection[str] = (),
) -> tuple[Metric, ...]:
    """The catalogue entries of ``stage`` (None: all), of ``group`` (one or several; None: all),
    that need none of ``without``, in catalogue order."""
    groups = (group,) if isinstance(group, str) else group
    return tuple(
        m
        for m in CATALOGUE
        if (stage is None or stage in m.stages)
        and (groups is None or m.group in groups)
        and not (m.needs & set(without))
    )


def names(
    stage: Stage | None = None,
    *,
    group: Group | Collection[Group] | None = None,
    without: Collection[str] = (),
) -> tuple[str, ...]:
    """Names of :func:`entries` (each once, in catalogue order)."""
    return tuple(dict.fromkeys(m.name for m in entries(stage, group=group, without=without)))


def lookup(name: str, stage: Stage) -> Metric:
    """The entry of ``name`` in ``stage``; KeyError if the stage has no such metric."""
    for m in CATALOGUE:
        if m.name == name and stage in m.stages:
            return m
    raise KeyError(f"no metric {name!r} in stage {stage!r}; stage {stage!r} has: {names(stage)}")


_LAYER_ROW_GROUPS: tuple[Group, ...] = ("moment", "shift", "warmup", "count", "affine")


@cache
def layer_row_order(running: bool, affine: bool, tracked: bool = False) -> tuple[str, ...]:
    """The metrics :func:`bnprobe.stats.segment_metrics` gives a layer of train or val, in row
    order: moments, shifts (with running statistics), warm-up (and ``num_batches_tracked``),
    counts, affine (train; with ``affine=True``). ``layer_row_order(True, True, True)`` is every
    one of them."""
    have = {RUNNING} if running else set()
    have |= {TRACKED} if tracked else set()
    have |= {AFFINE} if affine else set()
    return tuple(m.name for m in entries("train", group=_LAYER_ROW_GROUPS) if m.needs <= have)


@cache
def chart_order(stage: Stage) -> tuple[str, ...]:
    """The Custom Scalars charts of ``stage``, in order (:data:`CHART_SECTIONS`)."""
    charted = [m for m in entries(stage) if m.chart is not None]
    charted.sort(key=lambda m: CHART_SECTIONS.index(m.chart or ""))  # stable: catalogue order
    return tuple(m.name for m in charted)


def charts_by_stage() -> dict[str, tuple[str, ...]]:
    """:func:`chart_order` of every stage."""
    return {stage: chart_order(stage) for stage in STAGES}


@cache
def scalar_names() -> tuple[str, ...]:
    """Every metric name ``BNProbe(scalars=...)`` may name: the layer metrics of train (moments,
    shifts, counts, affine, structure, trace), then the probe's, then ``rank_divergence``."""
    train: tuple[Group, ...] = ("moment", "shift", "count", "affine", "structure", "trace")
    ordered = (
        *(n for g in train for n in names("train", group=g)),
        *names("probe"),
        *names("train", group="distributed"),
    )
    return tuple(dict.fromkeys(ordered))


# --------------------------------------------------------------------------- docs


LOGGED_STAGES: tuple[Stage, ...] = ("train", "val", "probe")
"""The stages the callback logs as scalars (recalibrate rows are returned, not logged)."""

_WHEN = {
    "train": "at each measured training step",
    "val": "after each validation epoch (pooled over it)",
    "probe": "after each validation epoch (the train/eval probe)",
}
_NEED_WORDS = {
    RUNNING: "with running statistics",
    TRACKED: "with a ``num_batches_tracked`` buffer",
    AFFINE: "with ``affine=True``",
    FIRST_STEP: "at the first measured step only",
    DDP: "with several processes (DDP)",
}


def logged(stage: Stage, *, model: bool = False) -> tuple[str, ...]:
    """The scalar metrics the callback logs in ``stage``: per BN layer, or (``model=True``) for
    the whole model (layer ``<model>``, tag ``_model_``)."""
    rows = entries(stage, without=(PER_CHANNEL,))
    return tuple(m.name for m in rows if (MODEL in m.needs) == model)


def _quoted(items: Iterable[str]) -> str:
    return ", ".join(f"``{n}``" for n in items)


def _stage_line(stage: Stage) -> str:
    """One bullet: the stage's layer metrics, those that need something said so."""
    plain: list[str] = []
    by_need: dict[tuple[str, ...], list[str]] = {}
    for m in entries(stage, without=(PER_CHANNEL, MODEL)):
        said = tuple(n for n in NEEDS if n in m.needs and n in _NEED_WORDS)
        if stage == "probe":
            said = tuple(n for n in said if n != RUNNING)  # the probe watches only those layers
        (by_need.setdefault(said, []) if said else plain).append(m.name)
    text = f"``bnprobe/{stage}/<metric>/<layer>`` {_WHEN[stage]}: {_quoted(plain)}"
    for said, group in by_need.items():
        words = [_NEED_WORDS[n] for n in said]
        words[1:] = [w.removeprefix("with ") for w in words[1:]]
        text += f"; {' and '.join(words)}: {_quoted(group)}"
    model = logged(stage, model=True)
    if model:
        text += f"; and for the whole model, ``bnprobe/{stage}/<metric>/_model_``: "
        text += _quoted(model)
    return text + ";"


@cache
def logged_keys_doc(width: int = 96) -> str:
    """The "Logged keys" section of the callback's docstring, generated from the catalogue
    (tests/test_metrics.py checks that the docstring holds exactly this)."""
    bullets = [_stage_line(stage) for stage in LOGGED_STAGES]
    bullets.append("``bnprobe/<stage>/epoch`` with every logging step of a stage;")
    bullets.append(
        "histograms ``bnprobe/train/hist/{gamma,beta,d,v}/<layer>`` and figures "
        "``bnprobe/<stage>/figure/<name>`` (TensorBoard only)."
    )
    head = (
        "Logged keys (scalars, through the TensorBoard loggers, or every logger with "
        '``log_to="all"``; rank zero only), one per BN layer and metric:'
    )
    tail = (
        'With a logger made with ``prefix="exp"`` every key starts with ``exp-bnprobe/`` '
        "instead, histograms, figures and the Custom Scalars layout included. "
        "docs/metrics.md defines each metric."
    )
    wrap = textwrap.TextWrapper(width=width, break_long_words=False, break_on_hyphens=False)
    lines = [*wrap.wrap(head), ""]
    for bullet in bullets:
        lines += textwrap.wrap(
            bullet,
            width=width,
            initial_indent="- ",
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join([*lines, "", *wrap.wrap(tail)])


__all__ = [
    "ANCHOR",
    "CATALOGUE",
    "CHART_SECTIONS",
    "NEEDS",
    "STAGES",
    "Metric",
    "chart_order",
    "charts_by_stage",
    "entries",
    "layer_row_order",
    "logged",
    "logged_keys_doc",
    "lookup",
    "names",
    "scalar_names",
]
