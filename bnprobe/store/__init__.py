"""The tidy table and the parquet store (SPEC.md): one value per row, columns

    step, epoch, stage, rank, layer, channel, metric, value

- :mod:`bnprobe.store.table`: the schema, how rows are built (:class:`Rows`), table helpers;
- :mod:`bnprobe.store.constants`: constants stored only when they change, filled back in reads;
- :mod:`bnprobe.store.parts`: :class:`Store`, a run's rows while it writes them (bounded memory,
  atomic part files, compaction);
- :mod:`bnprobe.store.read`: :func:`load` and its filters pushed down to the parquet reader.
"""

from bnprobe.store.constants import fill_constants
from bnprobe.store.parts import FAN_IN, MAX_PART_ROWS, SPILL_ROWS, Store, remove_stale
from bnprobe.store.read import (
    PART_GLOB,
    STORE_NAME,
    STORE_NAMES,
    StoreError,
    check_columns,
    find_runs,
    load,
    load_runs,
    nothing_readable,
    part_order,
    warn_unreadable,
)
from bnprobe.store.table import (
    AFFINE_METRICS,
    COLUMNS,
    CONSTANT_METRICS,
    COUNT_METRICS,
    DTYPES,
    KEY,
    MODEL,
    MOMENT_METRICS,
    PROBE_METRICS,
    RECALIBRATE_METRICS,
    SHIFT_METRICS,
    STAGES,
    STRUCTURE_METRICS,
    TRACE_METRICS,
    WARMUP_METRICS,
    Rows,
    concat,
    conform,
    dedupe,
    empty_frame,
    make_rows,
    with_runs,
)

__all__ = [
    "AFFINE_METRICS",
    "COLUMNS",
    "CONSTANT_METRICS",
    "COUNT_METRICS",
    "DTYPES",
    "FAN_IN",
    "KEY",
    "MAX_PART_ROWS",
    "MODEL",
    "MOMENT_METRICS",
    "PART_GLOB",
    "PROBE_METRICS",
    "RECALIBRATE_METRICS",
    "SHIFT_METRICS",
    "SPILL_ROWS",
    "STAGES",
    "STORE_NAME",
    "STORE_NAMES",
    "STRUCTURE_METRICS",
    "TRACE_METRICS",
    "WARMUP_METRICS",
    "Rows",
    "Store",
    "StoreError",
    "check_columns",
    "concat",
    "conform",
    "dedupe",
    "empty_frame",
    "fill_constants",
    "find_runs",
    "load",
    "load_runs",
    "make_rows",
    "nothing_readable",
    "part_order",
    "remove_stale",
    "warn_unreadable",
    "with_runs",
]
