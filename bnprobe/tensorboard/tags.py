"""The tag scheme: every TensorBoard tag bnprobe writes, and its inverse.

Owns the tag spelling (:func:`scalar_tag`, :func:`epoch_tag`, :func:`hist_tag`,
:func:`figure_tag`, :func:`tag_root`), :func:`parse_tag`, the per-stage chart lists
(:data:`METRICS_BY_STAGE`) and rows-to-tags (:func:`scalar_metrics`). Pure string and table work:
imports neither TensorBoard nor torch nor Lightning (only :mod:`bnprobe.metrics` and
:mod:`bnprobe.store` for the names).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

import pandas as pd

from bnprobe import metrics, store

PREFIX = "bnprobe"
MODEL_TAG = "_model_"
"""How the whole-model layer ``store.MODEL`` (``<model>``) is spelled in tags."""

HIST_BINS = 30
"""Equal-width bins per histogram: about 0.6 KB per histogram instead of about 9 KB with
torch's default exponential binning (docs/tensorboard.md has the measurement). TensorBoard's
own ``tensorboard.summary.histogram`` defaults to 30 buckets as well."""

HIST_NAMES: tuple[str, ...] = ("gamma", "beta", "d", "v")

METRICS_BY_STAGE: dict[str, tuple[str, ...]] = metrics.charts_by_stage()
"""Charts of the Custom Scalars layout, in order, per stage (one multiline chart each)."""

_RESERVED_METRICS = ("hist", "figure", "epoch")
_MODEL_ESCAPED = re.compile(r"_model_+")
_ROOT = re.compile(rf"(?:.*[\W_])?{PREFIX}")
"""A tag root: ``bnprobe``, or it with a logger's prefix and a separator before it."""


def tag_root(prefix: str = "", join: str = "-") -> str:
    """The root of every bnprobe tag written through a logger with this ``prefix``:
    ``bnprobe``, or ``<prefix><join>bnprobe`` (Lightning's ``LOGGER_JOIN_CHAR`` is ``-``)."""
    return f"{prefix}{join}{PREFIX}" if prefix else PREFIX


class Tag(NamedTuple):
    """The parts of a scalar tag ``bnprobe/<stage>/<metric>/<layer>``."""

    stage: str
    metric: str
    layer: str


# --------------------------------------------------------------------------- tags


def _check_part(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{what} must be a non-empty string without '/', got {value!r}")


def _layer_to_tag(layer: str) -> str:
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty string, got {layer!r}")
    if layer == store.MODEL:
        return MODEL_TAG
    if _MODEL_ESCAPED.fullmatch(layer):
        return layer + "_"
    return layer


def _layer_from_tag(part: str) -> str:
    if part == MODEL_TAG:
        return store.MODEL
    if _MODEL_ESCAPED.fullmatch(part):
        return part[:-1]
    return part


@lru_cache(maxsize=1 << 16)
def scalar_tag(stage: str, metric: str, layer: str) -> str:
    """The TensorBoard tag of a layer aggregate: ``bnprobe/<stage>/<metric>/<layer>``.

    Cached: a logging step builds one tag per layer and metric, the same ones every time."""
    _check_part("stage", stage)
    _check_part("metric", metric)
    if metric in _RESERVED_METRICS:
        raise ValueError(
            f"metric {metric!r} is reserved in the tag scheme ({', '.join(_RESERVED_METRICS)}); "
            "rename the metric"
        )
    return f"{PREFIX}/{stage}/{metric}/{_layer_to_tag(layer)}"


@lru_cache(maxsize=1 << 10)
def epoch_tag(stage: str) -> str:
    """The tag of the per-step epoch scalar of a stage: ``bnprobe/<stage>/epoch``."""
    _check_part("stage", stage)
    return f"{PREFIX}/{stage}/epoch"


def hist_tag(stage: str, name: str, layer: str, root: str = PREFIX) -> str:
    """The tag of a per-channel histogram: ``<root>/<stage>/hist/<name>/<layer>``."""
    _check_part("stage", stage)
    _check_part("histogram name", name)
    return f"{root}/{stage}/hist/{name}/{_layer_to_tag(layer)}"


def figure_tag(stage: str, name: str, root: str = PREFIX) -> str:
    """The tag of a figure image: ``<root>/<stage>/figure/<name>``."""
    _check_part("stage", stage)
    _check_part("figure name", name)
    return f"{root}/{stage}/figure/{name}"


def _after_root(tag: str) -> list[str] | None:
    """The parts of ``tag`` after its root (the first leading parts that make a root: a
    logger's prefix may hold '/'), or None when no root starts it."""
    if PREFIX not in tag:
        return None
    parts = tag.split("/")
    for i in range(len(parts)):
        if parts[i].endswith(PREFIX) and _ROOT.fullmatch("/".join(parts[: i + 1])):
            return parts[i + 1 :]
    return None


def _match_scalar(tag: str) -> Tag | None:
    rest = _after_root(tag)
    if rest is None or len(rest) < 3:
        return None
    stage, metric, layer = rest[0], rest[1], "/".join(rest[2:])
    if not (stage and metric and layer):
        return None
    if metric in _RESERVED_METRICS:
        return None
    return Tag(stage, metric, _layer_from_tag(layer))


def parse_tag(tag: str) -> Tag:
    """Invert :func:`scalar_tag`: ``parse_tag(scalar_tag(s, m, l)) == (s, m, l)``; the same
    for a tag written through a logger with a prefix (``<prefix>-bnprobe/...``).

    Raises ValueError for any other tag (histograms, figures, the epoch scalar, foreign tags).
    """
    parsed = _match_scalar(tag)
    if parsed is None:
        raise ValueError(
            f"{tag!r} is not a bnprobe scalar tag; expected '{PREFIX}/<stage>/<metric>/<layer>'"
        )
    return parsed


def scalar_metrics(rows: pd.DataFrame) -> dict[int, dict[str, float]]:
    """Turn table rows into ``{step: {tag: value}}`` for ``logger.log_metrics(d, step=step)``.

    Keeps the layer aggregates of rank 0 (channel NA), and adds ``bnprobe/<stage>/epoch`` for
    every (stage, step) so that :func:`read_tensorboard` recovers the epoch column. Where a
    key occurs twice, the later row wins.
    """
    agg = rows[rows["channel"].isna().to_numpy() & (rows["rank"] == 0).to_numpy()]
    out: dict[int, dict[str, float]] = {}
    cols = zip(
        agg["step"].tolist(),
        agg["epoch"].tolist(),
        agg["stage"].tolist(),
        agg["metric"].tolist(),
        agg["layer"].tolist(),
        agg["value"].tolist(),
        strict=True,
    )
    for step, epoch, stage, metric, layer, value in cols:
        d = out.setdefault(int(step), {})
        d[epoch_tag(stage)] = float(epoch)
        d[scalar_tag(stage, metric, layer)] = float(value)
    return out
