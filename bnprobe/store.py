"""The tidy table: its schema, how rows are built, and the crash-safe parquet store.

One value per row, columns in this order (SPEC.md):

    step, epoch, stage, rank, layer, channel, metric, value

The store writes each flush as one complete parquet *part file*, first under a hidden temporary
name and then renamed into place (``os.replace`` is atomic on POSIX and Windows). A process
killed at any moment therefore leaves only whole part files behind: every flushed row can be
read back with :func:`load`, and a half-written file is never visible to it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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

PART_GLOB = "part-*.parquet"


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


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables, keeping the schema (an empty table when there is nothing)."""
    parts = [f for f in frames if len(f)]
    if not parts:
        return empty_frame()
    return conform(pd.concat(parts, ignore_index=True))


class _Columns:
    """The table's columns in a few large numpy buffers that double when full.

    One small DataFrame kept per measured step would leave many small long-lived blocks on the
    C heap between the (much larger) activation buffers that training frees and allocates every
    step; glibc then cannot give that memory back and the process grows by megabytes a step
    (measured: 4 MB/step on the demo net at every_n_steps=1). A handful of doubling buffers
    keeps what the probe holds compact.
    """

    _DTYPES: ClassVar[dict[str, Any]] = {
        "step": np.int64,
        "epoch": np.int64,
        "stage": object,
        "rank": np.int64,
        "layer": object,
        "channel": np.int64,  # NA kept as a mask
        "metric": object,
        "value": np.float64,
    }

    def __init__(self) -> None:
        self.n = 0
        self._data = {c: np.empty(0, dtype=t) for c, t in self._DTYPES.items()}
        self._na = np.empty(0, dtype=bool)

    def extend(self, rows: Rows) -> None:
        m = len(rows.metrics)
        cols: dict[str, Any] = {
            "step": rows.step,
            "epoch": rows.epoch,
            "stage": rows.stage,
            "rank": rows.rank,
            "layer": rows.layers,
            "channel": -1 if rows.channels is None else rows.channels,
            "metric": rows.metrics,
            "value": rows.values,
        }
        na = rows.channels is None
        stop = self.n + m
        if stop > len(self._na):
            capacity = max(stop, 2 * len(self._na), 1024)
            for c, old in self._data.items():
                self._data[c] = np.empty(capacity, dtype=old.dtype)
                self._data[c][: self.n] = old[: self.n]
            grown = np.empty(capacity, dtype=bool)
            grown[: self.n] = self._na[: self.n]
            self._na = grown
        self._na[self.n : stop] = na
        for c, values in cols.items():
            self._data[c][self.n : stop] = values
        self.n = stop

    def frame(
        self, start: int = 0, stop: int | None = None, metrics: Collection[str] | None = None
    ) -> pd.DataFrame:
        """Rows ``[start, stop)`` (of the given ``metrics`` only, if given) as a table."""
        stop = self.n if stop is None else stop
        rows: Any = slice(start, stop)
        if metrics is not None:
            wanted = set(metrics)
            names = self._data["metric"][start:stop]
            rows = start + np.flatnonzero([name in wanted for name in names])
        cols: dict[str, Any] = {
            c: pd.Series(self._data[c][rows], dtype=t) for c, t in DTYPES.items()
        }
        cols["channel"] = pd.arrays.IntegerArray(self._data["channel"][rows], self._na[rows])
        return pd.DataFrame(cols)  # the SPEC dtypes already: no inference of string columns

    def table(self, start: int = 0) -> pa.Table:
        """Rows from ``start`` on as an Arrow table for parquet, with the string columns
        dictionary-encoded (a few distinct names repeated on every row)."""
        rows = slice(start, self.n)
        arrays: dict[str, pa.Array] = {}
        for c in COLUMNS:
            values = self._data[c][rows]
            if c == "channel":
                arrays[c] = pa.array(values, mask=self._na[rows])
            elif values.dtype == object:
                codes, names = pd.factorize(values)
                arrays[c] = pa.DictionaryArray.from_arrays(
                    pa.array(codes.astype(np.int32)), pa.array(names.astype(object), pa.string())
                )
            else:
                arrays[c] = pa.array(values)
        return pa.table(arrays)


class Store:
    """Rows collected so far, in memory, and flushed to ``save_dir`` as atomic part files.

    ``save_dir=None`` keeps rows in memory only. Each instance names its parts with its rank and
    a per-run token, so several processes, and a resumed run, never overwrite each other.
    """

    def __init__(self, save_dir: str | os.PathLike[str] | None = None, *, rank: int = 0) -> None:
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.rank = rank
        self._token = f"{time.time_ns():020d}-{os.getpid()}"
        self._seq = 0
        self._rows = _Columns()  # every row, in order
        self._flushed = 0  # rows [0, _flushed) are saved
        self._cache: pd.DataFrame | None = None

    def append(self, rows: Rows | pd.DataFrame) -> None:
        """Keep ``rows`` (:class:`Rows`, or a table with the SPEC columns from a caller outside
        the tap, turned into Rows here)."""
        for part in [rows] if isinstance(rows, Rows) else Rows.from_frame(rows):
            if len(part.metrics):
                self._rows.extend(part)
                self._cache = None

    @property
    def pending_rows(self) -> int:
        return self._rows.n - self._flushed

    def select(self, metrics: Collection[str]) -> pd.DataFrame:
        """The rows of these metrics only (SPEC schema): what a figure needs, without copying
        the whole table."""
        return self._rows.frame(metrics=metrics) if self._rows.n else empty_frame()

    def to_dataframe(self) -> pd.DataFrame:
        if self._cache is None:
            self._cache = self._rows.frame() if self._rows.n else empty_frame()
        return self._cache.copy()

    def flush(self) -> Path | None:
        """Write the rows not yet saved as one part file; return its path (None if nothing)."""
        if self.save_dir is None or not self.pending_rows:
            return None
        table = self._rows.table(self._flushed)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-r{self.rank:04d}-{self._token}-{self._seq:06d}.parquet"
        final = self.save_dir / name
        tmp = self.save_dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:  # make the bytes durable before the rename publishes them
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self._seq += 1
        self._flushed = self._rows.n
        return final


STORE_NAME = "bnprobe_store"
"""The folder a run's store goes in by default (``<log_dir>/bnprobe_store``): a name that
cannot be imported as the package, unlike the ``bnprobe`` folder of bnprobe 0.1."""
STORE_NAMES: tuple[str, ...] = (STORE_NAME, "bnprobe")
"""Folder names of a store inside its run folder (the second: stores written before 0.2)."""


class StoreError(ValueError):
    """A store that exists but could not be read (every part damaged, or not a bnprobe table)."""


def load(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read the saved store of a run, or of every run in a folder of runs.

    ``path`` is a store folder (the one holding ``part-*.parquet`` files, by default
    ``<log_dir>/bnprobe_store``), a run folder holding one, a folder of runs, or one part file.
    A run is the folder of a store (its parent when the store folder has the default name
    ``bnprobe_store``, or ``bnprobe`` for stores written before 0.2). When ``path`` holds
    several runs, each keeps its own rows and a last column ``run`` holds the run folder's path
    relative to ``path`` (posix separators), the same names :func:`bnprobe.read_tensorboard`
    gives the runs' event files: runs are never merged.

    Within a run, where a resumed run measured a step again, the row written last wins, so a
    key appears once. A part file that cannot be read (truncated, empty, not parquet) is
    skipped with one warning naming it; the other parts load.

    Raises FileNotFoundError when ``path`` does not exist or holds no store, ValueError when
    ``path`` is a file that is not a parquet table, and :class:`StoreError` when no part of
    the store could be read.
    """
    frames = load_runs(path)
    if len(frames) == 1:
        return next(iter(frames.values()))
    return with_runs(frames)


def load_runs(path: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """What :func:`load` reads, as ``{run: table}`` (each table without a ``run`` column).

    Runs are named as in :func:`load` (``"."`` for ``path`` itself); the same errors and
    warnings as :func:`load`.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no bnprobe store at {str(root)!r}: the path does not exist")
    if root.is_file():
        table = _load_file(root)
        if "run" not in table.columns:
            return {".": table}
        return {
            str(run): part.drop(columns="run").reset_index(drop=True)
            for run, part in table.groupby("run", sort=False)
        }
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(
            f"no bnprobe store at {str(root)!r}: no {PART_GLOB} files in it or in a folder "
            f"below it. Pass a run folder (the logger's version folder, holding "
            f"{STORE_NAME}), a folder of runs, or the store folder itself."
        )
    frames: dict[str, pd.DataFrame] = {}
    unreadable: list[Path] = []
    for run, parts in runs.items():
        tables: list[pd.DataFrame] = []
        for part in parts:
            read = _read_part(part)
            if read is None:
                unreadable.append(part)
            else:
                tables.append(read)
        if tables:
            frames[run] = dedupe(concat(tables))
    if not frames:
        what = str(unreadable[0]) if len(unreadable) == 1 else f"{len(unreadable)} part files"
        raise StoreError(
            f"the bnprobe store at {str(root)!r} could not be read: {what} unreadable "
            "(truncated or not parquet)"
        )
    return frames


def with_runs(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One table of several runs' tables, with a last column ``run`` (object dtype)."""
    out = pd.concat([f.assign(run=run) for run, f in frames.items() if len(f)], ignore_index=True)
    out["run"] = out["run"].astype(object)
    return out


def find_runs(root: Path) -> dict[str, list[Path]]:
    """``{run: part files}`` of every store at or below ``root``, runs in name order.

    A folder holding part files is a store; its run is its parent when it is named like a
    store (:data:`STORE_NAMES`), else the store folder itself. Several stores of one run (an
    old ``bnprobe`` and a new ``bnprobe_store`` folder) are one run. Hidden folders and the
    temporary names of parts being written are skipped.
    """
    stores = sorted({p.parent for p in root.rglob(PART_GLOB) if not _hidden(p, root)})
    runs: dict[str, list[Path]] = {}
    for folder in stores:
        run_dir = folder.parent if folder.name in STORE_NAMES and folder != root else folder
        run = run_dir.relative_to(root).as_posix()
        runs.setdefault(run, []).extend(sorted(folder.glob(PART_GLOB)))
    return dict(sorted(runs.items()))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_part(part: Path) -> pd.DataFrame | None:
    """One part file as a table, or None with a warning when it cannot be read."""
    try:
        table = pd.read_parquet(part)
        return conform(table)
    except Exception as err:  # a damaged file must not hide the others
        warnings.warn(
            f"bnprobe.load: skipped the unreadable part {str(part)!r} "
            f"({type(err).__name__}: {_first_line(err)})",
            UserWarning,
            stacklevel=3,
        )
        return None


def _load_file(path: Path) -> pd.DataFrame:
    """A single parquet file: one part of a store, or a table written by ``bnprobe export``."""
    try:
        table = pd.read_parquet(path)
    except Exception as err:
        if path.suffix != ".parquet":
            raise ValueError(
                f"{str(path)!r} is {_kind_of_file(path)}, not a bnprobe store. Pass a run "
                f"folder (the logger's version folder, holding {STORE_NAME}), a folder of runs, "
                "the store folder, or one of its part-*.parquet files."
            ) from None
        raise StoreError(
            f"{str(path)!r} could not be read as parquet ({type(err).__name__}: "
            f"{_first_line(err)}): the file is damaged or truncated"
        ) from None
    try:
        out = conform(table)
    except ValueError as err:
        raise StoreError(f"{str(path)!r} is parquet but not a bnprobe table: {err}") from None
    if "run" in table.columns:  # an export of several runs keeps them apart
        out["run"] = table["run"].astype(object).to_numpy()
        return pd.concat(
            [dedupe(part) for _, part in out.groupby("run", sort=False)], ignore_index=True
        )
    return dedupe(out)


def _kind_of_file(path: Path) -> str:
    if path.name.startswith("events.out.tfevents."):
        return "a TensorBoard event file"
    if path.suffix.lower() == ".csv":
        return "a CSV file"
    return f"a {path.suffix} file" if path.suffix else "a file"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the last row for each measurement key (``KEY``), in first-seen order."""
    keyed = df.assign(channel=df["channel"].fillna(-1))
    keep = ~keyed.duplicated(subset=KEY, keep="last")
    return df.loc[keep.to_numpy()].reset_index(drop=True)
