"""Reading a store back: part names and their order, filters pushed down to the parquet reader,
the last row of a key winning, constants filled in, runs kept apart.

Part files are ``part-r<rank>-<token>-<seq>.parquet`` (one flush; ``token`` names one Store,
that is one process of one run) and ``part-r<rank>-<token>-<first>-<last>.parquet`` (the parts
``first..last`` of that token merged into one by compaction). Parts are read in the order
(rank, token, first seq); a part whose range lies inside another part's range of the same token
was merged into it and is skipped (a compaction killed after the rename and before removing its
inputs leaves such parts behind). Other names matching ``part-*.parquet`` (any store written by
another version) are read in name order, before those.

Filters (``stages``, ``layers``, ``metrics``, ``steps``) become one pyarrow expression given to
``pq.read_table`` with the SPEC columns only: row groups whose statistics exclude it are never
read and the dictionary-encoded string columns are compared without building Python strings.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bnprobe.store.constants import ANCHOR, fill_constants
from bnprobe.store.table import (
    COLUMNS,
    CONSTANT_METRICS,
    DTYPES,
    conform,
    dedupe,
    empty_frame,
    with_runs,
)

PART_GLOB = "part-*.parquet"
STORE_NAME = "bnprobe_store"
"""The folder a run's store goes in by default (``<log_dir>/bnprobe_store``): a name that
cannot be imported as the package, unlike the ``bnprobe`` folder of bnprobe 0.1."""
STORE_NAMES: tuple[str, ...] = (STORE_NAME, "bnprobe")
"""Folder names of a store inside its run folder (the second: stores written before 0.2)."""

PART_NAME = re.compile(r"part-r(\d+)-(\d+-\d+)-(\d+)(?:-(\d+))?\.parquet")
"""rank, token (``<time_ns>-<pid>``), first seq, last seq (merged parts only)."""
TMP_NAME = re.compile(r"\.part-r\d+-\d+-(\d+)-[\d-]+\.parquet\.tmp")
"""A part being written (group: the writer's pid)."""

Constants = Literal["every_step", "changes"]


class StoreError(ValueError):
    """A store that exists but could not be read (every part damaged, or not a bnprobe table)."""


@dataclass(frozen=True)
class Selection:
    """What a read keeps: None = everything (``steps``: first and last inclusive, each may be
    None); ``constants="changes"`` leaves constants as stored (only where they change)."""

    stages: frozenset[str] | None = None
    layers: frozenset[str] | None = None
    metrics: frozenset[str] | None = None
    steps: tuple[int | None, int | None] = (None, None)
    constants: Constants = "every_step"

    @classmethod
    def of(
        cls,
        stages: str | Collection[str] | None = None,
        layers: str | Collection[str] | None = None,
        metrics: str | Collection[str] | None = None,
        steps: tuple[int | None, int | None] | None = None,
        constants: Constants = "every_step",
    ) -> Selection:
        if steps is None:
            steps = (None, None)
        ok = isinstance(steps, tuple | list) and len(steps) == 2
        ok = ok and all(s is None or (isinstance(s, int | np.integer) and not isinstance(s, bool))
                        for s in steps)  # fmt: skip
        if not ok:
            raise ValueError(
                f"steps must be (first, last) with ints or None (inclusive); got {steps!r}"
            )
        if constants not in ("every_step", "changes"):
            raise ValueError(f"constants must be 'every_step' or 'changes'; got {constants!r}")
        first, last = (None if s is None else int(s) for s in steps)
        return cls(_names(stages, "stages"), _names(layers, "layers"), _names(metrics, "metrics"),
                   (first, last), constants)  # fmt: skip

    @property
    def everything(self) -> bool:
        return self == Selection(constants=self.constants)

    def fills(self) -> bool:
        """Does this read fill in constants (and so need their earlier rows and anchors)?"""
        if self.constants != "every_step":
            return False
        stages = set(CONSTANT_METRICS) & (self.stages or set(CONSTANT_METRICS))
        wanted = set().union(*(CONSTANT_METRICS[s] for s in stages)) if stages else set()
        return bool(wanted if self.metrics is None else wanted & self.metrics)

    def expression(self) -> ds.Expression | None:
        """The rows to read from a part: those selected, and, when constants are filled, the
        constants' rows from before ``steps`` and the anchor rows (dropped again by
        :meth:`mask`)."""
        main = self._expr(self.metrics, self.steps)
        if not self.fills():
            return main
        constants = set().union(*CONSTANT_METRICS.values())
        wanted = constants if self.metrics is None else constants & self.metrics
        extra = self._expr(frozenset(wanted | {ANCHOR}), (None, self.steps[1]))
        if main is None or extra is None:
            return None
        return main | extra

    def _expr(
        self, metrics: frozenset[str] | None, steps: tuple[int | None, int | None]
    ) -> ds.Expression | None:
        terms = []
        for column, names in (("stage", self.stages), ("layer", self.layers), ("metric", metrics)):
            if names is not None:
                terms.append(pc.field(column).isin(sorted(names)))
        if steps[0] is not None:
            terms.append(pc.field("step") >= steps[0])
        if steps[1] is not None:
            terms.append(pc.field("step") <= steps[1])
        if not terms:
            return None
        out = terms[0]
        for term in terms[1:]:
            out = out & term
        return out

    def mask(self, df: pd.DataFrame) -> np.ndarray:
        """The rows of ``df`` this selection keeps."""
        keep = np.ones(len(df), dtype=bool)
        for column, names in (
            ("stage", self.stages),
            ("layer", self.layers),
            ("metric", self.metrics),
        ):
            if names is not None:
                keep &= df[column].isin(list(names)).to_numpy()
        first, last = self.steps
        if first is not None:
            keep &= (df["step"] >= first).to_numpy()
        if last is not None:
            keep &= (df["step"] <= last).to_numpy()
        return keep

    def finish(self, raw: pd.DataFrame) -> pd.DataFrame:
        """The table from the rows read (deduplicated by the caller if need be): constants
        filled in, then only the rows selected."""
        out = fill_constants(raw) if self.fills() else raw
        if self.everything:
            return out
        return out.loc[self.mask(out)].reset_index(drop=True)


def _names(value: str | Collection[str] | None, what: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset([value])
    names = frozenset(value) if isinstance(value, Collection) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{what} must be a name or a list of names; got {value!r}")
    return names


# -- part files ----------------------------------------------------------------------------------
def part_order(parts: Sequence[Path]) -> list[Path]:
    """Parts in the order they were written, without those merged into another."""
    named: list[tuple[tuple[int, str, int], int, Path]] = []
    other: list[Path] = []
    for part in parts:
        found = PART_NAME.fullmatch(part.name)
        if found is None:
            other.append(part)
            continue
        rank, token, first, last = found.groups()
        named.append(((int(rank), token, int(first)), int(last or first), part))
    named.sort(key=lambda item: (item[0], -item[1]))
    live: list[Path] = []
    covered: dict[tuple[int, str], int] = {}
    for (rank, token, _first), last, part in named:
        if covered.get((rank, token), -1) >= last:
            continue  # inside a merged part of this token already read
        covered[(rank, token)] = max(last, covered.get((rank, token), -1))
        live.append(part)
    return sorted(other) + live


def superseded(parts: Sequence[Path]) -> list[Path]:
    """Parts merged into another part (left by a compaction that was killed before it removed
    them); :func:`part_order` skips them."""
    live = set(part_order(parts))
    return [p for p in parts if p not in live and PART_NAME.fullmatch(p.name)]


def check_columns(names: Collection[str]) -> None:
    """Raise ValueError unless a part file's columns include the SPEC columns."""
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"table is missing columns {missing}; expected {list(COLUMNS)}")


def warn_unreadable(part: Path, err: BaseException, *, stacklevel: int = 2) -> None:
    """The one warning for a part that cannot be read: it is skipped, the others are read."""
    warnings.warn(
        f"bnprobe.load: skipped the unreadable part {str(part)!r} "
        f"({type(err).__name__}: {_first_line(err)})",
        UserWarning,
        stacklevel=stacklevel,
    )


def nothing_readable(root: Path, unreadable: Sequence[Path]) -> StoreError:
    """The error when a store exists but none of its parts could be read."""
    what = str(unreadable[0]) if len(unreadable) == 1 else f"{len(unreadable)} part files"
    return StoreError(
        f"the bnprobe store at {str(root)!r} could not be read: {what} unreadable "
        "(truncated or not parquet)"
    )


def read_part(path: Path, selection: Selection) -> pd.DataFrame:
    """One part's rows as a table (SPEC dtypes), filtered as ``selection`` reads (raises on a
    file that is not a readable bnprobe part)."""
    check_columns(pq.read_schema(path).names)
    table = pq.read_table(path, columns=list(COLUMNS), filters=selection.expression())
    return arrow_to_frame(table)


def arrow_to_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table with the SPEC columns as a pandas table with the SPEC dtypes; dictionary
    columns become object columns sharing one string object per name."""
    cols: dict[str, object] = {}
    for name in COLUMNS:
        column = table.column(name)
        if name == "channel":
            cols[name] = pd.array(column.to_pandas(), dtype="Int64")
        elif (
            pa.types.is_dictionary(column.type)
            or pa.types.is_string(column.type)
            or (pa.types.is_large_string(column.type))
        ):
            cols[name] = pd.Series(_strings(column), dtype=object)
        else:
            cols[name] = pd.Series(column.to_numpy(), dtype=DTYPES[name])
    return pd.DataFrame(cols)


def _strings(column: pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_dictionary(column.type):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    out = np.empty(len(column), dtype=object)
    at = 0
    for chunk in column.chunks:
        names = np.asarray(chunk.dictionary.to_pylist(), dtype=object)
        codes = chunk.indices.to_numpy(zero_copy_only=False)
        out[at : at + len(chunk)] = names[codes] if len(names) else None
        at += len(chunk)
    return out


def read_parts(
    parts: Sequence[Path], selection: Selection, *, unreadable: list[Path] | None = None
) -> pd.DataFrame:
    """The rows of ``parts`` (in :func:`part_order`) that ``selection`` needs, not yet finished
    (:meth:`Selection.finish`). With ``unreadable``, a part that cannot be read is skipped with
    one warning and added to it; else the error propagates."""
    frames: list[pd.DataFrame] = []
    for part in part_order(parts):
        try:
            frames.append(read_part(part, selection))
        except Exception as err:  # a damaged file must not hide the others
            if unreadable is None:
                raise
            unreadable.append(part)
            warn_unreadable(part, err, stacklevel=5)
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_frame()
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# -- load ----------------------------------------------------------------------------------------
def load(
    path: str | os.PathLike[str],
    *,
    stages: str | Collection[str] | None = None,
    layers: str | Collection[str] | None = None,
    metrics: str | Collection[str] | None = None,
    steps: tuple[int | None, int | None] | None = None,
    constants: Constants = "every_step",
) -> pd.DataFrame:
    """Read the saved store of a run, or of every run in a folder of runs.

    ``path`` is a store folder (the one holding ``part-*.parquet`` files, by default
    ``<log_dir>/bnprobe_store``), a run folder holding one, a folder of runs, or one part file.
    A run is the folder of a store (its parent when the store folder has the default name
    ``bnprobe_store``, or ``bnprobe`` for stores written before 0.2). When ``path`` holds
    several runs, each keeps its own rows and a last column ``run`` holds the run folder's path
    relative to ``path`` (posix separators), the same names :func:`bnprobe.read_tensorboard`
    gives the runs' event files: runs are never merged.

    Filters, pushed down to the parquet reader (only the matching rows are read): ``stages``,
    ``layers``, ``metrics`` (a name or a list of names; None = all) and ``steps`` (``(first,
    last)``, inclusive, either None for an open end). Constants (``eps``, ``momentum``, ...:
    :attr:`bnprobe.metrics.Metric.constant`) are stored only when they change; by default they
    come back at every step their layer was measured, as the tap wrote them;
    ``constants="changes"`` gives the stored rows only.

    Within a run, where a resumed run measured a step again, the row written last wins, so a
    key appears once. A part file that cannot be read (truncated, empty, not parquet) is
    skipped with one warning naming it; the other parts load.

    Raises FileNotFoundError when ``path`` does not exist or holds no store, ValueError when
    ``path`` is a file that is not a parquet table or a filter is malformed, and
    :class:`StoreError` when no part of the store could be read.
    """
    frames = load_runs(
        path, stages=stages, layers=layers, metrics=metrics, steps=steps, constants=constants
    )
    if len(frames) == 1:
        return next(iter(frames.values()))
    return with_runs(frames)


def load_runs(
    path: str | os.PathLike[str],
    *,
    stages: str | Collection[str] | None = None,
    layers: str | Collection[str] | None = None,
    metrics: str | Collection[str] | None = None,
    steps: tuple[int | None, int | None] | None = None,
    constants: Constants = "every_step",
) -> dict[str, pd.DataFrame]:
    """What :func:`load` reads, as ``{run: table}`` (each table without a ``run`` column).

    Runs are named as in :func:`load` (``"."`` for ``path`` itself); the same filters, errors
    and warnings as :func:`load`.
    """
    selection = Selection.of(stages, layers, metrics, steps, constants)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no bnprobe store at {str(root)!r}: the path does not exist")
    if root.is_file():
        table = _load_file(root, selection)
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
        failed = len(unreadable)
        raw = read_parts(parts, selection, unreadable=unreadable)
        if len(unreadable) - failed < len(part_order(parts)):
            frames[run] = selection.finish(dedupe(raw))
    if not frames:
        raise nothing_readable(root, unreadable)
    return frames


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
        runs.setdefault(run, []).extend(part_order(sorted(folder.glob(PART_GLOB))))
    return dict(sorted(runs.items()))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _load_file(path: Path, selection: Selection) -> pd.DataFrame:
    """A single parquet file: one part of a store, or a table written by ``bnprobe export``."""
    try:
        schema = pq.read_schema(path)
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
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise StoreError(
            f"{str(path)!r} is parquet but not a bnprobe table: table is missing columns "
            f"{missing}; expected {list(COLUMNS)}"
        )
    columns = list(COLUMNS) + (["run"] if "run" in schema.names else [])
    try:
        table = pq.read_table(path, columns=columns, filters=selection.expression())
        out = arrow_to_frame(table)
    except Exception as err:
        raise StoreError(
            f"{str(path)!r} could not be read as parquet ({type(err).__name__}: "
            f"{_first_line(err)}): the file is damaged or truncated"
        ) from None
    if "run" in columns:  # an export of several runs keeps them apart
        out["run"] = _strings(table.column("run"))
        return pd.concat(
            [
                selection.finish(dedupe(conform(part))).assign(run=run)
                for run, part in out.groupby("run", sort=False)
            ],
            ignore_index=True,
        )
    return selection.finish(dedupe(out))


def _kind_of_file(path: Path) -> str:
    if path.name.startswith("events.out.tfevents."):
        return "a TensorBoard event file"
    if path.suffix.lower() == ".csv":
        return "a CSV file"
    return f"a {path.suffix} file" if path.suffix else "a file"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""
