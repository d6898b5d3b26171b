"""Row building: what one measured step becomes, and the :class:`Snapshot` that carries it.

Owns the order of a layer's rows (the metric names it has, :func:`_metric_index`; its
structural metrics, :func:`structure_values`), the per-channel vectors and per-channel rows
of a step, and :class:`Snapshot`, whose ``parts`` are :class:`bnprobe.store.Rows` only: the one
row representation between the tap, the store and the sinks. A DataFrame handed to
:class:`Snapshot` is turned into Rows at once (:meth:`bnprobe.store.Rows.from_frame`).

May import numpy, :mod:`bnprobe.stats`, :mod:`bnprobe.store` (the row schema) and
:mod:`bnprobe.tap.layers` / :mod:`bnprobe.tap.packing`; no Lightning, no TensorBoard. pandas only
where rows become a DataFrame (:attr:`Snapshot.rows`, through the store).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from functools import cache, lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from bnprobe import metrics
from bnprobe.store import (
    Rows,
    concat,
)
from bnprobe.store.table import read_only, tile
from bnprobe.tap.layers import LayerState
from bnprobe.tap.packing import Layout

if TYPE_CHECKING:
    import pandas as pd

ChannelVectors = Mapping[str, Mapping[str, np.ndarray]]
"""layer -> {"gamma", "beta", "d", "v", ...} per-channel values (signed d and v)."""


class Snapshot:
    """What one step measured: its rows and, if kept, per-channel arrays.

    ``parts`` holds the rows as :class:`bnprobe.store.Rows` (columns, as the tap makes them);
    tables given to the constructor are converted to Rows there. :attr:`rows` builds one
    DataFrame of them only when it is asked for.
    """

    def __init__(
        self,
        parts: Iterable[Rows | pd.DataFrame],
        channels: ChannelVectors | None = None,
        history: list[tuple[str, int, ChannelVectors]] | None = None,
    ) -> None:
        self.parts: list[Rows] = []
        for part in parts:
            if isinstance(part, Rows):
                self.parts.append(part)
            else:
                self.parts += Rows.from_frame(part)
        self.channels: ChannelVectors = {} if channels is None else channels
        """layer -> {"gamma", "beta", "d", "v", ...} per-channel values (signed d and v); of
        the last step when the snapshot holds several (:meth:`step_channels` has each)."""
        self._history = history
        self._table: pd.DataFrame | None = None

    def step_channels(self) -> list[tuple[str, int, ChannelVectors]]:
        """``(stage, step, channels)`` of each step whose per-channel vectors the snapshot
        holds, in step order: one entry (its first rows' stage and step) unless the tap
        processed several steps in one block (:meth:`bnprobe.tap.BNTap.keep`)."""
        if self._history is not None:
            return list(self._history)
        if not self.channels or not self.parts:
            return []
        first = self.parts[0]
        step = first.step if not first.multi else first.split()[0].step
        return [(first.stage, int(step), self.channels)]

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


STRUCTURE: tuple[str, ...] = (
    "forward_calls",
    "train_mode",
    "model_train_mode",
    "momentum",
    "has_running_stats",
    "input_bias",
    "input_dropout",
    "samples_per_channel",
    "batch_size",
    "eps",
)
"""Every structural metric a layer row may have (store.STRUCTURE_METRICS and
store.TRACE_METRICS), in row order: the columns of :func:`structure_values`."""

_STRUCTURE_KINDS: dict[str, tuple[int, ...]] = {
    "none": (),
    "calls": (0,),
    "pooled": (7,),
    "full": (0, 1, 2, 3, 4, 7, 8, 9),
    "traced": tuple(range(len(STRUCTURE))),
}
"""Which columns of :data:`STRUCTURE` a layer has, by kind (:func:`structure_values`)."""

_NAN = float("nan")


class LayerMetrics(NamedTuple):
    """The metrics of the layers measured this step, computed for all of them at once."""

    layers: list[LayerState]
    """The measured layers, in tap order."""
    layouts: list[Layout]
    table: np.ndarray
    """(layers, ``_ALL_METRICS``) values; a layer's row order takes the ones it has."""


def layer_metrics(
    layers: list[LayerState], layouts: list[Layout], table: dict[str, np.ndarray]
) -> LayerMetrics:
    """Keep :func:`bnprobe.stats.segment_metrics`'s ``{metric: one value per layer}`` as one
    (layers, metrics) matrix that :func:`layer_rows` reads each layer's metrics from."""
    return LayerMetrics(layers, layouts, np.stack([table[name] for name in _ALL_METRICS], axis=1))


def structure_values(layer: LayerState, pooled: bool) -> tuple[str, tuple[float, ...]]:
    """The structural metrics of a layer this step as a row of :data:`STRUCTURE` (NaN where
    absent) and its kind (:data:`_STRUCTURE_KINDS`: which columns it has). A ``pooled``
    (validation) step has ``samples_per_channel`` only; a traced step adds
    ``input_bias``/``input_dropout``."""
    lay = layer.layout
    nan = _NAN
    if pooled:
        if lay is None:
            return "none", (nan,) * 10
        return "pooled", (nan, nan, nan, nan, nan, nan, nan, lay.samples, nan, nan)
    if lay is None:
        return "calls", (float(layer.calls), nan, nan, nan, nan, nan, nan, nan, nan, nan)
    m = layer.module
    momentum = m.momentum
    modes, producer = layer.modes, layer.producer
    bias, dropout = producer if producer is not None else (nan, nan)
    return "full" if producer is None else "traced", (
        float(layer.calls),
        float(modes[0]),
        float(modes[1]),
        nan if momentum is None else float(momentum),
        float(lay.running and m.track_running_stats),
        bias,
        dropout,
        lay.samples,
        layer.batch_size,
        lay.eps,
    )


class _RowPlan(NamedTuple):
    layers: np.ndarray
    metrics: np.ndarray
    positions: np.ndarray
    """Into ``[*metrics table.ravel(), *structure matrix.ravel()]``."""


@lru_cache(maxsize=16)
def _row_plan(
    shape: tuple[tuple[str, tuple[bool, bool, bool] | None, int, str], ...], measured: int
) -> _RowPlan:
    """The layer, metric and value position of every row of a step of this shape: per layer
    its name, metric kind (running, affine, tracked; None: not measured), row in the metrics
    table, structure kind. Steps nearly always have the shape of the step before: cached, so
    a step's rows take one numpy gather however many layers there are."""
    width, offset = len(_ALL_METRICS), measured * len(_ALL_METRICS)
    layers: list[str] = []
    names: list[str] = []
    index: list[int] = []
    for j, (name, kind, row, structure) in enumerate(shape):
        if kind is not None:
            metric_names, at = _metric_index(*kind)
            names += metric_names
            index += [row * width + i for i in at]
            layers += [name] * len(metric_names)
        columns = _STRUCTURE_KINDS[structure]
        names += [STRUCTURE[i] for i in columns]
        index += [offset + j * len(STRUCTURE) + i for i in columns]
        layers += [name] * len(columns)
    plan = _RowPlan(
        np.array(layers, dtype=object),
        np.array(names, dtype=object),
        np.array(index, dtype=np.int64),
    )
    for column in plan:
        column.setflags(write=False)  # shared by every step of this shape
    return plan


class RowMemo:
    """What :func:`layer_rows` built at the step before: its shape's row plan and structure
    matrix, and what they were made of. A tap keeps one, so that a step like the one before
    (the usual case: every layer's :class:`Layout` the same object, ``BNTap._before``) costs
    one cheap comparison per layer instead of its structure row and shape."""

    __slots__ = ("key", "plan", "structure")

    def __init__(self) -> None:
        self.key: object = None
        self.plan: _RowPlan | None = None
        self.structure = np.empty(0)


def _structure_inputs(layer: LayerState) -> tuple[object, ...]:
    """Everything :func:`structure_values` reads of a layer (and the layer itself)."""
    m = layer.module
    return (
        layer,
        layer.layout,
        layer.calls,
        layer.modes,
        layer.producer,
        layer.batch_size,
        m.momentum,
        m.track_running_stats,
    )


def layer_rows(
    step: int,
    epoch: int,
    stage: str,
    rank: int,
    layers: Iterable[LayerState],
    measured: LayerMetrics | None,
    pooled: bool,
    memo: RowMemo | None = None,
) -> Rows:
    """The layer rows (channel NA) of a step: per layer its metrics, then its structure.

    ``layers`` and ``metrics`` of the Rows are arrays shared by every step of the same shape
    (read them, never change them); ``values`` is a new float64 array. With a ``memo``, a step
    whose layers, layouts and structure inputs are those of the step before reuses its plan
    and structure rows (compared value by value, identity first: exact and cheap)."""
    plan, matrix = row_plan(layers, measured, pooled, memo)
    if plan is None:
        return Rows(step, epoch, stage, rank, [], [], [])
    return _rows(step, epoch, stage, rank, measured, plan, matrix)


def row_key(layers: Iterable[LayerState], measured: LayerMetrics | None, pooled: bool) -> object:
    """What :func:`row_plan` depends on: two steps with equal keys have the same row plan and
    structure rows (compared value by value, identity first: exact and cheap)."""
    live = [layer for layer in layers if not layer.failed]
    which = None if measured is None else (measured.layers, measured.layouts)
    return (pooled, which, [_structure_inputs(layer) for layer in live])


def row_plan(
    layers: Iterable[LayerState],
    measured: LayerMetrics | None,
    pooled: bool,
    memo: RowMemo | None = None,
    key: object = None,
) -> tuple[_RowPlan | None, np.ndarray]:
    """The row plan and structure rows of a step (:func:`layer_rows`; None: no rows), from
    the ``memo`` when the step's :func:`row_key` (given, or computed here) is the memo's."""
    live = [layer for layer in layers if not layer.failed]
    if memo is not None:
        if key is None:
            key = row_key(live, measured, pooled)
        if memo.key == key and memo.plan is not None:
            return memo.plan, memo.structure
    row_of: dict[LayerState, int] = {}
    kinds: dict[LayerState, tuple[bool, bool, bool]] = {}
    if measured is not None:
        for i, (layer, lay) in enumerate(zip(measured.layers, measured.layouts, strict=True)):
            row_of[layer] = i
            kinds[layer] = (lay.running, lay.affine, lay.tracked)
    shape = []
    structure = []
    for layer in live:
        kind, row = structure_values(layer, pooled)
        shape.append((layer.name, kinds.get(layer), row_of.get(layer, -1), kind))
        structure.append(row)
    if not shape:
        return None, np.empty(0)
    n = 0 if measured is None else len(measured.layers)
    plan = _row_plan(tuple(shape), n)
    matrix = np.asarray(structure, dtype=np.float64).ravel()
    matrix.setflags(write=False)
    if memo is not None:
        memo.key, memo.plan, memo.structure = key, plan, matrix
    return plan, matrix


def _rows(
    step: int,
    epoch: int,
    stage: str,
    rank: int,
    measured: LayerMetrics | None,
    plan: _RowPlan,
    structure: np.ndarray,
) -> Rows:
    parts = [structure] if measured is None else [measured.table.ravel(), structure]
    values = np.concatenate(parts)[plan.positions]
    return Rows(step, epoch, stage, rank, plan.layers, plan.metrics, values)


def block_rows(
    steps: list[int],
    epochs: list[int],
    stage: str,
    rank: int,
    table: np.ndarray,
    plan: _RowPlan,
    structure: np.ndarray,
) -> Rows:
    """The layer rows of k steps that share a row plan and structure rows
    (:func:`row_plan`) as one multi-step :class:`~bnprobe.store.Rows`: ``table`` holds each
    step's (layers, metrics) matrix of :class:`LayerMetrics`, stacked, (k * layers, metrics).
    Each step's values are those :func:`layer_rows` gives it (the same gather); the name
    columns are the plan's, tiled (:func:`bnprobe.store.tile`: the sinks see a tiling)."""
    k = len(steps)
    if k == 1:
        measured = LayerMetrics([], [], table)
        return _rows(steps[0], epochs[0], stage, rank, measured, plan, structure)
    per_step = table.reshape(k, -1)
    whole = np.concatenate([per_step, np.broadcast_to(structure, (k, len(structure)))], axis=1)
    values = whole[:, plan.positions].ravel()
    n = len(plan.positions)
    return Rows(
        read_only(np.repeat(np.array(steps, dtype=np.int64), n)),
        read_only(np.repeat(np.array(epochs, dtype=np.int64), n)),
        stage,
        rank,
        tile(plan.layers, k),
        tile(plan.metrics, k),
        values,
    )


# -- per-channel vectors and rows ----------------------------------------------------------------
_RUNNING_KEYS = ("running_mean", "running_var", "d", "v", "kl")


class ChannelColumns(Mapping[str, dict[str, np.ndarray]]):
    """The per-channel vectors of a step: layer -> {name: vector} (the keys the layer has),
    kept as the step's concatenated columns and sliced only when a layer is looked up.

    What consumers of all layers at once read instead of the mapping (the histogram writer,
    :func:`bnprobe.tensorboard.write_histograms`): ``layers`` (names, in tap order),
    ``sizes`` (channels of each layer), ``columns`` (name -> every layer's channels, one after
    the other; meaningless where a layer lacks the name) and ``present`` (name -> bool per
    layer: the layer has it). Read-only: the columns are the tap's arrays of this step.
    """

    __slots__ = ("_ends", "_index", "columns", "layers", "present", "sizes")

    def __init__(
        self,
        layers: tuple[str, ...],
        sizes: np.ndarray,
        columns: dict[str, np.ndarray],
        present: dict[str, np.ndarray],
    ) -> None:
        self.layers = layers
        self.sizes = sizes
        self.columns = columns
        self.present = present
        self._index: dict[str, int] | None = None
        self._ends: list[int] = []

    def __getitem__(self, layer: str) -> dict[str, np.ndarray]:
        if self._index is None:  # the first look-up: where each layer's channels end
            self._index = {name: i for i, name in enumerate(self.layers)}
            self._ends = np.cumsum(self.sizes).tolist()
        i = self._index[layer]
        end = self._ends[i]
        start = end - int(self.sizes[i])
        return {k: col[start:end] for k, col in self.columns.items() if self.present[k][i]}

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"ChannelColumns({dict(self.items())!r})"


def channel_vectors(
    ok: list[tuple[LayerState, Layout]], channels: np.ndarray, chan: dict[str, np.ndarray]
) -> ChannelColumns:
    """Each layer's per-channel vectors (the keys it has) for :attr:`Snapshot.channels`: the
    step's columns as they are (no per-layer work; :class:`ChannelColumns` slices a layer when
    it is looked up). ``channels``: each layer's channel count."""
    n = len(ok)
    running = np.fromiter((lay.running for _, lay in ok), dtype=bool, count=n)
    affine = np.fromiter((lay.affine for _, lay in ok), dtype=bool, count=n)
    every = np.ones(n, dtype=bool)
    present = {"batch_mean": every, "batch_var": every}
    present |= dict.fromkeys(_RUNNING_KEYS, running)
    present |= {"gamma": affine, "beta": affine}
    present = {k: has for k, has in present.items() if k in chan}
    columns = {k: chan[k] for k in present}
    layers = tuple(layer.name for layer, _ in ok)
    return ChannelColumns(layers, np.asarray(channels, dtype=np.int64), columns, present)


def channel_rows(
    ok: list[tuple[LayerState, Layout]],
    channels: np.ndarray,
    chan: dict[str, np.ndarray],
    step: int | list[int],
    epoch: int | list[int],
    stage: str,
    rank: int,
) -> Rows:
    """The per-channel rows of a step (``per_channel=True``), metric by metric, built with
    numpy over all layers at once; of k steps (``step`` and ``epoch`` lists, ``chan`` the k
    steps' vectors one after the other) as one multi-step block, each step's rows those of
    the step alone. ``channels``: each layer's channel count."""
    ends = np.cumsum(channels).tolist()
    starts = [0, *ends[:-1]]
    running = np.repeat([lay.running for _, lay in ok], channels)
    affine = np.repeat([lay.affine for _, lay in ok], channels)
    names = np.repeat(np.array([layer.name for layer, _ in ok], dtype=object), channels)
    index = np.arange(len(names)) - np.repeat(starts, channels)
    k = len(step) if isinstance(step, list) else 1
    width = len(names)
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
        n = int(mask.sum()) if mask is not None else width
        col_layers.append(names[sel])
        col_metrics.append(np.full(n, name, dtype=object))
        col_index.append(index[sel])
        col_values.append(vec.reshape(k, width)[:, sel])
    values = np.concatenate(col_values, axis=1).ravel()
    if not isinstance(step, list) or not isinstance(epoch, list):
        return Rows(
            int(step),  # type: ignore[arg-type]
            int(epoch),  # type: ignore[arg-type]
            stage,
            rank,
            np.concatenate(col_layers),
            np.concatenate(col_metrics),
            values,
            np.concatenate(col_index),
        )
    size = len(values) // k
    return Rows(
        read_only(np.repeat(np.array(step, dtype=np.int64), size)),
        read_only(np.repeat(np.array(epoch, dtype=np.int64), size)),
        stage,
        rank,
        tile(np.concatenate(col_layers), k),
        tile(np.concatenate(col_metrics), k),
        values,
        np.tile(np.concatenate(col_index), k),
    )
