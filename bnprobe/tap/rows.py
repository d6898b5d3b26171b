"""Row building: what one measured step becomes, and the :class:`Snapshot` that carries it.

Owns the order of a layer's rows (the metric names it has, :func:`_metric_index`; its
structural metrics, :func:`structure_metrics`), the per-channel vectors and per-channel rows
of a step, and :class:`Snapshot`, whose ``parts`` are :class:`bnprobe.store.Rows` only: the one
row representation between the tap, the store and the sinks. A DataFrame handed to
:class:`Snapshot` is turned into Rows at once (:meth:`bnprobe.store.Rows.from_frame`).

May import numpy, :mod:`bnprobe.stats`, :mod:`bnprobe.store` (the row schema) and
:mod:`bnprobe.tap.layers` / :mod:`bnprobe.tap.packing`; no Lightning, no TensorBoard. pandas only
where rows become a DataFrame (:attr:`Snapshot.rows`, through the store).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from bnprobe import metrics, stats
from bnprobe.store import (
    Rows,
    concat,
)
from bnprobe.tap.layers import LayerState
from bnprobe.tap.packing import Layout

if TYPE_CHECKING:
    import pandas as pd

ChannelVectors = dict[str, dict[str, np.ndarray]]
"""layer -> {"gamma", "beta", "d", "v", ...} per-channel values (signed d and v)."""


class Snapshot:
    """What one step measured: its rows and, if kept, per-channel arrays.

    ``parts`` holds the rows as :class:`bnprobe.store.Rows` (columns, as the tap makes them);
    tables given to the constructor are converted to Rows there. :attr:`rows` builds one
    DataFrame of them only when it is asked for.
    """

    def __init__(
        self, parts: Iterable[Rows | pd.DataFrame], channels: ChannelVectors | None = None
    ) -> None:
        self.parts: list[Rows] = []
        for part in parts:
            if isinstance(part, Rows):
                self.parts.append(part)
            else:
                self.parts += Rows.from_frame(part)
        self.channels: ChannelVectors = {} if channels is None else channels
        """layer -> {"gamma", "beta", "d", "v", ...} per-channel values (signed d and v)."""
        self._table: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"Snapshot(parts={self.parts!r}, channels={self.channels!r})"

    @property
    def rows(self) -> pd.DataFrame:
        """Every row as one table (SPEC schema)."""
        if self._table is None:
            self._table = concat(p.frame() for p in self.parts)
        return self._table

    @property
    def aggregates(self) -> Rows | None:
        """The layer rows (channel NA) as plain columns, when the snapshot holds nothing else
        that a logger would show (None: use :attr:`rows`)."""
        layer_rows = [p for p in self.parts if p.channels is None]
        return layer_rows[0] if len(layer_rows) == 1 else None


# -- a layer's rows ------------------------------------------------------------------------------
_ALL_METRICS = metrics.layer_row_order(running=True, affine=True, tracked=True)


@cache
def _metric_index(
    running: bool, affine: bool, tracked: bool = False
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The metrics a layer has (names, in row order) and their positions in ``_ALL_METRICS``."""
    names = metrics.layer_row_order(running, affine, tracked)
    return tuple(names), tuple(_ALL_METRICS.index(n) for n in names)


LayerMetrics = dict[LayerState, tuple[tuple[str, ...], list[float]]]
"""Each measured layer's metric names (row order) and values."""


def layer_metrics(
    layers: list[LayerState], layouts: list[Layout], table: dict[str, np.ndarray]
) -> LayerMetrics:
    """Split :func:`bnprobe.stats.segment_metrics`'s ``{metric: one value per layer}`` into each
    layer's metrics, in row order."""
    columns = np.stack([table[name] for name in _ALL_METRICS], axis=1).tolist()
    out: LayerMetrics = {}
    for layer, lay, row in zip(layers, layouts, columns, strict=True):
        names, index = _metric_index(lay.running, lay.affine, lay.tracked)
        out[layer] = (names, [row[i] for i in index])
    return out


def structure_metrics(layer: LayerState, pooled: bool) -> dict[str, float]:
    """The structural metrics of a layer this step (store.STRUCTURE_METRICS and, on a traced
    step, store.TRACE_METRICS), in the order the table has them. A ``pooled`` (validation) step
    has ``samples_per_channel`` only."""
    lay = layer.layout
    if pooled:
        return {"samples_per_channel": lay.samples} if lay is not None else {}
    if lay is None:
        return {"forward_calls": float(layer.calls)}
    m = layer.module
    out = {
        "forward_calls": float(layer.calls),
        "train_mode": float(layer.modes[0]),
        "model_train_mode": float(layer.modes[1]),
        "momentum": float("nan") if m.momentum is None else float(m.momentum),
        "has_running_stats": float(lay.running and m.track_running_stats),
    }
    if layer.producer is not None:
        out["input_bias"], out["input_dropout"] = layer.producer
    out |= {"samples_per_channel": lay.samples, "batch_size": layer.batch_size, "eps": lay.eps}
    return out


def layer_rows(
    step: int,
    epoch: int,
    stage: str,
    rank: int,
    layers: Iterable[LayerState],
    measured: LayerMetrics,
    pooled: bool,
) -> Rows:
    """The layer rows (channel NA) of a step: per layer its metrics, then its structure."""
    names: list[str] = []
    metrics: list[str] = []
    values: list[float] = []
    for layer in layers:
        if layer.failed:
            continue
        layer_names, layer_values = measured.get(layer, ((), []))
        structure = structure_metrics(layer, pooled)
        names += [layer.name] * (len(layer_names) + len(structure))
        metrics += layer_names
        metrics += structure
        values += layer_values
        values += structure.values()
    return Rows(step, epoch, stage, rank, names, metrics, values)


# -- per-channel vectors and rows ----------------------------------------------------------------
def channel_vectors(
    ok: list[tuple[LayerState, Layout]], seg: stats.Segments, chan: dict[str, np.ndarray]
) -> ChannelVectors:
    """Each layer's per-channel vectors (the keys it has) for :attr:`Snapshot.channels`."""
    ends = np.cumsum(seg.channels).tolist()
    starts = [0, *ends[:-1]]
    running_keys = ("running_mean", "running_var", "d", "v", "kl")
    out: ChannelVectors = {}
    for (layer, lay), a, b in zip(ok, starts, ends, strict=True):
        keys = ["batch_mean", "batch_var"]
        keys += running_keys if lay.running else ()
        keys += ("gamma", "beta") if lay.affine else ()
        out[layer.name] = {k: chan[k][a:b] for k in keys}
    return out


def channel_rows(
    ok: list[tuple[LayerState, Layout]],
    seg: stats.Segments,
    chan: dict[str, np.ndarray],
    step: int,
    epoch: int,
    stage: str,
    rank: int,
) -> Rows:
    """The per-channel rows of a step (``per_channel=True``), metric by metric, built with
    numpy over all layers at once."""
    ends = np.cumsum(seg.channels).tolist()
    starts = [0, *ends[:-1]]
    running = np.repeat([lay.running for _, lay in ok], seg.channels)
    affine = np.repeat([lay.affine for _, lay in ok], seg.channels)
    names = np.repeat(np.array([layer.name for layer, _ in ok], dtype=object), seg.channels)
    index = np.arange(len(names)) - np.repeat(starts, seg.channels)
    sources = {"mean_shift": np.abs(chan["d"]), "var_shift": np.abs(chan["v"])}
    parts: list[tuple[str, np.ndarray, np.ndarray | None]] = [
        ("batch_mean", chan["batch_mean"], None),
        ("batch_var", chan["batch_var"], None),
    ]
    for name in ("running_mean", "running_var", "mean_shift", "var_shift", "kl"):
        parts.append((name, sources[name] if name in sources else chan[name], running))
    parts += [("gamma", chan["gamma"], affine), ("beta", chan["beta"], affine)]
    col_layers, col_metrics, col_index, col_values = [], [], [], []
    for name, vec, mask in parts:
        sel = slice(None) if mask is None else mask
        n = int(mask.sum()) if mask is not None else len(vec)
        col_layers.append(names[sel])
        col_metrics.append(np.full(n, name, dtype=object))
        col_index.append(index[sel])
        col_values.append(vec[sel])
    return Rows(
        step,
        epoch,
        stage,
        rank,
        np.concatenate(col_layers),
        np.concatenate(col_metrics),
        np.concatenate(col_values),
        np.concatenate(col_index),
    )
