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
    step: int,
    epoch: int,
    stage: str,
    rank: int,
    layers: Sequence[str] | np.ndarray,
    metrics: Sequence[str] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    channels: Sequence[int | None] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Build rows that share step, epoch, stage and rank from parallel columns.

    ``layers``, ``metrics``, ``values`` (and ``channels`` if given; ``None`` = layer aggregate)
    have one entry per row.
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
            "step": np.full(n, step, dtype=np.int64),
            "epoch": np.full(n, epoch, dtype=np.int64),
            "stage": np.full(n, stage, dtype=object),
            "rank": np.full(n, rank, dtype=np.int64),
            "layer": np.asarray(layers, dtype=object),
            "channel": chan,
            "metric": np.asarray(metrics, dtype=object),
            "value": vals,
        }
    )


class Rows(NamedTuple):
    """Rows that share step, epoch, stage and rank, as parallel columns, before any DataFrame
    is built: what the tap measures each step goes to the store and to TensorBoard like this.
    ``channels`` None: layer aggregates (channel NA)."""

    step: int
    epoch: int
    stage: str
    rank: int
    layers: Sequence[str] | np.ndarray
    metrics: Sequence[str] | np.ndarray
    values: Sequence[float] | np.ndarray
    channels: np.ndarray | None = None

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


def frozen_names(names: object) -> bool:
    """Whether a column of names cannot change after it was made (a tuple, or a read-only numpy
    array, as the tap and the gather hand out every step): then the same object means the same
    names, and caches keyed on it need no element-wise comparison."""
    return isinstance(names, tuple) or (isinstance(names, np.ndarray) and not names.flags.writeable)


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
