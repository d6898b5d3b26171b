"""Fast TensorBoard writes for a logging step: every scalar, and every histogram, in one event.

``SummaryWriter.add_scalar`` builds one protobuf ``Summary`` and one ``Event`` per value and
queues each for the writer thread: about 60 us per value on a small CPU, so the ~25 metrics x
20 layers of a ResNet's logging step cost ~30 ms through ``TensorBoardLogger.log_metrics``.
A ``Summary`` may hold any number of values, and TensorBoard (its reader, its data server and
``EventAccumulator``) reads each value of an event as its own point with the event's step, so
writing one event per step holds the same data at about 1 us per value.

Histograms: ``add_histogram`` bins each vector with ``np.histogram`` (~50 us for a few dozen
channels) and writes one event each. :func:`add_histograms` bins every vector of the step at
once (one ``np.bincount``) with :data:`bnprobe.tensorboard.HIST_BINS` equal-width bins between
each vector's finite min and max, and writes them in one event.

Checksums: TensorBoard's writer frames every event with a CRC-32C that it computes in pure
Python, byte by byte (``masked_crc32c``: about 85 ns a byte, holding the GIL, on the writer's
thread), which for the ~25 KB of a ResNet's logging step is about 2 ms a step taken from
training. :func:`crc32c` computes the same checksum with a few dozen numpy operations (about
0.1 ms for 25 KB), and :func:`speed_up_checksums` has TensorBoard's record writer use it.

Nothing here imports Lightning; :func:`log_metrics` duck-types Lightning's ``TensorBoardLogger``
and hands any other logger the same dict through its own ``log_metrics``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from bnprobe import tensorboard as tb


def summary_writer(obj: Any) -> Any | None:
    """The ``torch.utils.tensorboard.SummaryWriter`` behind ``obj`` (a writer, or a Lightning
    ``TensorBoardLogger``), or None (tensorboardX, other loggers: use their own methods)."""
    from torch.utils.tensorboard import SummaryWriter

    if isinstance(obj, SummaryWriter):
        return obj
    if type(obj).__name__ == "TensorBoardLogger":
        writer = getattr(obj, "experiment", None)
        if isinstance(writer, SummaryWriter):
            return writer
    return None


def write_scalars(writer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Every ``tag: value`` of ``metrics`` as one event at ``step`` of a ``SummaryWriter``."""
    _write_summary(writer, tuple(metrics), metrics.values(), step)


def _write_summary(writer: Any, tags: tuple[str, ...], values: Iterable[float], step: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    if tags:
        summary = Summary.FromString(summary_bytes(tags, values))
        writer._get_file_writer().add_summary(summary, int(step))


def summary_bytes(tags: tuple[str, ...], values: Iterable[float]) -> bytes:
    """The serialized ``Summary`` of ``tags`` with ``simple_value`` ``values``: the same message
    as ``Summary(value=[Summary.Value(tag=t, simple_value=v), ...])`` (and, for non-empty tags,
    the same bytes as its ``SerializeToString()``).

    A step's tags are nearly always those of the step before, so the message is a cached
    template of the tags with a 4-byte slot per value, into which the float32 values are copied
    in one numpy assignment: ~20 us for 500 values, against ~400 us to build the message object.
    """
    template, slots = _summary_template(tags)
    floats = np.fromiter(values, dtype=np.float64, count=len(tags))
    with np.errstate(over="ignore"):  # beyond float32: inf, as protobuf stores it
        packed = floats.astype("<f4").view(np.uint8).reshape(-1, 4)
    out = template.copy()
    out[slots] = packed
    return out.tobytes()


@lru_cache(maxsize=8)
def _summary_template(tags: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Serialized ``Summary`` of ``tags`` with zeroed values, and each value's 4 byte offsets.

    Wire format: ``Summary.value`` is field 1 (length-delimited) holding a ``Value`` whose
    ``tag`` is field 1 (length-delimited) and ``simple_value`` field 2 (fixed 32 bits).
    """
    parts: list[bytes] = []
    slots: list[int] = []
    size = 0
    for tag in tags:
        name = tag.encode()
        value = b"\x0a" + _varint(len(name)) + name + b"\x15"
        head = b"\x0a" + _varint(len(value) + 4) + value
        slots.append(size + len(head))
        parts += [head, bytes(4)]
        size += len(head) + 4
    template = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    return template, np.array(slots, dtype=np.int64)[:, None] + np.arange(4)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def log_metrics(logger: Any, metrics: Mapping[str, float], step: int) -> None:
    """``logger.log_metrics(metrics, step)``, in one TensorBoard event for a TensorBoardLogger.

    Keeps the logger's ``prefix`` as Lightning does (``<prefix>-<tag>``).
    """
    writer = _logger_writer(logger)
    if writer is None:
        logger.log_metrics(dict(metrics), step)
        return
    prefix = _prefix(logger)
    write_scalars(writer, {f"{prefix}{k}": v for k, v in metrics.items()}, step)


def log_snapshot(logger: Any, snapshot: Any, keep: frozenset[str] | None = None) -> None:
    """Log the layer aggregates of a :class:`bnprobe.tap.Snapshot` (rank 0; the tags of
    :func:`snapshot_metrics`) through ``logger``: for a TensorBoardLogger one event straight
    from the snapshot's plain columns, for any other logger through its ``log_metrics``.
    ``keep``: the metrics to log (None: all)."""
    agg = snapshot.aggregates
    writer = _logger_writer(logger)
    if agg is None or writer is None:
        for step, metrics in snapshot_metrics(snapshot, keep).items():
            log_metrics(logger, metrics, step)
        return
    if agg.rank != 0 or not agg.metrics:
        return
    names = tuple(agg.metrics)
    tags = _aggregate_tags(_prefix(logger), agg.stage, tuple(agg.layers), names)
    values: Iterable[float] = itertools.chain((agg.epoch,), agg.values)
    if keep is not None:
        index = _kept(names, keep)
        if len(index) == 1:  # nothing but the epoch
            return
        tags = tuple(tags[i] for i in index)
        values = np.asarray(list(values), dtype=np.float64)[index]
    _write_summary(writer, tags, values, agg.step)


@lru_cache(maxsize=8)
def _kept(metrics: tuple[str, ...], keep: frozenset[str]) -> np.ndarray:
    """Indices into (epoch, *metrics) of the epoch and the kept metrics."""
    return np.array([0, *(i + 1 for i, m in enumerate(metrics) if m in keep)], dtype=np.int64)


@lru_cache(maxsize=8)
def _aggregate_tags(
    prefix: str, stage: str, layers: tuple[str, ...], metrics: tuple[str, ...]
) -> tuple[str, ...]:
    tags = (tb.scalar_tag(stage, m, layer) for m, layer in zip(metrics, layers, strict=True))
    return tuple(f"{prefix}{tag}" for tag in (tb.epoch_tag(stage), *tags))


def logger_root(logger: Any) -> str:
    """The tag root of everything bnprobe writes through ``logger``: ``bnprobe``, or
    ``<prefix>-bnprobe`` for a Lightning logger made with ``prefix=...`` (the root its
    ``log_metrics`` gives the scalars, used for histograms, figures and the layout too)."""
    return f"{_prefix(logger)}{tb.PREFIX}"


def _logger_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` of a Lightning ``TensorBoardLogger`` (None for any other logger)."""
    return summary_writer(logger) if type(logger).__name__ == "TensorBoardLogger" else None


def _prefix(logger: Any) -> str:
    """What Lightning puts before a TensorBoardLogger's keys: ``<prefix>-`` or nothing."""
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


def snapshot_metrics(
    snapshot: Any, keep: frozenset[str] | None = None
) -> dict[int, dict[str, float]]:
    """``{step: {tag: value}}`` of a :class:`bnprobe.tap.Snapshot`, like
    :func:`bnprobe.tensorboard.scalar_metrics` of its rows, but straight from its plain
    columns (``aggregates``) when it has them (no pandas). ``keep``: the metrics to log."""
    agg = snapshot.aggregates
    if agg is None:
        rows = snapshot.rows
        if keep is not None:
            rows = rows[rows["metric"].isin(list(keep)).to_numpy()]
        return tb.scalar_metrics(rows)
    if agg.rank != 0 or not agg.metrics:
        return {}
    metrics = tuple(agg.metrics)
    tags = _aggregate_tags("", agg.stage, tuple(agg.layers), metrics)
    values = list(map(float, itertools.chain((agg.epoch,), agg.values)))
    index = range(len(tags)) if keep is None else _kept(metrics, keep).tolist()
    if len(index) == 1:
        return {}
    return {int(agg.step): {tags[i]: values[i] for i in index}}


def histogram_protos(vectors: Mapping[str, np.ndarray], bins: int = tb.HIST_BINS) -> dict[str, Any]:
    """``{tag: HistogramProto}`` of each vector's finite values in ``bins`` equal-width bins
    between its min and max (a constant vector: one bin of width 1 around it, as
    ``np.histogram`` does). Vectors with no finite value are left out."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    tags = list(vectors)
    if not tags:
        return {}
    arrays = [np.asarray(vectors[t], dtype=np.float64).ravel() for t in tags]
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    flat = np.concatenate(arrays)
    owner = np.repeat(np.arange(len(tags)), sizes)
    finite = np.isfinite(flat)
    flat, owner = flat[finite], owner[finite]
    num = np.bincount(owner, minlength=len(tags))
    out: dict[str, Any] = {}
    if flat.size == 0:
        return out
    lo = np.full(len(tags), np.inf)
    hi = np.full(len(tags), -np.inf)
    np.minimum.at(lo, owner, flat)
    np.maximum.at(hi, owner, flat)
    total = np.bincount(owner, weights=flat, minlength=len(tags))
    squares = np.bincount(owner, weights=flat * flat, minlength=len(tags))
    left, right = lo.copy(), hi.copy()
    flat_range = left == right
    left[flat_range] -= 0.5
    right[flat_range] += 0.5
    width = (right - left) / bins
    with np.errstate(all="ignore"):
        index = np.floor((flat - left[owner]) / width[owner]).astype(np.int64)
    index = np.clip(index, 0, bins - 1)
    counts = np.bincount(owner * bins + index, minlength=len(tags) * bins).reshape(-1, bins)
    steps = np.arange(bins + 1)
    for i, tag in enumerate(tags):
        if num[i] == 0:
            continue
        limits = left[i] + width[i] * steps
        limits[-1] = right[i]
        out[tag] = HistogramProto(
            min=float(lo[i]),
            max=float(hi[i]),
            num=int(num[i]),
            sum=float(total[i]),
            sum_squares=float(squares[i]),
            bucket_limit=limits.tolist(),
            bucket=[0, *counts[i].tolist()],  # TensorBoard reads right edges: a leading 0
        )
    return out


def add_histograms(
    writer: Any,
    stage: str,
    step: int,
    channels: Mapping[str, Mapping[str, np.ndarray]],
    names: tuple[str, ...] = tb.HIST_NAMES,
    root: str = tb.PREFIX,
) -> list[str]:
    """Histograms ``<root>/<stage>/hist/<name>/<layer>`` of every layer's per-channel vectors
    (``channels``: layer -> {name: vector}, as in ``Snapshot.channels``) in one event.
    ``root``: :func:`logger_root` of the logger (``bnprobe`` without a prefix).

    The same tags and binning as :func:`bnprobe.tensorboard.add_histograms`; returns the tags
    written. Only for a ``torch.utils.tensorboard.SummaryWriter``: other writers go through
    :func:`bnprobe.tensorboard.add_histograms`.
    """
    vectors = {
        tb.hist_tag(stage, name, layer, root): per[name]
        for layer, per in channels.items()
        for name in names
        if name in per
    }
    target = summary_writer(writer)
    if target is None:
        written: list[str] = []
        for layer, per in channels.items():
            values = {name: per[name] for name in names if name in per}
            written += tb.add_histograms(writer, stage, layer, step, values, root)
        return written
    from tensorboard.compat.proto.summary_pb2 import Summary

    protos = histogram_protos(vectors)
    if protos:
        summary = Summary(value=[Summary.Value(tag=t, histo=h) for t, h in protos.items()])
        target._get_file_writer().add_summary(summary, int(step))
    return list(protos)


# -- CRC-32C ------------------------------------------------------------------------------------
# The checksum of TFRecord framing: CRC-32C (Castagnoli), reflected, initial value and final xor
# 0xFFFFFFFF. A CRC without its initial value is linear over GF(2): the register after a message
# is the XOR of what each part leaves, each advanced over the zero bytes that follow it. So the
# message is cut into _CHUNK-byte chunks whose registers are computed side by side (slicing by 4
# bytes), then groups of _GROUP registers are advanced to the end of their group and XORed,
# level after level, until one register is left. Leading zero bytes leave a zero register, which
# is how the message is padded to whole chunks and groups; the initial value is XORed into the
# first four bytes, which is the same as starting the register from it.

_POLY = 0x82F63B78
_CHUNK = 32
_GROUP = 32
_SMALL = 64
"""Messages shorter than this go through the byte loop (TensorBoard's length headers: 8 bytes)."""


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_BYTE_TABLE = _TABLE.tolist()
_BITS = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)


def _zero_byte(register: np.ndarray) -> np.ndarray:
    """Advance registers over one zero byte."""
    advanced: np.ndarray = _TABLE[register & 0xFF] ^ (register >> 8)
    return advanced


def _tables(images: np.ndarray) -> np.ndarray:
    """(4, 256) lookup tables of the linear map whose image of bit i is ``images[i]``."""
    byte = np.arange(256, dtype=np.uint32)
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k] ^= np.where((byte >> bit) & 1, images[8 * k + bit], np.uint32(0))
    return tables


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The linear map of :func:`_tables` applied to registers ``x``."""
    out: np.ndarray = (
        tables[0, x & 0xFF]
        ^ tables[1, (x >> 8) & 0xFF]
        ^ tables[2, (x >> 16) & 0xFF]
        ^ tables[3, x >> 24]
    )
    return out


def _advance(nbytes: int) -> np.ndarray:
    """Images of the bits under "advance over ``nbytes`` zero bytes" (square and multiply)."""
    result, power = _BITS.copy(), _zero_byte(_BITS)
    while nbytes:
        if nbytes & 1:
            result = _apply(_tables(power), result)
        power = _apply(_tables(power), power)
        nbytes >>= 1
    return result


_SLICE = [_TABLE]  # _SLICE[k][b]: register after byte b then k zero bytes
for _ in range(3):
    _SLICE.append(_zero_byte(_SLICE[-1]))
_DISTANCE = np.arange(_GROUP - 1, -1, -1)  # registers of a group to advance: last one by 0
_levels: list[np.ndarray] = []
_levels_lock = threading.Lock()


def _level(index: int) -> np.ndarray:
    """(_GROUP, 4, 256) tables that advance a register by r units of _CHUNK·_GROUP**index
    bytes, r = 0 .. _GROUP-1 (built once, on first use)."""
    with _levels_lock:
        while len(_levels) <= index:
            unit = _tables(_advance(_CHUNK * _GROUP ** len(_levels)))
            images, tables = _BITS.copy(), []
            for _ in range(_GROUP):
                tables.append(_tables(images))
                images = _apply(unit, images)
            _levels.append(np.stack(tables))
        return _levels[index]


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data``, as TensorBoard's ``crc32c`` computes it."""
    n = len(data)
    if n < _SMALL:
        crc = 0xFFFFFFFF
        for byte in data:
            crc = _BYTE_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    chunks = -(-n // _CHUNK)
    buf = np.zeros(chunks * _CHUNK, dtype=np.uint8)
    start = buf.size - n
    buf[start:] = np.frombuffer(data, dtype=np.uint8)
    buf[start : start + 4] ^= 0xFF
    words = buf.view("<u4").reshape(chunks, _CHUNK // 4)
    s3, s2, s1, s0 = _SLICE[3], _SLICE[2], _SLICE[1], _SLICE[0]
    register = np.zeros(chunks, dtype=np.uint32)
    for j in range(_CHUNK // 4):
        register ^= words[:, j]
        register = (
            s3[register & 0xFF]
            ^ s2[(register >> 8) & 0xFF]
            ^ s1[(register >> 16) & 0xFF]
            ^ s0[register >> 24]
        )
    level = 0
    while register.size > 1:
        tables = _level(level)
        groups = -(-register.size // _GROUP)
        padded = np.zeros(groups * _GROUP, dtype=np.uint32)
        padded[padded.size - register.size :] = register
        g = padded.reshape(groups, _GROUP)
        advanced = (
            tables[_DISTANCE, 0, g & 0xFF]
            ^ tables[_DISTANCE, 1, (g >> 8) & 0xFF]
            ^ tables[_DISTANCE, 2, (g >> 16) & 0xFF]
            ^ tables[_DISTANCE, 3, g >> 24]
        )
        register = np.bitwise_xor.reduce(advanced, axis=1)
        level += 1
    return int(register[0]) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``, equal to TensorBoard's ``masked_crc32c``."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def speed_up_checksums() -> bool:
    """Have TensorBoard's event writer (``tensorboard.summary.writer.record_writer``, which
    ``torch.utils.tensorboard.SummaryWriter`` and Lightning's ``TensorBoardLogger`` write
    through) checksum records with :func:`masked_crc32c` instead of its pure-Python loop.

    The files are byte for byte the same; every TensorBoard writer of the process gets faster.
    Checks the two functions agree on sample messages first and leaves TensorBoard alone if
    they do not. Returns whether the fast checksum is in use.
    """
    from tensorboard.summary.writer import record_writer

    current = record_writer.masked_crc32c
    if current is masked_crc32c:
        return True
    sample = bytes(range(256)) * 9
    lengths = (0, 5, _SMALL, _CHUNK * _GROUP + 3, len(sample))
    if any(masked_crc32c(sample[:k]) != current(sample[:k]) for k in lengths):
        return False
    record_writer.masked_crc32c = masked_crc32c
    return True


__all__ = [
    "add_histograms",
    "crc32c",
    "histogram_protos",
    "log_metrics",
    "log_snapshot",
    "logger_root",
    "masked_crc32c",
    "snapshot_metrics",
    "speed_up_checksums",
    "summary_bytes",
    "summary_writer",
    "write_scalars",
]
