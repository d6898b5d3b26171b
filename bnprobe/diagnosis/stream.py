"""Streaming a saved run into a :class:`~bnprobe.diagnosis.digest.Digest`: what ``bnprobe report``
reads, batch by batch, without building the run's table.

:func:`digest_parts` reads a run's parquet part files with pyarrow, one record batch at a time,
only the SPEC columns and only the metrics the rules and the report read
(:data:`~bnprobe.diagnosis.digest.READ_METRICS`), and feeds them to a digest: memory is the
digest's (bounded) plus one batch. Parts are read in the order :func:`bnprobe.load` reads them;
unlike :func:`bnprobe.load`, rows that a resumed run measured twice are not deduplicated
(the wide views the rules read keep the last row of a key, as before).

This module imports no torch and no Lightning. (When the store's filtered reads land,
``_read_part`` is the one place to switch.)
"""

from __future__ import annotations

from collections.abc import Iterable
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
    for part in parts:
        try:
            for cols in _read_part(part, batch_rows, digest):
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


def _read_part(part: Path, batch_rows: int, digest: Digest) -> Iterable[dict[str, np.ndarray]]:
    """The rows of one part file that the rules read, as numpy columns, batch by batch; the
    string columns as the digest's codes (:meth:`Digest.encode` of each batch's dictionary:
    no Python string per row)."""
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
            "stage": _encoded(batch.column("stage"), digest),
            "rank": _ints(batch.column("rank")),
            "layer": _encoded(batch.column("layer"), digest),
            "channel": _ints(batch.column("channel"), na=-1),
            "metric": digest.encode(names)[metric],
            "value": batch.column("value").to_numpy(zero_copy_only=False).astype(np.float64),
        }
        if not keep.all():
            idx = np.flatnonzero(keep)
            cols = {c: v[idx] for c, v in cols.items()}
        yield cols


_STRINGS = ["stage", "layer", "metric"]


def _codes(column: pa.Array) -> tuple[np.ndarray, list[str]]:
    """A string column as indices into its distinct values, and those values."""
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    codes = column.indices.to_numpy(zero_copy_only=False)
    return codes, column.dictionary.to_pylist()


def _encoded(column: pa.Array, digest: Digest) -> np.ndarray:
    codes, names = _codes(column)
    return digest.encode(names)[codes]


def _ints(column: pa.Array, na: int = 0) -> np.ndarray:
    if column.null_count:
        column = column.fill_null(na)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


__all__ = ["BATCH_ROWS", "digest_parts", "digest_runs"]
