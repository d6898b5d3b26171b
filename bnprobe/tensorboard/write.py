"""Writing to TensorBoard: ONE scalar writer and ONE histogram writer, used for every stage.

Owns how bnprobe's points become events of a ``torch.utils.tensorboard.SummaryWriter`` it is
handed (its event file is the writer's; the caller owns the writer). Imports TensorBoard's protos,
numpy and :mod:`bnprobe.store`; never Lightning, never torch at import time.

Scalars: ``SummaryWriter.add_scalar`` builds one protobuf ``Summary`` and one ``Event`` per value
and queues each for the writer thread: about 60 us per value on a small CPU, so the ~25 metrics x
20 layers of a ResNet's logging step cost ~30 ms. A ``Summary`` may hold any number of values, and
TensorBoard (its reader, its data server and ``EventAccumulator``) reads each value of an event as
its own point with the event's step, so :func:`write_snapshot` writes the layer aggregates of a
step as one event (about 1 us per value), whatever made the rows (the tap's columns, the probe's
table, the rows of other ranks).

Histograms: ``add_histogram`` bins each vector with ``np.histogram`` (~50 us for a few dozen
channels) and writes one event each. :func:`write_histograms` bins every vector of the step at
once (one ``np.bincount``) with :data:`~bnprobe.tensorboard.tags.HIST_BINS` equal-width bins
between each vector's finite min and max, and writes them in one event.

Both go through :func:`file_writer`, the writer's public ``file_writer`` attribute (a
``torch.utils.tensorboard.writer.FileWriter``, whose ``add_summary`` is public): torch has no public
method that adds a prepared ``Summary`` to a ``SummaryWriter`` itself.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from bnprobe.store import Rows
from bnprobe.tensorboard.events import Buffer, EventWriter, varint
from bnprobe.tensorboard.tags import HIST_BINS, HIST_NAMES, PREFIX, epoch_tag, hist_tag, scalar_tag

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch.utils.tensorboard import SummaryWriter

Writer = Any
"""What the write functions take: bnprobe's :class:`~bnprobe.tensorboard.events.EventWriter`
(what the drivers hand the recorder) or a ``torch.utils.tensorboard.SummaryWriter``."""


def file_writer(writer: SummaryWriter) -> Any:
    """The ``FileWriter`` of a ``torch.utils.tensorboard.SummaryWriter`` (its event file).

    Raises TypeError for anything else (tensorboardX, a logger) and ValueError for a writer that
    has been closed (``close()`` drops its file writer)."""
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter):
        raise TypeError(
            "bnprobe writes TensorBoard events through a torch.utils.tensorboard.SummaryWriter; "
            f"got {type(writer).__name__}"
        )
    target = writer.file_writer
    if target is None:
        raise ValueError(f"the SummaryWriter of {writer.log_dir!r} is closed")
    return target


def write_scalars(writer: Writer, metrics: Mapping[str, float], step: int) -> None:
    """Every ``tag: value`` of ``metrics`` as one event at ``step`` of a ``SummaryWriter``."""
    _write_summary(writer, tuple(metrics), metrics.values(), step)


def write_snapshot(
    writer: Writer, snapshot: Any, keep: frozenset[str] | None = None, root: str = PREFIX
) -> None:
    """The layer aggregates of rank 0 of a :class:`bnprobe.tap.Snapshot` (and
    ``<root>/<stage>/epoch``), one event per step. ``keep``: the metrics to write (None: all);
    ``root``: :func:`~bnprobe.tensorboard.tags.tag_root` of the logger's prefix."""
    for step, (tags, values) in _points(snapshot, keep, root).items():
        _write_summary(writer, tags, values, step)


def snapshot_metrics(
    snapshot: Any, keep: frozenset[str] | None = None, root: str = PREFIX
) -> dict[int, dict[str, float]]:
    """``{step: {tag: value}}`` of what :func:`write_snapshot` writes: what a ``log_metrics``
    logger (CSV, W&B, MLflow) gets, equal to
    :func:`~bnprobe.tensorboard.tags.scalar_metrics` of the snapshot's rows."""
    return {
        step: dict(zip(tags, map(float, values), strict=True))
        for step, (tags, values) in _points(snapshot, keep, root).items()
    }


def _points(
    snapshot: Any, keep: frozenset[str] | None, root: str
) -> dict[int, tuple[tuple[str, ...], Iterable[float]]]:
    """Per step, the tags and values of one event: the epoch tag of each stage, then each layer
    aggregate of rank 0; a block of ``rank_divergence`` alone (under DDP it comes up to
    ``gather_batch`` steps after the step's own rows, which wrote the epoch) adds no epoch
    point. One block of rows (nearly always) is a cached tuple of tags; several blocks at one
    step (the rows of other ranks, rank_divergence) merge, the later value of a
    tag winning, as in :func:`~bnprobe.tensorboard.tags.scalar_metrics`."""
    by_step: dict[int, list[tuple[tuple[str, ...], Iterable[float]]]] = {}
    for part in snapshot.parts:
        for rows in _layer_rows(part):
            tags, index = _tags_of(root, rows.stage, rows.layers, rows.metrics, keep)
            if index is not None and len(index) == 1:  # nothing but the epoch
                continue
            values: Iterable[float]
            if isinstance(rows.values, np.ndarray):
                values = np.concatenate([(float(rows.epoch),), rows.values.astype(np.float64)])
            else:
                values = itertools.chain((int(rows.epoch),), rows.values)
            if index is not None:
                values = np.fromiter(values, dtype=np.float64, count=len(rows.metrics) + 1)[index]
            if _late(rows.metrics):
                tags, values = tags[1:], np.fromiter(values, dtype=np.float64)[1:]  # no epoch
            by_step.setdefault(int(rows.step), []).append((tags, values))
    out: dict[int, tuple[tuple[str, ...], Iterable[float]]] = {}
    for step, blocks in by_step.items():
        if len(blocks) == 1:
            out[step] = blocks[0]
            continue
        tags, index = _merge_plan(tuple(tags for tags, _ in blocks))
        flat = np.concatenate([np.fromiter(v, dtype=np.float64) for _, v in blocks])
        out[step] = (tags, flat[index])
    return out


def _late(metrics: Sequence[str] | np.ndarray) -> bool:
    """Whether a block of rows is ``rank_divergence`` alone (:func:`_points`)."""
    if isinstance(metrics, tuple):
        return _all_divergence(metrics)
    return len(metrics) > 0 and all(m == "rank_divergence" for m in metrics)


@functools.lru_cache(maxsize=16)
def _all_divergence(metrics: tuple[str, ...]) -> bool:
    return len(metrics) > 0 and all(m == "rank_divergence" for m in metrics)


@functools.lru_cache(maxsize=16)
def _merge_plan(blocks: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """The tags of several blocks at one step, each once in the order first seen, and where
    each one's value sits in the blocks' concatenated values (its last occurrence: the later
    value of a tag wins). Cached: under DDP every step brings the same blocks."""
    last: dict[str, int] = {}
    for at, tag in enumerate(itertools.chain.from_iterable(blocks)):
        last[tag] = at
    return tuple(last), np.fromiter(last.values(), dtype=np.int64, count=len(last))


def _layer_rows(part: Rows | pd.DataFrame) -> list[Rows]:
    """The layer aggregates of rank 0 in one part of a snapshot, as single-step :class:`Rows`
    blocks (a block of several steps: one per step, :meth:`Rows.split`)."""
    if isinstance(part, Rows):
        keep = part.channels is None and part.rank == 0 and len(part.metrics) > 0
        return part.split() if keep else []
    agg = part[part["channel"].isna().to_numpy() & (part["rank"] == 0).to_numpy()]
    out: list[Rows] = []
    for key, rows in agg.groupby(["step", "epoch", "stage"], sort=False):
        step, epoch, stage = cast("tuple[int, int, str]", key)
        out.append(
            Rows(
                step=int(step),
                epoch=int(epoch),
                stage=str(stage),
                rank=0,
                layers=rows["layer"].tolist(),
                metrics=rows["metric"].tolist(),
                values=rows["value"].to_numpy(dtype=np.float64),
            )
        )
    return out


_last_tags: list[Any] = [None, None, None, None, None, None]
"""The last call of :func:`_tags_of`: its arguments and result (the tap hands the same
``layers`` and ``metrics`` arrays every step of the same shape)."""


def _tags_of(
    root: str,
    stage: str,
    layers: Sequence[str] | np.ndarray,
    metrics: Sequence[str] | np.ndarray,
    keep: frozenset[str] | None,
) -> tuple[tuple[str, ...], np.ndarray | None]:
    """The tags of ``(epoch, *rows)`` (only the kept ones when ``keep``), and their indices
    into ``(epoch, *values)`` (None: all). The same read-only ``layers`` and ``metrics`` arrays
    as the last call take no work."""
    last = _last_tags
    if (
        last[2] is layers
        and last[3] is metrics
        and last[0] == root
        and last[1] == stage
        and last[4] == keep
    ):
        return cast("tuple[tuple[str, ...], np.ndarray | None]", last[5])
    names = tuple(metrics)
    tags = _aggregate_tags(root, stage, tuple(layers), names)
    index = None
    if keep is not None:
        index = _kept(names, keep)
        tags = tuple(tags[i] for i in index)
    if _frozen(layers) and _frozen(metrics):
        _last_tags[:] = [root, stage, layers, metrics, keep, (tags, index)]
    return tags, index


def _frozen(column: object) -> bool:
    """A read-only array (the tap's, shared by the steps of one shape): safe to know by id."""
    return isinstance(column, np.ndarray) and not column.flags.writeable


@lru_cache(maxsize=8)
def _kept(metrics: tuple[str, ...], keep: frozenset[str]) -> np.ndarray:
    """Indices into (epoch, *metrics) of the epoch and the kept metrics."""
    return np.array([0, *(i + 1 for i, m in enumerate(metrics) if m in keep)], dtype=np.int64)


@lru_cache(maxsize=16)
def _aggregate_tags(
    root: str, stage: str, layers: tuple[str, ...], metrics: tuple[str, ...]
) -> tuple[str, ...]:
    tags = (scalar_tag(stage, m, layer) for m, layer in zip(metrics, layers, strict=True))
    return tuple(_rooted(tag, root) for tag in (epoch_tag(stage), *tags))


def _rooted(tag: str, root: str) -> str:
    """``tag`` (``bnprobe/...``) under ``root`` (``<prefix>-bnprobe/...``)."""
    return tag if root == PREFIX else f"{root}{tag[len(PREFIX) :]}"


def _write_summary(
    writer: Writer, tags: tuple[str, ...], values: Iterable[float], step: int
) -> None:
    if tags:
        _add_summary(writer, summary_bytes(tags, values), int(step))


def _add_summary(writer: Writer, summary: bytes | list[Buffer], step: int) -> None:
    """One event of the serialized ``Summary`` ``summary`` (or its pieces, in order):
    bnprobe's own writer takes the bytes; a ``SummaryWriter`` gets the message parsed back,
    through its file writer."""
    if isinstance(writer, EventWriter):
        writer.write_summary(summary, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    data = summary if isinstance(summary, bytes) else b"".join(summary)
    file_writer(writer).add_summary(Summary.FromString(data), step)


def summary_bytes(tags: tuple[str, ...], values: Iterable[float]) -> bytes:
    """The serialized ``Summary`` of ``tags`` with ``simple_value`` ``values``: the same message
    as ``Summary(value=[Summary.Value(tag=t, simple_value=v), ...])`` (and, for non-empty tags,
    the same bytes as its ``SerializeToString()``).

    A step's tags are nearly always those of the step before, so the message is a cached
    template of the tags with a 4-byte slot per value, into which the float32 values are copied
    in one numpy assignment: ~20 us for 500 values, against ~400 us to build the message object.
    """
    template, slots = _summary_template(tags)
    if isinstance(values, np.ndarray) and values.shape == (len(tags),):
        floats = values
    else:
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
        value = b"\x0a" + varint(len(name)) + name + b"\x15"
        head = b"\x0a" + varint(len(value) + 4) + value
        slots.append(size + len(head))
        parts += [head, bytes(4)]
        size += len(head) + 4
    template = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    return template, np.array(slots, dtype=np.int64)[:, None] + np.arange(4)


def histogram_protos(vectors: Mapping[str, np.ndarray], bins: int = HIST_BINS) -> dict[str, Any]:
    """``{tag: HistogramProto}`` of each vector's finite values in ``bins`` equal-width bins
    between its min and max (a constant vector: one bin of width 1 around it, as
    ``np.histogram`` does). Vectors with no finite value are left out. The reference for
    :func:`histogram_bytes`, which writes the same messages without building them."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    binned = _bin(vectors, bins)
    if binned is None:
        return {}
    tags, fields, limits, counts = binned
    return {
        tag: HistogramProto(
            min=float(fields[i, 0]),
            max=float(fields[i, 1]),
            num=int(fields[i, 2]),
            sum=float(fields[i, 3]),
            sum_squares=float(fields[i, 4]),
            bucket_limit=limits[i].tolist(),
            bucket=counts[i].tolist(),
        )
        for i, tag in enumerate(tags)
    }


def histogram_bytes(
    vectors: Mapping[str, np.ndarray], bins: int = HIST_BINS
) -> tuple[list[str], bytes]:
    """The tags and the serialized ``Summary`` of :func:`histogram_protos`'s histograms, built
    as bytes: the same bytes as ``Summary(value=[Value(tag=t, histo=h), ...])
    .SerializeToString()``, without a protobuf object (:func:`_histogram_summary`)."""
    binned = _bin(vectors, bins)
    if binned is None:
        return [], b""
    tags, fields, limits, counts = binned
    pieces = _histogram_pieces(_coder(tuple(tags), bins), fields, limits, counts)
    return tags, b"".join(pieces)


_SCALAR_KEYS = np.array([0x09, 0x11, 0x19, 0x21, 0x29], dtype=np.uint8)
"""The keys of ``HistogramProto``'s ``min, max, num, sum, sum_squares`` (fields 1-5, doubles)."""


class _Coder(NamedTuple):
    """What the messages of one list of histogram tags share, made once per list of tags."""

    prefixes: list[bytes]
    """Per tag, ``Value.tag`` and the key of ``Value.histo``: the head before the histo size."""
    heads: list[bytes]
    """Per tag, every byte before its ``HistogramProto`` when all five scalars are written."""
    rows: list[slice]
    """Each histogram's row in the byte matrix of :func:`_histogram_summary`."""
    array_heads: tuple[np.ndarray, np.ndarray]
    """The key and packed length of ``bucket_limit`` (6) and of ``bucket`` (7), as uint8."""
    width: int
    """Bytes of a histogram with all five scalars: ``5 * 9`` and the two packed arrays."""


@lru_cache(maxsize=8)
def _coder(tags: tuple[str, ...], bins: int) -> _Coder:
    packed = varint(8 * (bins + 1))
    array_heads = tuple(np.frombuffer(bytes([key]) + packed, dtype=np.uint8) for key in (50, 58))
    width = 5 * 9 + 2 * (1 + len(packed) + 8 * (bins + 1))
    prefixes = [b"\x0a" + varint(len(tag.encode())) + tag.encode() + b"\x2a" for tag in tags]
    heads = [_head(prefix, width) for prefix in prefixes]
    rows = [slice(i * width, (i + 1) * width) for i in range(len(tags))]
    return _Coder(prefixes, heads, rows, (array_heads[0], array_heads[1]), width)


def _head(prefix: bytes, size: int) -> bytes:
    """``Summary.value``'s key and length, then ``Value`` up to a ``HistogramProto`` of ``size``
    bytes."""
    value = prefix + varint(size)
    return b"\x0a" + varint(len(value) + size) + value


def _histogram_pieces(
    coder: _Coder, fields: np.ndarray, limits: np.ndarray, counts: np.ndarray
) -> list[Buffer]:
    """The serialized ``Summary`` (its pieces, in order: join them) of the histograms
    ``fields`` (``min, max, num, sum, sum_squares`` rows), ``limits`` and ``counts``, one
    ``Value`` each with ``coder``'s tags.

    Wire format: ``HistogramProto`` holds ``min, max, num, sum, sum_squares`` (fields 1-5,
    doubles, each left out when its bits are zero, as proto3 does) and the packed doubles
    ``bucket_limit`` (6) and ``bucket`` (7); a ``Summary.Value`` holds ``tag`` (1) and ``histo``
    (5). Every histogram is one row of a byte matrix, filled column block by column block for
    all of them at once: the five scalars, then the two arrays. A scalar left out is moved to
    the row's start, and the row is read from after it. The message is each histogram's head
    (tag and sizes, cached per tag) followed by its row: one ``bytes.join``, left to the
    caller (the event writer joins them with the event's own head).
    """
    n, width = len(fields), coder.width
    scalars = np.ascontiguousarray(fields, dtype="<f8")
    body = np.empty((n, width), dtype=np.uint8)
    scalar_part = body[:, : 5 * 9].reshape(n, 5, 9)
    scalar_part[:, :, 0] = _SCALAR_KEYS
    scalar_part[:, :, 1:] = scalars.view(np.uint8).reshape(n, 5, 8)
    at = 5 * 9
    for head, array in zip(coder.array_heads, (limits, counts), strict=True):
        body[:, at : at + len(head)] = head
        at += len(head)
        size = 8 * array.shape[1]
        body[:, at : at + size] = np.ascontiguousarray(array, dtype="<f8").view(np.uint8)
        at += size
    present = scalars.view(np.uint64) != 0  # (n, 5): proto3 leaves out zero bits
    heads: list[bytes] = coder.heads
    data = memoryview(body.tobytes()) if present.all() else None
    if data is not None:
        pieces: list[Buffer] = list(map(data.__getitem__, coder.rows))
    else:
        missing = 5 - present.sum(axis=1)
        short = np.flatnonzero(missing)
        # the scalars written, in field order, at the end of their block; the left-out first
        order = np.argsort(present[short], axis=1, kind="stable")
        scalar_part[short] = scalar_part[short[:, None], order]
        heads = list(heads)
        for i, m in zip(short.tolist(), missing[short].tolist(), strict=True):
            heads[i] = _head(coder.prefixes[i], width - 9 * m)
        data = memoryview(body.tobytes())
        ends = np.arange(1, n + 1) * width
        starts = ends - width + 9 * missing
        pieces = [data[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    out: list[Buffer] = [b""] * (2 * n)
    out[0::2] = heads
    out[1::2] = pieces
    return out


class _Binned(NamedTuple):
    """Histograms of vectors concatenated in one array, one row per vector, all float64."""

    fields: np.ndarray
    """(n, 5): ``min, max, num, sum, sum_squares`` of each vector's finite values."""
    limits: np.ndarray
    """(n, bins + 1) bucket limits (TensorBoard reads right edges)."""
    counts: np.ndarray
    """(n, bins + 1) bucket counts, each row starting with a 0."""
    has: np.ndarray
    """(n,) bool: the vector has a finite value (otherwise its row means nothing)."""


def _bin_segments(
    flat: np.ndarray, sizes: np.ndarray, bins: int, owner: np.ndarray | None = None
) -> _Binned:
    """The histograms of the vectors ``flat`` holds one after the other (``sizes[i]`` values
    each; ``owner``: each value's vector, ``np.repeat(np.arange(n), sizes)``, when cached), all
    binned at once: per vector its finite min and max, ``bins`` equal widths between them (a
    constant vector: one bin of width 1 around it), ``floor((x - left) / width)`` clipped to the
    last bin (the max falls in it), counted by one ``np.bincount`` over ``vector * bins + bin``.
    """
    n = len(sizes)
    if owner is None:
        owner = np.repeat(np.arange(n), sizes)
    finite = np.isfinite(flat)
    if finite.all():
        num = np.asarray(sizes, dtype=np.int64)
    else:
        flat, owner = flat[finite], owner[finite]
        num = np.bincount(owner, minlength=n)
    starts = np.cumsum(num) - num
    has = num > 0
    # owner is sorted: per-vector min and max by reduceat over the non-empty segments
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    if flat.size:
        lo[has] = np.minimum.reduceat(flat, starts[has])
        hi[has] = np.maximum.reduceat(flat, starts[has])
    total = np.bincount(owner, weights=flat, minlength=n)
    with np.errstate(over="ignore"):  # beyond 1e154: an infinite sum of squares
        squares = np.bincount(owner, weights=flat * flat, minlength=n)
    left, right = lo.copy(), hi.copy()
    flat_range = left == right
    left[flat_range] -= 0.5
    right[flat_range] += 0.5
    width = (right - left) / bins
    with np.errstate(all="ignore"):
        index = np.floor((flat - np.repeat(left, num)) / np.repeat(width, num)).astype(np.int64)
    np.clip(index, 0, bins - 1, out=index)
    index += owner * bins
    counts = np.zeros((n, bins + 1))
    counts[:, 1:] = np.bincount(index, minlength=n * bins).reshape(n, bins)
    with np.errstate(invalid="ignore", over="ignore"):  # no finite value: dropped by callers
        limits = left[:, None] + width[:, None] * np.arange(bins + 1)
    limits[:, -1] = right
    fields = np.stack([lo, hi, num.astype(np.float64), total, squares], axis=1)
    return _Binned(fields, limits, counts, has)


def _bin(
    vectors: Mapping[str, np.ndarray], bins: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """The histograms of ``vectors`` with a finite value: their tags, ``(min, max, num, sum,
    sum_squares)`` rows, bucket limits and bucket counts (TensorBoard reads right edges: each
    count row starts with a 0), all float64; None when there is none."""
    tags = list(vectors)
    if not tags:
        return None
    arrays = [np.asarray(vectors[t], dtype=np.float64).ravel() for t in tags]
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    binned = _bin_segments(np.concatenate(arrays), sizes, bins)
    if not binned.has.any():
        return None
    fields, limits, counts = binned.fields, binned.limits, binned.counts
    keep = np.flatnonzero(binned.has)
    if keep.size < len(tags):
        tags = [tags[i] for i in keep]
        fields, limits, counts = fields[keep], limits[keep], counts[keep]
    return tags, fields, limits, counts


class _ColumnPlan(NamedTuple):
    """How the columns of a :class:`bnprobe.tap.rows.ChannelColumns` become histograms (the
    same for every step of the same layers: cached)."""

    takes: tuple[tuple[str, np.ndarray | None], ...]
    """Per name written, which values of its column (None: all of them)."""
    sizes: np.ndarray
    """Values of each (name, layer) vector, name by name: the order of the binned array."""
    owner: np.ndarray
    order: np.ndarray
    """Into the name-by-name vectors, layer by layer: the order of the tags."""
    tags: tuple[str, ...]
    coder: _Coder


@lru_cache(maxsize=8)
def _column_plan(
    stage: str,
    root: str,
    layers: tuple[str, ...],
    sizes_key: bytes,
    present: tuple[tuple[str, bytes], ...],
    bins: int,
) -> _ColumnPlan:
    sizes = np.frombuffer(sizes_key, dtype=np.int64)
    takes: list[tuple[str, np.ndarray | None]] = []
    vector_sizes: list[np.ndarray] = []
    pairs: list[tuple[int, int]] = []  # (layer, name), name by name
    for j, (name, key) in enumerate(present):
        has = np.frombuffer(key, dtype=bool)
        if not has.any():
            continue
        take = None if has.all() else np.flatnonzero(np.repeat(has, sizes))
        takes.append((name, take))
        vector_sizes.append(sizes[has])
        pairs += [(i, j) for i in np.flatnonzero(has).tolist()]
    by_layer = sorted(range(len(pairs)), key=pairs.__getitem__)
    names = [name for name, _ in present]
    tags = tuple(hist_tag(stage, names[pairs[k][1]], layers[pairs[k][0]], root) for k in by_layer)
    flat_sizes = np.concatenate(vector_sizes) if vector_sizes else np.zeros(0, dtype=np.int64)
    return _ColumnPlan(
        tuple(takes),
        flat_sizes,
        np.repeat(np.arange(len(flat_sizes)), flat_sizes),
        np.array(by_layer, dtype=np.int64),
        tags,
        _coder(tags, bins),
    )


def _column_histograms(
    channels: Any, stage: str, names: Sequence[str], root: str, bins: int = HIST_BINS
) -> tuple[list[str], list[Buffer]]:
    """:func:`histogram_bytes` (the message's pieces) of the (name, layer) vectors of a
    ``ChannelColumns``, in the order of :func:`write_histograms`' tags, binned from its
    columns with no per-layer work."""
    columns, present = channels.columns, channels.present
    key = tuple((name, present[name].tobytes()) for name in names if name in columns)
    sizes = np.ascontiguousarray(channels.sizes, dtype=np.int64)
    plan = _column_plan(stage, root, tuple(channels.layers), sizes.tobytes(), key, bins)
    if not plan.tags:
        return [], []
    parts = [columns[name] if take is None else columns[name][take] for name, take in plan.takes]
    flat = np.concatenate(parts).astype(np.float64, copy=False)
    binned = _bin_segments(flat, plan.sizes, bins, plan.owner)
    order = plan.order
    fields, limits, counts = binned.fields[order], binned.limits[order], binned.counts[order]
    has = binned.has[order]
    if has.all():
        return list(plan.tags), _histogram_pieces(plan.coder, fields, limits, counts)
    keep = np.flatnonzero(has)
    if keep.size == 0:
        return [], []
    tags = tuple(plan.tags[i] for i in keep.tolist())
    coder = _coder(tags, bins)
    return list(tags), _histogram_pieces(coder, fields[keep], limits[keep], counts[keep])


def write_histograms(
    writer: Writer,
    stage: str,
    step: int,
    channels: Mapping[str, Mapping[str, Any]],
    names: Sequence[str] = HIST_NAMES,
    root: str = PREFIX,
) -> list[str]:
    """Histograms ``<root>/<stage>/hist/<name>/<layer>`` of every layer's per-channel vectors
    (``channels``: layer -> {name: vector}, as in ``Snapshot.channels``; numpy arrays, tensors
    or sequences) in one event; returns the tags written. NaN and inf are left out (the
    ``nonfinite`` metric counts them); a vector with no finite value is skipped.

    The tap's ``Snapshot.channels`` (a :class:`bnprobe.tap.rows.ChannelColumns`: it has
    ``columns``) is binned from its concatenated columns, with no work per layer: the tags,
    their order and the event's bytes are those of the same vectors given as a dict."""
    summary: bytes | list[Buffer]
    if getattr(channels, "columns", None) is not None:
        tags, summary = _column_histograms(channels, stage, names, root)
    else:
        vectors = {
            hist_tag(stage, name, layer, root): _as_numpy(per[name])
            for layer, per in channels.items()
            for name in names
            if name in per
        }
        tags, summary = histogram_bytes(vectors)
    if tags:
        _add_summary(writer, summary, int(step))
    return tags


def add_histograms(
    writer: Writer,
    stage: str,
    layer: str,
    step: int,
    values: Mapping[str, torch.Tensor | np.ndarray | Sequence[float]],
    root: str = PREFIX,
) -> list[str]:
    """The histograms of one layer's per-channel vectors (gamma, beta, d, v):
    :func:`write_histograms` of ``{layer: values}``, one event. Returns the tags written."""
    return write_histograms(writer, stage, step, {layer: values}, tuple(values), root)


def _as_numpy(values: Any) -> np.ndarray:
    detach = getattr(values, "detach", None)
    if detach is not None:  # a torch tensor: one copy to the host, as float64
        values = detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64).ravel()
