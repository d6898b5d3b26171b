"""Streaming a saved run into a :class:`~bnprobe.diagnosis.digest.Digest`: what ``bnprobe report``
reads, batch by batch, without building the run's table.

:func:`digest_parts` reads a run's parquet part files with pyarrow, one record batch at a time,
only the SPEC columns and only the metrics the rules and the report read
(:data:`~bnprobe.diagnosis.digest.READ_METRICS`), and feeds them to a digest: memory is the
digest's (bounded) plus a few batches. A reader thread decodes the next batches (pyarrow and
numpy release the GIL) while the digest takes the current one. Parts are read in the order
:func:`bnprobe.load` reads them;
unlike :func:`bnprobe.load`, rows that a resumed run measured twice are not deduplicated
(the wide views the rules read keep the last row of a key, as before).

This module imports no torch and no Lightning. (When the store's filtered reads land,
``_read_part`` is the one place to switch.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bnprobe import store
from bnprobe.diagnosis.digest import READ_METRICS, Digest

BATCH_ROWS = 1 << 18
"""Rows per record batch read from a part file."""


def digest_parts(
    parts: Iterable[Path], digest: Digest | None = None, *, batch_rows: int = BATCH_ROWS
) -> tuple[Digest, list[Path]]:
    """Feed every readable part to ``digest`` (a new one by default); return it and the parts
    that could not be read (each with a warning, as :func:`bnprobe.load` gives)."""
    digest = digest if digest is not None else Digest()
    unreadable: list[Path] = []
    for part, batches in _read_ahead(list(parts), batch_rows):
        try:
            for cols, strings in batches:
                for c, (codes, names) in strings.items():
                    cols[c] = digest.encode(names)[codes]
                digest.add_codes(cols)
        except Exception as err:  # a damaged file must not hide the others
            unreadable.append(part)
            store.warn_unreadable(part, err, stacklevel=3)
    return digest, unreadable


def digest_runs(root: Path) -> tuple[dict[str, Digest], list[Path]]:
    """A digest per run of the stores at or below ``root`` (runs named as by
    :func:`bnprobe.load`), and the unreadable parts. Raises :class:`bnprobe.store.StoreError`
    when no part could be read and FileNotFoundError when there is no store."""
    runs = store.find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no bnprobe store at {str(root)!r}")
    digests: dict[str, Digest] = {}
    unreadable: list[Path] = []
    for run, parts in runs.items():
        digest, bad = digest_parts(parts)
        unreadable += bad
        if len(bad) < len(parts):
            digests[run] = digest
    if not digests:
        raise store.nothing_readable(root, unreadable)
    return digests, unreadable


_Raw = tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, list[str]]]]
"""A batch: its number columns, and its string columns as indices into their names."""
_END = object()


def _read_ahead(parts: list[Path], batch_rows: int) -> Iterator[tuple[Path, Iterator[_Raw]]]:
    """Each part and its batches (:func:`_read_part`), read by a thread at most two batches
    ahead; a part's read error is raised by its batches' iterator, where the caller reads."""
    q: queue.Queue[tuple[Path, object]] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item: tuple[Path, object]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        for part in parts:
            try:
                for raw in _read_part(part, batch_rows):
                    if not put((part, raw)):
                        return
                end: object = _END
            except BaseException as err:  # handed to the caller, who warns
                end = err
            if not put((part, end)):
                return

    def batches() -> Iterator[_Raw]:
        while True:
            _, item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    reader = threading.Thread(target=read, name="bnprobe-report-reader", daemon=True)
    reader.start()
    try:
        for part in parts:
            it = batches()
            yield part, it
            for _ in it:  # what the caller left of this part after an error
                pass
    finally:
        stop.set()
        reader.join()


def _read_part(part: Path, batch_rows: int) -> Iterator[_Raw]:
    """The rows of one part file that the rules read, as numpy columns, batch by batch; the
    string columns as indices into their distinct names (the parquet dictionaries: no Python
    string per row)."""
    pf = pq.ParquetFile(part, read_dictionary=_STRINGS)
    store.check_columns(pf.schema_arrow.names)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(store.COLUMNS)):
        metric, names = _codes(batch.column("metric"))
        keep = np.fromiter((m in READ_METRICS for m in names), bool, len(names))[metric]
        if not keep.any():
            continue
        cols = {
            "step": _ints(batch.column("step")),
            "epoch": _ints(batch.column("epoch")),
            "rank": _ints(batch.column("rank")),
            "channel": _ints(batch.column("channel"), na=-1),
            "value": np.asarray(batch.column("value").to_numpy(zero_copy_only=False), np.float64),
        }
        strings = {c: _codes(batch.column(c)) for c in ("stage", "layer")}
        strings["metric"] = (metric, names)
        if not keep.all():
            idx = np.flatnonzero(keep)
            cols = {c: v[idx] for c, v in cols.items()}
            strings = {c: (codes[idx], names) for c, (codes, names) in strings.items()}
        yield cols, strings


_STRINGS = ["stage", "layer", "metric"]


def _codes(column: pa.Array) -> tuple[np.ndarray, list[str]]:
    """A string column as indices into its distinct values, and those values."""
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    codes = column.indices.to_numpy(zero_copy_only=False)
    return codes, column.dictionary.to_pylist()


def _ints(column: pa.Array, na: int = 0) -> np.ndarray:
    if column.null_count:
        column = column.fill_null(na)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


__all__ = ["BATCH_ROWS", "digest_parts", "digest_runs"]
