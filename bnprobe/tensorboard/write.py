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

import itertools
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from bnprobe.store import Rows
from bnprobe.tensorboard.tags import HIST_BINS, HIST_NAMES, PREFIX, epoch_tag, hist_tag, scalar_tag

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch.utils.tensorboard import SummaryWriter


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


def write_scalars(writer: SummaryWriter, metrics: Mapping[str, float], step: int) -> None:
    """Every ``tag: value`` of ``metrics`` as one event at ``step`` of a ``SummaryWriter``."""
    _write_summary(writer, tuple(metrics), metrics.values(), step)


def write_snapshot(
    writer: SummaryWriter, snapshot: Any, keep: frozenset[str] | None = None, root: str = PREFIX
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
    aggregate of rank 0. One block of rows (nearly always) is a cached tuple of tags; several
    blocks at one step (the rows of other ranks, rank_divergence) merge, the later value of a
    tag winning, as in :func:`~bnprobe.tensorboard.tags.scalar_metrics`."""
    by_step: dict[int, list[tuple[tuple[str, ...], Iterable[float]]]] = {}
    for part in snapshot.parts:
        for rows in _layer_rows(part):
            metrics = tuple(rows.metrics)
            tags = _aggregate_tags(root, rows.stage, tuple(rows.layers), metrics)
            values: Iterable[float] = itertools.chain((rows.epoch,), rows.values)
            if keep is not None:
                index = _kept(metrics, keep)
                if len(index) == 1:  # nothing but the epoch
                    continue
                tags = tuple(tags[i] for i in index)
                values = np.fromiter(values, dtype=np.float64, count=len(metrics) + 1)[index]
            by_step.setdefault(int(rows.step), []).append((tags, values))
    out: dict[int, tuple[tuple[str, ...], Iterable[float]]] = {}
    for step, blocks in by_step.items():
        if len(blocks) == 1:
            out[step] = blocks[0]
            continue
        merged: dict[str, float] = {}
        for tags, values in blocks:
            merged.update(zip(tags, map(float, values), strict=True))
        out[step] = (tuple(merged), list(merged.values()))
    return out


def _layer_rows(part: Rows | pd.DataFrame) -> list[Rows]:
    """The layer aggregates of rank 0 in one part of a snapshot, as :class:`Rows` blocks."""
    if isinstance(part, Rows):
        keep = part.channels is None and part.rank == 0 and len(part.metrics) > 0
        return [part] if keep else []
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
    writer: SummaryWriter, tags: tuple[str, ...], values: Iterable[float], step: int
) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    if tags:
        summary = Summary.FromString(summary_bytes(tags, values))
        file_writer(writer).add_summary(summary, int(step))


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


def histogram_protos(vectors: Mapping[str, np.ndarray], bins: int = HIST_BINS) -> dict[str, Any]:
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


def write_histograms(
    writer: SummaryWriter,
    stage: str,
    step: int,
    channels: Mapping[str, Mapping[str, Any]],
    names: Sequence[str] = HIST_NAMES,
    root: str = PREFIX,
) -> list[str]:
    """Histograms ``<root>/<stage>/hist/<name>/<layer>`` of every layer's per-channel vectors
    (``channels``: layer -> {name: vector}, as in ``Snapshot.channels``; numpy arrays, tensors
    or sequences) in one event; returns the tags written. NaN and inf are left out (the
    ``nonfinite`` metric counts them); a vector with no finite value is skipped."""
    vectors = {
        hist_tag(stage, name, layer, root): _as_numpy(per[name])
        for layer, per in channels.items()
        for name in names
        if name in per
    }
    protos = histogram_protos(vectors)
    if protos:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, histo=h) for t, h in protos.items()])
        file_writer(writer).add_summary(summary, int(step))
    return list(protos)


def add_histograms(
    writer: SummaryWriter,
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
