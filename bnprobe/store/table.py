"""The tidy table: its schema, how rows are built (:class:`Rows`, :func:`make_rows`), and the
small table helpers every reader shares (:func:`conform`, :func:`concat`, :func:`dedupe`).

One value per row, columns in this order (SPEC.md):

    step, epoch, stage, rank, layer, channel, metric, value
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from bnprobe import metrics as _metrics

COLUMNS: tuple[str, ...] = ("step", "epoch", "stage", "rank", "layer", "channel", "metric", "value")
DTYPES: dict[str, Any] = {
    "step": "int64",
    "epoch": "int64",
    "stage": "object",
    "rank": "int64",
    "layer": "object",
    "channel": "Int64",
    "metric": "object",
    "value": "float64",
}
STAGES: tuple[str, ...] = _metrics.STAGES
MODEL = _metrics.MODEL_LAYER
"""Layer name of whole-model rows (``logits_gap``, ``pred_agreement``)."""

# The metric names by family, from the catalogue (bnprobe.metrics, docs/metrics.md); a layer's
# rows of stage train (and val) come in this order: moments, shifts, warm-up, counts, affine.
MOMENT_METRICS: tuple[str, ...] = _metrics.names("train", group="moment")
SHIFT_METRICS: tuple[str, ...] = _metrics.names("train", group="shift")
"""Metrics that need running statistics (absent for a layer without them)."""
WARMUP_METRICS: tuple[str, ...] = _metrics.names("train", group="warmup")
"""Stages train, val and probe: need a ``num_batches_tracked`` buffer (docs/metrics.md)."""
COUNT_METRICS: tuple[str, ...] = _metrics.names("train", group="count")
AFFINE_METRICS: tuple[str, ...] = _metrics.names("train", group="affine")
"""Stage train only; absent for ``affine=False`` layers."""
STRUCTURE_METRICS: tuple[str, ...] = _metrics.names("train", group="structure")
"""What the layer is rather than what its data are; ``samples_per_channel`` also in stage val."""
TRACE_METRICS: tuple[str, ...] = _metrics.names("train", group="trace")
"""Stage train, first measured step only: what produced the layer's input."""
PROBE_METRICS: tuple[str, ...] = _metrics.names("probe")
RECALIBRATE_METRICS: tuple[str, ...] = _metrics.names("recalibrate", without=[_metrics.FROZEN])
"""Rows of :func:`bnprobe.recalibrate` (the ``*_after`` ones only when applied; frozen layers
get the one row ``frozen`` instead)."""

KEY: list[str] = ["step", "stage", "rank", "layer", "channel", "metric"]
"""Columns that identify a measurement; :func:`load` keeps the last row written for each key."""

CONSTANT_METRICS: dict[str, frozenset[str]] = {
    stage: frozenset(m.name for m in _metrics.entries(stage) if m.constant)
    for stage in _metrics.STAGES
    if any(m.constant for m in _metrics.entries(stage))
}
"""Per stage, the metrics stored only when they change (:attr:`bnprobe.metrics.Metric.constant`)."""


def empty_frame() -> pd.DataFrame:
    """A table with the schema and no rows."""
    return conform(pd.DataFrame({c: [] for c in COLUMNS}))


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the SPEC columns, in order, with the SPEC dtypes."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"table is missing columns {missing}; expected {list(COLUMNS)}")
    out = df.loc[:, list(COLUMNS)].copy()
    for col, dtype in DTYPES.items():
        if out[col].dtype != dtype:
            out[col] = out[col].astype(dtype)
    return out.reset_index(drop=True)


def make_rows(
    *,
    step: int | np.ndarray,
    epoch: int | np.ndarray,
    stage: str,
    rank: int,
    layers: Sequence[str] | np.ndarray,
    metrics: Sequence[str] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    channels: Sequence[int | None] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Build rows that share stage and rank from parallel columns.

    ``layers``, ``metrics``, ``values`` (and ``channels`` if given; ``None`` = layer aggregate)
    have one entry per row; ``step`` and ``epoch`` are one int for all of them, or one int64
    array with an entry per row (a :class:`Rows` of several steps).
    """
    n = len(metrics)
    vals = np.asarray(values, dtype=np.float64)
    if len(layers) != n or vals.shape != (n,):
        raise ValueError("layers, metrics and values must have one entry per row")
    if channels is None:
        chan = pd.array([pd.NA] * n, dtype="Int64")
    else:
        chan = pd.array(list(channels), dtype="Int64")
    return pd.DataFrame(
        {
            "step": _per_row(step, n),
            "epoch": _per_row(epoch, n),
            "stage": np.full(n, stage, dtype=object),
            "rank": np.full(n, rank, dtype=np.int64),
            "layer": np.asarray(layers, dtype=object),
            "channel": chan,
            "metric": np.asarray(metrics, dtype=object),
            "value": vals,
        }
    )


def _per_row(value: int | np.ndarray, n: int) -> np.ndarray:
    """``value`` (an int, or an array of one entry per row) as an int64 column of ``n`` rows."""
    if isinstance(value, np.ndarray):
        if value.shape != (n,):
            raise ValueError(f"step and epoch arrays must have one entry per row ({n})")
        return value.astype(np.int64, copy=True)
    return np.full(n, value, dtype=np.int64)


class Rows(NamedTuple):
    """Rows that share stage and rank, as parallel columns, before any DataFrame is built: what
    the tap measures each step goes to the store and to TensorBoard like this. ``channels``
    None: layer aggregates (channel NA).

    ``step`` and ``epoch`` are ints (the rows of one step: what the tap makes), or int64 arrays
    with one entry per row: the rows of several steps, each step's rows together and the steps
    in order (:meth:`stack`; what rank 0 makes of a batch of another rank's steps). Every sink
    treats the rows of such a block exactly as the single-step blocks of :meth:`split`, given
    one after the other, only cheaper: a block pays each sink's fixed cost once, not per step."""

    step: int | np.ndarray
    epoch: int | np.ndarray
    stage: str
    rank: int
    layers: Sequence[str] | np.ndarray
    metrics: Sequence[str] | np.ndarray
    values: Sequence[float] | np.ndarray
    channels: np.ndarray | None = None

    @property
    def multi(self) -> bool:
        """Whether ``step`` is an array (rows of possibly several steps)."""
        return isinstance(self.step, np.ndarray)

    def runs(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of each step's rows: one per run of consecutive rows sharing step
        and epoch (one run for single-step rows)."""
        n = len(self.metrics)
        if not self.multi or n == 0:
            return [(0, n)] if n else []
        step, epoch = np.asarray(self.step), np.asarray(self.epoch)
        change = np.flatnonzero((step[1:] != step[:-1]) | (epoch[1:] != epoch[:-1])) + 1
        starts = [0, *change.tolist()]
        return list(zip(starts, [*starts[1:], n], strict=True))

    def split(self) -> list[Rows]:
        """These rows as single-step :class:`Rows`, one per step in order (themselves when
        single-step already). The name columns of a block made by :meth:`stack` of steps that
        shared them are those shared columns again (the same objects: caches keyed on them
        hold)."""
        if not self.multi:
            return [self]
        tiled = self.tiling()
        step, epoch = np.asarray(self.step), np.asarray(self.epoch)
        out = []
        for a, b in self.runs():
            layers: Sequence[str] | np.ndarray
            metrics: Sequence[str] | np.ndarray
            if tiled is not None:
                layers, metrics = tiled[1], tiled[2]
            else:
                layers, metrics = self.layers[a:b], self.metrics[a:b]
            out.append(
                Rows(
                    int(step[a]),
                    int(epoch[a]),
                    self.stage,
                    self.rank,
                    layers,
                    metrics,
                    self.values[a:b],
                    None if self.channels is None else self.channels[a:b],
                )
            )
        return out

    def tiling(self) -> tuple[int, Any, Any] | None:
        """``(n, layers, metrics)`` when these are the rows of k steps of n rows each, every
        step naming its rows with the same ``layers`` and ``metrics`` columns (a block from
        :meth:`stack` of steps that shared them): then a sink can work out what a step's names
        mean once, and take the values as a (k, n) matrix. None otherwise."""
        if not self.multi:
            return None
        lay, met = _TILES.get(id(self.layers)), _TILES.get(id(self.metrics))
        if lay is None or met is None or lay[0] is not self.layers or met[0] is not self.metrics:
            return None
        n, k = len(lay[1]), lay[2]
        if len(met[1]) != n or met[2] != k or n == 0 or n * k != len(self.metrics):
            return None
        last = _last_tiling
        if last[0] is self.step and last[1] is self.epoch and last[2] == (n, k):
            return (n, lay[1], met[1]) if last[3] else None
        step = np.asarray(self.step).reshape(k, n)
        epoch = np.asarray(self.epoch).reshape(k, n)
        ok = bool((step == step[:, :1]).all() and (epoch == epoch[:, :1]).all())
        first = step[:, 0]
        if ok and k > 1:
            ok = bool(((first[1:] != first[:-1]) | (epoch[1:, 0] != epoch[:-1, 0])).all())
        if not (_writable(self.step) or _writable(self.epoch)):  # cannot change: remember
            _last_tiling[:] = [self.step, self.epoch, (n, k), ok]
        return (n, lay[1], met[1]) if ok else None

    @classmethod
    def stack(cls, parts: Sequence[Rows]) -> Rows:
        """One block of the rows of several single-step ``parts`` (in order; the same stage and
        rank, all layer aggregates or all per-channel rows). Steps that share their name columns
        (the same objects) get shared, read-only repeated columns that :meth:`tiling` knows."""
        if not parts:
            raise ValueError("Rows.stack needs at least one part")
        first = parts[0]
        if any(p.multi for p in parts):
            raise ValueError("Rows.stack takes single-step Rows")
        if any(p.stage != first.stage or p.rank != first.rank for p in parts):
            raise ValueError("Rows.stack takes Rows of one stage and rank")
        if any((p.channels is None) != (first.channels is None) for p in parts):
            raise ValueError("Rows.stack takes layer rows or per-channel rows, not both")
        sizes = np.array([len(p.metrics) for p in parts], dtype=np.int64)
        step = read_only(np.repeat(np.array([p.step for p in parts], dtype=np.int64), sizes))
        epoch = read_only(np.repeat(np.array([p.epoch for p in parts], dtype=np.int64), sizes))
        values = np.concatenate([np.asarray(p.values, dtype=np.float64) for p in parts])
        shared = all(p.layers is first.layers and p.metrics is first.metrics for p in parts)
        if shared:
            layers: Any = tile(first.layers, len(parts))
            metrics: Any = tile(first.metrics, len(parts))
        else:
            layers = np.concatenate([np.asarray(p.layers, dtype=object) for p in parts])
            metrics = np.concatenate([np.asarray(p.metrics, dtype=object) for p in parts])
        channels = None
        if first.channels is not None:
            channels = np.concatenate([np.asarray(p.channels, dtype=np.int64) for p in parts])
        return cls(step, epoch, first.stage, first.rank, layers, metrics, values, channels)

    def frame(self) -> pd.DataFrame:
        """These rows as a table (:func:`make_rows`)."""
        return make_rows(**self._asdict())

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> list[Rows]:
        """The rows of a table with the SPEC columns as :class:`Rows`, in table order: one per
        run of consecutive rows that share step, epoch, stage, rank and whether the channel is
        NA (a table from :func:`make_rows` is one; none for an empty table)."""
        n = len(df)
        if n == 0:
            return []
        step = df["step"].to_numpy(dtype=np.int64)
        epoch = df["epoch"].to_numpy(dtype=np.int64)
        stage = df["stage"].to_numpy(dtype=object)
        rank = df["rank"].to_numpy(dtype=np.int64)
        na = df["channel"].isna().to_numpy()
        change = np.zeros(n, dtype=bool)
        change[0] = True
        for key in (step, epoch, stage, rank, na):
            change[1:] |= key[1:] != key[:-1]
        starts = np.flatnonzero(change).tolist()
        layers = df["layer"].to_numpy(dtype=object)
        metrics = df["metric"].to_numpy(dtype=object)
        values = df["value"].to_numpy(dtype=np.float64)
        channels = df["channel"].fillna(-1).to_numpy(dtype=np.int64)
        return [
            cls(
                int(step[a]),
                int(epoch[a]),
                str(stage[a]),
                int(rank[a]),
                layers[a:b].tolist(),
                metrics[a:b].tolist(),
                values[a:b].tolist(),
                None if na[a] else channels[a:b],
            )
            for a, b in zip(starts, [*starts[1:], n], strict=True)
        ]


_last_tiling: list[Any] = [None, None, None, False]
"""The read-only step and epoch columns :meth:`Rows.tiling` last checked, and the answer (every
sink asks it of the same block)."""


def _writable(column: object) -> bool:
    return not isinstance(column, np.ndarray) or column.flags.writeable


def read_only(column: np.ndarray) -> np.ndarray:
    """``column``, made read-only (a block's step and epoch columns: :meth:`Rows.tiling` may
    then remember its answer for them)."""
    column.flags.writeable = False
    return column


_TILES: dict[int, tuple[np.ndarray, Any, int]] = {}
"""id of a column made by :func:`tile` -> (the column, the names it repeats, times)."""
_TILE_OF: dict[tuple[int, int], np.ndarray] = {}
_MAX_TILES = 64


def tile(names: Sequence[str] | np.ndarray, k: int) -> np.ndarray:
    """``names`` repeated ``k`` times as a read-only object array: the same array for the same
    ``names`` object and ``k`` (a few dozen are remembered), so that :meth:`Rows.tiling` knows
    what it repeats and caches keyed on it hold."""
    key = (id(names), k)
    out = _TILE_OF.get(key)
    if out is not None and _TILES[id(out)][1] is names:
        return out
    out = np.tile(np.asarray(names, dtype=object), k)
    out.flags.writeable = False
    if len(_TILE_OF) >= _MAX_TILES:  # forget the oldest
        old_key = next(iter(_TILE_OF))
        _TILES.pop(id(_TILE_OF.pop(old_key)), None)
    _TILE_OF[key] = out
    _TILES[id(out)] = (out, names, k)
    return out


def frozen_names(names: object) -> bool:
    """Whether a column of names cannot change after it was made (a tuple, or a read-only numpy
    array, as the tap and the gather hand out every step): then the same object means the same
    names, and caches keyed on it need no element-wise comparison."""
    return isinstance(names, tuple) or (isinstance(names, np.ndarray) and not names.flags.writeable)


class FrozenMemo:
    """What was worked out from columns of names that cannot change (:func:`frozen_names`),
    known by the column's identity: the same object means the same names. Holds the columns
    it knows (so an id is never reused while kept) and at most ``size`` of them, forgetting
    the oldest."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._kept: dict[int, tuple[object, Any]] = {}

    def get(self, column: object) -> Any:
        """What :meth:`put` kept for this very column (None: nothing, or it can change)."""
        kept = self._kept.get(id(column)) if frozen_names(column) else None
        return kept[1] if kept is not None and kept[0] is column else None

    def put(self, column: object, value: Any) -> None:
        """Keep ``value`` for ``column`` if it cannot change."""
        if not frozen_names(column):
            return
        if len(self._kept) >= self._size:
            del self._kept[next(iter(self._kept))]
        self._kept[id(column)] = (column, value)


def same_names(a: object, b: object) -> bool:
    """Whether two columns of names (lists, tuples or numpy arrays) hold the same names: by
    identity for :func:`frozen_names`, else element by element."""
    if a is b and frozen_names(a):
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return len(a) == len(b) and bool(np.array_equal(np.asarray(a), np.asarray(b)))  # type: ignore[arg-type]
    return bool(list(a) == list(b))  # type: ignore[call-overload]


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables, keeping the schema (an empty table when there is nothing)."""
    parts = [f for f in frames if len(f)]
    if not parts:
        return empty_frame()
    return conform(pd.concat(parts, ignore_index=True))


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the last row for each measurement key (``KEY``), in first-seen order."""
    keyed = df.assign(channel=df["channel"].fillna(-1))
    keep = ~keyed.duplicated(subset=KEY, keep="last")
    return df.loc[keep.to_numpy()].reset_index(drop=True)


def with_runs(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One table of several runs' tables, with a last column ``run`` (object dtype)."""
    tables = [f.assign(run=run) for run, f in frames.items() if len(f)]
    out = pd.concat(tables, ignore_index=True) if tables else empty_frame().assign(run=[])
    out["run"] = out["run"].astype(object)
    return out
