"""The store while a run writes it: rows in a few bounded buffers, spilled to atomic part files,
constants kept only when they change, parts merged so that a long run holds few of them.

Each flush writes one complete parquet *part file*, first under a hidden temporary name and then
renamed into place (``os.replace`` is atomic on POSIX and Windows), after an ``fsync``. A process
killed at any moment therefore leaves only whole part files behind: every flushed row can be read
back with :func:`bnprobe.load`, and a half-written file is never visible to it.

Memory: with a folder, the store holds only the rows not yet saved (at most ``spill_rows`` of
them before the recorder saves: :attr:`Store.must_spill`); reads (:meth:`Store.to_dataframe`)
come from disk. Without a folder (``save_dir=None``) every row stays in memory.

Compaction (tiered): when a store holds ``FAN_IN`` parts of one level, it merges them, in order,
into one part of the next level, streaming row groups (memory: one row group). A part of
``MAX_PART_ROWS`` rows or more is not merged again. A run of R rows therefore holds about
R / MAX_PART_ROWS + (FAN_IN - 1) x (number of levels) parts, and each row is rewritten a few
times. The merged part is written and renamed before its inputs are removed, and its name
(``part-r<rank>-<token>-<first>-<last>.parquet``) says which parts it holds, so a reader skips
the inputs a killed compaction left behind (:func:`bnprobe.store.read.part_order`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bnprobe.store import read as _read
from bnprobe.store.constants import Changes
from bnprobe.store.table import COLUMNS, DTYPES, FrozenMemo, Rows, empty_frame

SPILL_ROWS = 1 << 18
"""Rows a store with a folder holds before the recorder saves them (about 17 MB)."""
FAN_IN = 8
"""Parts of one level merged into one part of the next."""
MAX_PART_ROWS = 1 << 21
"""A part this large (about 2M rows) is not merged again."""
ROW_GROUP_ROWS = 1 << 17
"""Rows per parquet row group in merged parts (filters skip whole row groups by their stats)."""
STALE_TMP_S = 3600.0
"""Where a writer's process cannot be asked (not POSIX), a temporary part this old is stale."""

_NAME = pa.dictionary(pa.int32(), pa.string())
SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("stage", _NAME),
        ("rank", pa.int64()),
        ("layer", _NAME),
        ("channel", pa.int64()),
        ("metric", _NAME),
        ("value", pa.float64()),
    ]
)
"""A part file's Arrow schema: ``stage``, ``layer`` and ``metric`` dictionary-encoded."""
WRITE_OPTIONS: dict[str, Any] = {"use_dictionary": [c for c in SCHEMA.names if c != "value"]}
"""How parts are written: parquet's dictionary pages for every column but ``value`` (trying
one on the values, nearly all distinct, cost more time than the rest of the write)."""


class _Names:
    """A column of names (stage, layer or metric) as int32 codes into the names seen so far.

    The tap names a step's rows with the same read-only columns every step (a block of steps:
    those repeated, :meth:`Rows.tiling`), so a column is encoded once and its codes reused: no
    name is hashed per row, and a part file's dictionary is built from the codes."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}
        self._memo = FrozenMemo()

    def code(self, name: str) -> int:
        code = self._codes.get(name)
        if code is None:
            code = self._codes[name] = len(self.names)
            self.names.append(name)
        return code

    def encode(self, column: Sequence[str] | np.ndarray) -> np.ndarray:
        """The codes of ``column``, remembered for a column that cannot change."""
        known: np.ndarray | None = self._memo.get(column)
        if known is not None:
            return known
        inverse, seen = pd.factorize(np.asarray(column, dtype=object))
        codes = np.array([self.code(name) for name in seen], dtype=np.int32)[inverse]
        codes.flags.writeable = False
        self._memo.put(column, codes)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The names of ``codes``, as an object array."""
        names: np.ndarray = np.array(self.names, dtype=object)[codes]
        return names

    def dictionary(self, codes: np.ndarray) -> pa.DictionaryArray:
        """``codes`` as an Arrow dictionary column holding only the names they use."""
        used = np.bincount(codes, minlength=len(self.names)) > 0
        renumber = np.cumsum(used, dtype=np.int32) - 1
        names = pa.array(np.array(self.names, dtype=object)[used], pa.string())
        return pa.DictionaryArray.from_arrays(renumber[codes], names)


class _Columns:
    """The table's columns in a few large numpy buffers that double when full; the name columns
    (stage, layer, metric) as int32 codes (:class:`_Names`).

    One small DataFrame kept per measured step would leave many small long-lived blocks on the
    C heap between the (much larger) activation buffers that training frees and allocates every
    step; glibc then cannot give that memory back and the process grows by megabytes a step
    (measured: 4 MB/step on the demo net at every_n_steps=1). A handful of doubling buffers
    keeps what the probe holds compact.
    """

    _DTYPES: ClassVar[dict[str, Any]] = {
        "step": np.int64,
        "epoch": np.int64,
        "stage": np.int32,
        "rank": np.int64,
        "layer": np.int32,
        "channel": np.int64,  # NA kept as a mask
        "metric": np.int32,
        "value": np.float64,
    }
    _NAMED = ("stage", "layer", "metric")

    def __init__(self) -> None:
        self.n = 0
        self._data = {c: np.empty(0, dtype=t) for c, t in self._DTYPES.items()}
        self._na = np.empty(0, dtype=bool)
        self._names = {c: _Names() for c in self._NAMED}

    def extend(self, rows: Rows, keep: np.ndarray | None = None) -> None:
        """Add ``rows`` (only those where ``keep`` is True, if given)."""
        layers, metrics = self._name_codes(rows)
        channels, values = rows.channels, rows.values
        step, epoch = rows.step, rows.epoch  # ints, or one entry per row (several steps)
        if keep is not None:
            if isinstance(step, np.ndarray):
                step = step[keep]
            if isinstance(epoch, np.ndarray):
                epoch = epoch[keep]
            layers, metrics = layers[keep], metrics[keep]
            values = np.asarray(values, dtype=np.float64)[keep]
            if channels is not None:
                channels = np.asarray(channels, dtype=np.int64)[keep]
        cols: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "stage": self._names["stage"].code(rows.stage),
            "rank": rows.rank,
            "layer": layers,
            "channel": -1 if channels is None else channels,
            "metric": metrics,
            "value": values,
        }
        m = len(metrics)
        na = channels is None
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

    def _name_codes(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """The codes of ``rows``' layer and metric columns; a block of steps named alike
        (:meth:`Rows.tiling`) has its one step's names encoded and the codes repeated."""
        layer, metric = self._names["layer"], self._names["metric"]
        tiled = rows.tiling()
        if tiled is None:
            return layer.encode(rows.layers), metric.encode(rows.metrics)
        k = len(rows.metrics) // tiled[0]
        return np.tile(layer.encode(tiled[1]), k), np.tile(metric.encode(tiled[2]), k)

    def frame(self) -> pd.DataFrame:
        """The rows as a table."""
        cols: dict[str, Any] = {}
        for c, t in DTYPES.items():
            values = self._data[c][: self.n]
            if c in self._names:
                values = self._names[c].decode(values)
            cols[c] = pd.Series(values, dtype=t)
        cols["channel"] = pd.arrays.IntegerArray(
            self._data["channel"][: self.n], self._na[: self.n]
        )
        return pd.DataFrame(cols)  # the SPEC dtypes already: no inference of string columns

    def clear(self) -> None:
        """Forget the rows (after they were saved); the buffers are kept for the next ones."""
        self.n = 0

    def table(self) -> pa.Table:
        """The rows as an Arrow table for parquet, with the name columns dictionary-encoded (a
        few distinct names repeated on every row)."""
        rows = slice(0, self.n)
        arrays: dict[str, pa.Array] = {}
        for c in COLUMNS:
            values = self._data[c][rows]
            if c == "channel":
                arrays[c] = pa.array(values, mask=self._na[rows])
            elif c in self._names:
                arrays[c] = self._names[c].dictionary(values)
            else:
                arrays[c] = pa.array(values)
        return pa.table(arrays, schema=SCHEMA)


@dataclass
class _Part:
    path: Path
    first: int
    last: int
    level: int
    rows: int


class Store:
    """A run's rows: flushed to ``save_dir`` as atomic part files, or, with ``save_dir=None``,
    kept in memory only.

    Each instance names its parts with its rank and a per-run token, so several processes, and
    a resumed run, never overwrite each other. Constants are kept only when they change
    (:mod:`bnprobe.store.constants`); :meth:`to_dataframe` fills them back in.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        *,
        rank: int = 0,
        spill_rows: int = SPILL_ROWS,
    ) -> None:
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.rank = rank
        self.spill_rows = spill_rows
        self._token = f"{time.time_ns():020d}-{os.getpid()}"
        self._seq = 0
        self._rows = _Columns()  # rows not saved yet (all of them without a folder)
        self._changes = Changes()
        self._parts: list[_Part] = []  # this store's part files, in order
        self._cleaned: Path | None = None

    def append(self, rows: Rows | pd.DataFrame) -> None:
        """Keep ``rows`` (:class:`Rows` of one step or several, or a table with the SPEC columns
        from a caller outside the tap, turned into Rows here); constants only where they
        changed, step by step."""
        for part in [rows] if isinstance(rows, Rows) else Rows.from_frame(rows):
            if len(part.metrics):
                self._rows.extend(part, self._changes.keep(part))

    @property
    def pending_rows(self) -> int:
        """Rows not saved yet."""
        return self._rows.n if self.save_dir is not None else 0

    @property
    def memory_bytes(self) -> int:
        """Bytes of the row buffers held in memory (their capacity; string columns count one
        reference per row: the names themselves are shared)."""
        return int(sum(a.nbytes for a in self._rows._data.values()) + self._rows._na.nbytes)

    @property
    def must_spill(self) -> bool:
        """Does the store hold ``spill_rows`` unsaved rows (the recorder then saves them)?"""
        return self.save_dir is not None and self._rows.n >= self.spill_rows

    @property
    def part_files(self) -> list[Path]:
        """This store's part files, in order."""
        return [p.path for p in self._parts]

    def select(self, metrics: Collection[str]) -> pd.DataFrame:
        """The rows of these metrics only (SPEC schema): what a figure needs."""
        return self.to_dataframe(metrics=list(metrics))

    def to_dataframe(
        self,
        *,
        stages: str | Collection[str] | None = None,
        layers: str | Collection[str] | None = None,
        metrics: str | Collection[str] | None = None,
        steps: tuple[int | None, int | None] | None = None,
        constants: _read.Constants = "every_step",
    ) -> pd.DataFrame:
        """Every row this store was given (its part files, then the rows not saved yet), with
        the filters and ``constants`` of :func:`bnprobe.load` (read from disk with the filters
        pushed down)."""
        selection = _read.Selection.of(stages, layers, metrics, steps, constants)
        frames = []
        if self._parts:
            frames.append(_read.read_parts(self.part_files, selection))
        if self._rows.n:
            pending = self._rows.frame()
            if not selection.everything:
                pending = pending.loc[_wanted(pending, selection)]
            frames.append(pending)
        frames = [f for f in frames if len(f)]
        if not frames:
            return empty_frame()
        raw = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return selection.finish(raw.reset_index(drop=True))

    def flush(self) -> Path | None:
        """Write the rows not yet saved as one part file, then merge parts if a level is full
        (module docstring); return the new part's path (None if nothing was pending)."""
        if self.save_dir is None or not self._rows.n:
            return None
        folder = self.save_dir
        folder.mkdir(parents=True, exist_ok=True)
        if self._cleaned != folder:
            self._cleaned = folder
            remove_stale(folder, keep=self._token)
        name = f"part-r{self.rank:04d}-{self._token}-{self._seq:06d}.parquet"
        final = _publish(
            folder, name, lambda tmp: pq.write_table(self._rows.table(), tmp, **WRITE_OPTIONS)
        )
        self._parts.append(_Part(final, self._seq, self._seq, 0, self._rows.n))
        self._seq += 1
        self._rows.clear()
        self._compact()
        return final

    def _compact(self) -> None:
        level = 0
        while True:
            group = [p for p in self._parts if p.level == level]
            if len(group) < FAN_IN:
                return
            self._merge(group, level + 1)
            level += 1

    def _merge(self, group: list[_Part], level: int) -> None:
        assert self.save_dir is not None
        first, last = group[0].first, group[-1].last
        rows = sum(p.rows for p in group)
        name = f"part-r{self.rank:04d}-{self._token}-{first:06d}-{last:06d}.parquet"
        inputs = [p.path for p in group]
        final = _publish(self.save_dir, name, lambda tmp: _concat_parts(inputs, tmp))
        at = self._parts.index(group[0])
        merged = _Part(final, first, last, level if rows < MAX_PART_ROWS else -1, rows)
        self._parts[at : at + len(group)] = [merged]
        for path in inputs:
            path.unlink(missing_ok=True)


def _wanted(df: pd.DataFrame, selection: _read.Selection) -> np.ndarray:
    """Rows of ``df`` a read needs before :meth:`Selection.finish`: those selected and, when
    constants are filled, the constants and anchors up to the last step."""
    if selection.fills():
        wide = _read.Selection(selection.stages, selection.layers, None, (None, selection.steps[1]))
        return wide.mask(df)
    return selection.mask(df)


def _publish(folder: Path, name: str, write: Any) -> Path:
    """Write a part under a hidden temporary name, make it durable, rename it into place."""
    final = folder / name
    tmp = folder / f".{name}.tmp"
    write(tmp)
    with open(tmp, "rb") as fh:  # make the bytes durable before the rename publishes them
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def _concat_parts(inputs: list[Path], out: Path) -> None:
    """Stream the parts ``inputs`` into one file, in order, row group by row group."""
    with pq.ParquetWriter(out, SCHEMA, **WRITE_OPTIONS) as writer:
        held: list[pa.Table] = []
        count = 0
        for path in inputs:
            source = pq.ParquetFile(path)
            for i in range(source.num_row_groups):
                table = source.read_row_group(i, columns=list(COLUMNS))
                held.append(_as_schema(table))
                count += table.num_rows
                if count >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(held).unify_dictionaries(),
                                       row_group_size=ROW_GROUP_ROWS)  # fmt: skip
                    held, count = [], 0
        if held:
            writer.write_table(pa.concat_tables(held).unify_dictionaries())


def _as_schema(table: pa.Table) -> pa.Table:
    if table.schema.equals(SCHEMA):
        return table
    return table.cast(SCHEMA)


def remove_stale(folder: Path, keep: str = "") -> list[Path]:
    """Remove what dead writers left in a store folder: temporary parts (``.part-*.tmp``) whose
    process is gone, and parts a killed compaction had already merged (never a part with rows
    found nowhere else; ``keep``: a token whose files are left alone). Returns what it removed."""
    removed: list[Path] = []
    for tmp in folder.glob(".part-*.parquet.tmp"):
        found = _read.TMP_NAME.fullmatch(tmp.name)
        if (keep and keep in tmp.name) or found is None or not _gone(int(found.group(1)), tmp):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    parts = sorted(folder.glob(_read.PART_GLOB))
    for part in _read.superseded(parts):
        if not (keep and keep in part.name):
            part.unlink(missing_ok=True)
            removed.append(part)
    return removed


def _gone(pid: int, path: Path) -> bool:
    """Has the process that was writing ``path`` ended?"""
    if pid == os.getpid():
        return False
    if os.name != "posix":
        try:
            return time.time() - path.stat().st_mtime > STALE_TMP_S
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
