"""One collective per measured step: every rank's train rows to rank 0, failures included.

Uses ``torch.distributed`` only (no Lightning). Under DDP every rank runs its own probe; at each
logging step every rank calls :meth:`RankGather.gather` (a collective: it must be called by all
ranks, at the same steps, whatever happened inside the probe on any of them), which sends one
float64 vector per rank to rank 0 (the names of its values, a :class:`Layout`, only when they
change):

- the layer-aggregate rows of stage ``train`` (about 25 numbers per BN layer), and
- the per-channel running moments mu_R, var_R of each layer (2·C numbers per layer, as they were
  before this step's batch updated them), from which rank 0 computes ``rank_divergence``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pickle
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bnprobe.distributed.divergence import (
    RunningMoments,
    layer_divergences,
    rank_divergence,
    running_moments,
)
from bnprobe.distributed.ranks import collective_device, is_distributed
from bnprobe.metrics import CATALOGUE
from bnprobe.store import Rows
from bnprobe.store.table import same_names
from bnprobe.tap import Snapshot

Warn = Callable[[str], None]

_OK, _NOTHING, _FAILED = 0, 1, 2
"""A rank's status at a gather: rows sent, nothing measured, or its rows could not be built."""

HEADER = 6
"""int64 slots before the note bytes: status, length of the values, layout key, note's total
bytes, offset of this chunk in the note, bytes in this chunk."""

NOTE_BYTES = 4096
"""Bytes of a rank's note (layout, cause, warnings: zlib-compressed pickle) carried per gather;
a longer note travels over several gathers."""

ROW_BOUND = len({m.name for m in CATALOGUE if not m.per_channel})
"""At most this many layer rows per layer and step (every layer metric of the catalogue)."""


def capacity(channels: Sequence[int]) -> int:
    """Values a rank can send per gather for BN layers of these channel counts: every layer
    metric of the catalogue and the running mean and variance of every channel, per layer."""
    return sum(ROW_BOUND + 2 * int(c) for c in channels)


@dataclass(frozen=True)
class Layout:
    """What one rank's float64 vector means: a name per value, sent only when it changes (and
    then only in pieces of :data:`NOTE_BYTES` per gather); known by its :attr:`key` otherwise.

    ``layers`` and ``metrics`` name the layer rows (channel NA) of stage ``train``, one entry
    per row; ``running`` the layers whose running mean and variance follow, with their channel
    counts. The vector is ``[values of the rows..., mu_R of every running layer (layer order),
    var_R of every running layer]``."""

    layers: tuple[str, ...]
    metrics: tuple[str, ...]
    running: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return len(self.metrics) + 2 * sum(c for _, c in self.running)

    @property
    def key(self) -> int:
        """A digest of the names (the same in every process), as a signed int64."""
        text = repr((self.layers, self.metrics, self.running)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


@dataclass
class _Note:
    """What a rank sends beside its values (only when something in it is new): its layout,
    the cause of a failure, and the warnings it could not show (only rank 0 warns)."""

    layout: Layout | None = None
    cause: str | None = None
    messages: list[str] = field(default_factory=list)


class RankGather:
    """Brings one logging step's stage-``train`` layer rows of every rank to rank 0, as numbers.

    Every gather is the same collective on every rank, failure or not: one ``gather`` to rank 0
    of one float64 vector per rank, of the same length on every rank (agreed once, by an
    ``all_reduce`` at the first gather: :func:`capacity` of the layers, at least what the rank
    has to send then):

    - a header: status (rows / nothing / failed), the length of its values, the key of their
      :class:`Layout`, and where this gather's piece of its note sits in the whole note;
    - a piece of :data:`NOTE_BYTES` of its note (:class:`_Note`: a new layout, the cause of a
      failure, warnings to pass on), when it has one; nearly always empty;
    - its values, laid out by its layout.

    A rank whose rows cannot be built (``error``, an exception while encoding them, more values
    than agreed) sends status *failed* and, once per cause, the cause; rank 0 warns once per
    rank and cause, naming both. Rank 0 turns the vectors back into :class:`~bnprobe.store.Rows`
    by slicing (no pandas), so the other ranks' rows take the same fast path to the store and
    TensorBoard as its own; a rank's values are read with its layout as soon as rank 0 knows
    the key (its own layout is the same on every rank nearly always).

    ``eps`` maps layer names to their eps (for :func:`rank_divergence`); ``warn`` is how rank 0
    reports what the other ranks sent (default: ``warnings.warn``); ``capacity`` (a callable,
    asked once at the first gather) what :func:`capacity` says for the layers of the model.
    """

    def __init__(
        self,
        eps: Mapping[str, float],
        warn: Warn | None = None,
        capacity: Callable[[], int] | None = None,
    ) -> None:
        self.eps = dict(eps)
        self.warn: Warn = warn or _warn
        self.capacity = capacity
        self._cap: int | None = None  # values per gather, the same on every rank
        self._layout: Layout | None = None  # this rank's, as last encoded
        self._key = 0
        self._sent_causes: set[str] = set()
        self._outbox: list[str] = []
        self._note = b""  # the note in flight
        self._note_at = 0  # bytes of it already sent
        self._known: dict[int, Layout] = {}  # rank 0: key -> layout
        self._inbox: dict[int, bytearray] = {}  # rank 0: rank -> note being received
        self._said: dict[int, list[str]] = {}  # rank 0: what each rank said (warned once)
        self._plan: tuple[Layout, np.ndarray, np.ndarray, tuple[str, ...], object] | None = None
        self._names: tuple[Any, Any] | None = None  # the name columns the layout was made from

    def tell(self, message: str) -> None:
        """Pass a warning of this rank (not 0) to rank 0 with the next gather: ranks other than
        0 do not warn themselves."""
        if message not in self._outbox:
            self._outbox.append(message)

    def encode(self, snapshot: Snapshot) -> tuple[Layout, np.ndarray]:
        """This rank's layer rows of stage train and running moments as a layout and one float64
        vector."""
        parts = [p for p in snapshot.parts if p.channels is None and p.stage == "train"]
        running = running_moments(snapshot)
        values = [np.asarray(p.values, dtype=np.float64).reshape(-1) for p in parts]
        values += [mean.reshape(-1) for mean, _ in running.values()]
        values += [var.reshape(-1) for _, var in running.values()]
        vector = np.concatenate(values) if values else np.zeros(0)
        layout = self._layout
        counts = tuple((k, m.size) for k, (m, _) in running.items())
        if (
            layout is None
            or layout.running != counts
            or len(layout.metrics) != sum(len(p.metrics) for p in parts)
            or not _same_names(self._names, parts)
        ):
            layers = tuple(name for p in parts for name in p.layers)
            metric_names = tuple(name for p in parts for name in p.metrics)
            layout = Layout(layers, metric_names, counts)
            self._names = (parts[0].layers, parts[0].metrics) if len(parts) == 1 else None
        if len(vector) != layout.size:
            raise ValueError(f"{len(vector)} values for a layout of {layout.size}")
        return layout, vector

    def gather(
        self, snapshot: Snapshot | None, *, step: int, epoch: int, error: str | None = None
    ) -> list[Rows] | None:
        """Collective: call it on every rank at the same steps. ``snapshot=None`` with ``error``
        None: this rank measured nothing; with ``error``: its rows could not be built, and why
        (one line). Returns on rank 0 the other ranks' rows (their real ``rank``) and one
        ``rank_divergence`` row per layer (rank 0) when every rank sent its running moments;
        None on the other ranks and without a process group of more than one process.

        Only ``torch.distributed`` itself can raise here (a broken process group); encoding and
        decoding failures are turned into a failed status or a warning."""
        if not is_distributed():
            return None
        dist = torch.distributed
        rank, world = dist.get_rank(), dist.get_world_size()
        device = collective_device()
        status, vector, cause = _NOTHING, np.zeros(0), error
        own: Layout | None = None
        if error is None and snapshot is not None:
            try:
                own, vector = self.encode(snapshot)
                status = _OK
            except Exception as err:  # never skip the collective: send "failed" instead
                cause = f"building its rows to send failed with {type(err).__name__}: {err}"
                own, vector = None, np.zeros(0)
        if self._cap is None:  # the first gather: every rank agrees on the vector's length
            bound = len(vector)
            with contextlib.suppress(Exception):  # the rows' own length is a bound too
                bound = max(bound, self.capacity() if self.capacity is not None else 0)
            cap = torch.tensor([bound], dtype=torch.int64).to(device)
            dist.all_reduce(cap, op=dist.ReduceOp.MAX)
            self._cap = int(cap.item())
        if len(vector) > self._cap:
            cause = (
                f"building its rows to send failed: {len(vector)} values, more than the "
                f"{self._cap} agreed at the first gather"
            )
            own, vector = None, np.zeros(0)
        if cause is not None:
            status = _FAILED
        new = _Note(messages=self._outbox)
        self._outbox = []
        if own is not None and own != self._layout:
            self._layout, self._key = own, own.key
            new.layout = own
        if cause is not None and cause not in self._sent_causes:
            self._sent_causes.add(cause)
            new.cause = cause
        if new.layout is not None or new.cause is not None or new.messages:
            self._queue(new)
        piece = self._note[self._note_at : self._note_at + NOTE_BYTES]
        slots = NOTE_BYTES // 8
        send = np.zeros(HEADER + slots + self._cap, dtype=np.float64)
        send[:HEADER].view(np.int64)[:] = [
            status,
            len(vector),
            self._key if status == _OK else 0,
            len(self._note) if piece else 0,
            self._note_at,
            len(piece),
        ]
        send[HEADER : HEADER + slots].view(np.uint8)[: len(piece)] = np.frombuffer(piece, np.uint8)
        send[HEADER + slots : HEADER + slots + len(vector)] = vector
        self._note_at += len(piece)
        if self._note_at >= len(self._note):
            self._note, self._note_at = b"", 0
        if rank == 0 and own is not None:
            self._known[self._key] = own
        tensor = torch.from_numpy(send).to(device)
        received = [torch.empty_like(tensor) for _ in range(world)] if rank == 0 else None
        dist.gather(tensor, received, dst=0)
        if rank != 0 or received is None:
            return None
        try:
            table = torch.stack(received).cpu().numpy()
            return self._decode(table, step=step, epoch=epoch)
        except Exception as err:  # the collective is done: only rank 0's table misses rows
            self.warn(
                f"BNProbe: reading the rows of the other ranks failed with "
                f"{type(err).__name__}: {err}. Rank 0's table misses them at this step; "
                "training goes on."
            )
            return []

    def _queue(self, note: _Note) -> None:
        """Send ``note`` next; a note still in flight is sent whole first, then this one (both,
        merged, when the one in flight has not started)."""
        if self._note and self._note_at == 0:
            old = pickle.loads(zlib.decompress(self._note))
            note = _Note(
                note.layout or old.layout, note.cause or old.cause, [*old.messages, *note.messages]
            )
        elif self._note:
            self._outbox = note.messages + self._outbox  # after the one in flight
            if note.cause is not None:
                self._sent_causes.discard(note.cause)
            if note.layout is not None:
                self._layout = None  # sent again with the next gather
            return
        self._note, self._note_at = zlib.compress(pickle.dumps(note)), 0

    def _decode(self, table: np.ndarray, *, step: int, epoch: int) -> list[Rows]:
        slots = NOTE_BYTES // 8
        heads = table[:, :HEADER].view(np.int64).tolist()
        out: list[Rows] = []
        layouts: list[Layout | None] = []
        for r, (status, length, key, total, at, size) in enumerate(heads):
            note = self._receive(r, table[r, HEADER : HEADER + slots], total, at, size)
            if note is not None:
                if note.layout is not None:
                    self._known[note.layout.key] = note.layout
                if r != 0:  # rank 0 warned itself
                    self._report(r, note, step)
            layout = self._known.get(key) if status == _OK else None
            if status == _OK and (layout is None or layout.size != length):
                layout = None
                if r not in self._inbox:  # not on its way
                    self.warn(
                        f"BNProbe: rank {r} sent values without the layout that names them; "
                        "its rows are left out of rank 0's table until it sends its layout."
                    )
            layouts.append(layout)
            if r != 0 and layout is not None:
                values = table[r, HEADER + slots : HEADER + slots + length]
                n = len(layout.metrics)
                out.append(Rows(step, epoch, "train", r, layout.layers, layout.metrics, values[:n]))
        if all(layout is not None for layout in layouts):
            divergence = self._divergence(table[:, HEADER + slots :], layouts)  # type: ignore[arg-type]
            if divergence is not None:
                out.append(divergence._replace(step=step, epoch=epoch))
        return out

    def _divergence(self, values: np.ndarray, layouts: list[Layout]) -> Rows | None:
        """``rank_divergence`` rows (rank 0) from every rank's values, by slicing when every
        rank has the same running layers (nearly always), else layer by layer."""
        first = layouts[0]
        if not first.running:
            return None
        if any(layout.running != first.running for layout in layouts[1:]):
            by_rank = [_running(lay, values[r]) for r, lay in enumerate(layouts)]
            found = rank_divergence(by_rank, self.eps)
            if not found:
                return None
            names: Sequence[str] = list(found)
            result = np.array(list(found.values()), dtype=np.float64)
        else:
            plan = self._plan
            if plan is None or plan[0].running != first.running or plan[4] is not self.eps:
                counts = np.array([c for _, c in first.running], dtype=np.int64)
                eps = np.array([float(self.eps.get(k, 1e-5)) for k, _ in first.running])
                names_array = tuple(k for k, _ in first.running)  # tuples: cached downstream
                plan = self._plan = (first, counts, eps, names_array, self.eps)
            _, counts, eps, names_array, _ = plan
            n, total = len(first.metrics), int(counts.sum())
            mu = values[:, n : n + total]
            var = values[:, n + total : n + 2 * total]
            spread = [(len(lay.metrics)) for lay in layouts]
            if any(m != n for m in spread):  # other row counts: the moments sit elsewhere
                mu = np.stack([values[r, m : m + total] for r, m in enumerate(spread)])
                var = np.stack([values[r, m + total : m + 2 * total] for r, m in enumerate(spread)])
            result = layer_divergences(mu, var, counts, eps)
            names = names_array
        return Rows(0, 0, "train", 0, names, _divergence_metrics(len(names)), result)

    def _receive(
        self, rank: int, slots: np.ndarray, total: int, at: int, size: int
    ) -> _Note | None:
        """Rank 0: add a rank's piece of its note; the note once whole."""
        if size <= 0:
            return None
        if at == 0:
            self._inbox[rank] = bytearray()
        buf = self._inbox.get(rank)
        if buf is None or len(buf) != at:  # a piece missed: wait for its next note
            self._inbox.pop(rank, None)
            return None
        buf += slots.view(np.uint8)[:size].tobytes()
        if len(buf) < total:
            return None
        del self._inbox[rank]
        note = pickle.loads(zlib.decompress(bytes(buf)))  # from our own ranks
        return note if isinstance(note, _Note) else None

    def _report(self, rank: int, note: _Note, step: int) -> None:
        """Warn once per rank and cause, naming both (rank 0)."""
        said = self._said.setdefault(rank, [])
        for message in note.messages:
            if message in said:
                continue
            said.append(message)
            text = message.removeprefix("BNProbe: ")
            if note.cause is not None and note.cause in message:
                text += (
                    f" Rank {rank}'s train rows are missing from rank 0's table from step {step}."
                )
                said.append(note.cause)
            self.warn(f"BNProbe (rank {rank}): {text}")
        if note.cause is not None and not any(note.cause in m for m in said):
            said.append(note.cause)
            self.warn(
                f"BNProbe (rank {rank}): {note.cause}. Rank {rank}'s train rows are missing "
                f"from rank 0's table from step {step}; training goes on."
            )

    def agree(self, value: int, op: str = "min") -> int:
        """Every rank's ``value`` reduced with ``op`` (``"min"`` or ``"max"``), the same on every
        rank: how ranks agree before and after a step that holds collectives of its own (the
        train/eval probe under SyncBatchNorm). A collective; ``value`` itself without a process
        group."""
        if not is_distributed():
            return value
        dist = torch.distributed
        flag = torch.tensor([value], dtype=torch.int64).to(collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return int(flag.item())


def _same_names(names: tuple[Any, Any] | None, parts: Sequence[Rows]) -> bool:
    """Whether one part of rows names the same layers and metrics as ``names`` (the columns of
    the part the layout was made from: the tap hands out the same read-only arrays every step,
    compared by identity; :func:`bnprobe.store.same_names`)."""
    if names is None or len(parts) != 1:
        return False
    return same_names(names[1], parts[0].metrics) and same_names(names[0], parts[0].layers)


@functools.cache
def _divergence_metrics(n: int) -> tuple[str, ...]:
    return ("rank_divergence",) * n


def _running(layout: Layout, values: np.ndarray) -> RunningMoments:
    out: RunningMoments = {}
    at = len(layout.metrics)
    total = sum(c for _, c in layout.running)
    for name, c in layout.running:
        out[name] = (values[at : at + c], values[at + total : at + total + c])
        at += c
    return out


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
