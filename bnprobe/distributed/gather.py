"""Every rank's train rows to rank 0, failures included, several measured steps per collective.

Uses ``torch.distributed`` only (no Lightning). Under DDP every rank runs its own probe; at each
gathered step (or for a block of them) every rank :meth:`~RankGather.add`\\ s its rows (local: no
communication), and calls :meth:`RankGather.exchange` (a collective: it must be called by all
ranks, at the same steps, whatever happened inside the probe on any of them) when
:meth:`RankGather.fills` says so, and at the end of each epoch, before a checkpoint and at the
end of fit. An exchange sends one float64 vector per rank to rank 0 holding the steps added
since the last one (the names of its values, a :class:`Layout`, only when they change), per
step:

- the layer-aggregate rows of stage ``train`` (about 25 numbers per BN layer), and
- the per-channel running moments mu_R, var_R of each layer (2·C numbers per layer, as they were
  before this step's batch updated them), from which rank 0 computes ``rank_divergence``.

The fixed cost of the collective (gloo: 0.2-0.9 ms of CPU a call) is paid once per ``batch``
steps; rank 0 gets the other ranks' rows up to ``batch`` measured steps late.
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
from typing import Any, NamedTuple

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
from bnprobe.store.table import read_only, same_names, tile
from bnprobe.tap import Snapshot

Warn = Callable[[str], None]

_OK, _NOTHING, _FAILED = 0, 1, 2
"""A rank's status at a step: rows sent, nothing measured, or its rows could not be built."""

HEADER = 4
"""int64 slots before the note bytes: steps in this vector, the note's total bytes, offset of
this chunk in the note, bytes in this chunk."""

STEP_HEADER = 5
"""int64 slots before each step's values: step, epoch, status, length of the values, layout
key."""

NOTE_BYTES = 4096
"""Bytes of a rank's note (layouts, causes, warnings: zlib-compressed pickle) carried per step
of room in an exchange (``batch_steps`` x this per exchange: a batch carries as much of a note
as that many single steps did); a longer note travels over several exchanges."""

BATCH = 32
"""Measured steps per exchange by default (:class:`RankGather` ``batch``)."""

BATCH_BYTES = 4 << 20
"""At most this many bytes of steps per rank and exchange: fewer steps per exchange for wide
models (rank 0 receives ``world`` such vectors at once)."""

ROW_BOUND = len({m.name for m in CATALOGUE if not m.per_channel})
"""At most this many layer rows per layer and step (every layer metric of the catalogue)."""


def capacity(channels: Sequence[int]) -> int:
    """Values a rank can send per step for BN layers of these channel counts: every layer
    metric of the catalogue and the running mean and variance of every channel, per layer."""
    return sum(ROW_BOUND + 2 * int(c) for c in channels)


@dataclass(frozen=True)
class Layout:
    """What one rank's float64 values of a step mean: a name per value, sent only when it
    changes (and then only in pieces of :meth:`RankGather.note_bytes` per exchange); known by its
    :attr:`key` otherwise.

    ``layers`` and ``metrics`` name the layer rows (channel NA) of stage ``train``, one entry
    per row; ``running`` the layers whose running mean and variance follow, with their channel
    counts. The values are ``[values of the rows..., mu_R of every running layer (layer order),
    var_R of every running layer]``."""

    layers: tuple[str, ...]
    metrics: tuple[str, ...]
    running: tuple[tuple[str, int], ...]

    @functools.cached_property
    def size(self) -> int:
        return len(self.metrics) + 2 * sum(c for _, c in self.running)

    @functools.cached_property
    def key(self) -> int:
        """A digest of the names (the same in every process), as a signed int64."""
        text = repr((self.layers, self.metrics, self.running)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


@dataclass
class _Note:
    """What a rank sends beside its values (only when something in it is new): its new layouts,
    the causes of failures, and the warnings it could not show (only rank 0 warns)."""

    layouts: list[Layout] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.layouts or self.causes or self.messages)


class _Step(NamedTuple):
    """One added step of this rank, waiting for the next exchange."""

    step: int
    epoch: int
    status: int
    key: int
    values: np.ndarray


class RankGather:
    """Brings the stage-``train`` layer rows of every rank to rank 0, as numbers, ``batch``
    measured steps per collective.

    Every exchange is the same collective on every rank, failure or not: one ``gather`` to rank
    0 of one float64 vector per rank, of the same length on every rank (agreed at the first
    exchange by an ``all_reduce``: room for :attr:`batch_steps` steps of :func:`capacity`
    values, the bound being at least what a rank has to send then):

    - a header: how many steps it holds, and where this exchange's piece of its note sits in
      the whole note;
    - a piece of :attr:`note_bytes` of its note (:class:`_Note`: new layouts, causes of
      failures, warnings to pass on), when it has one; nearly always empty;
    - per step: step, epoch, status (rows / nothing / failed), the length of its values, the
      key of their :class:`Layout`, then the values.

    :meth:`add` keeps a step on this rank (no communication); :meth:`exchange` sends what was
    added. The first exchange holds one step (it agrees the sizes), the later ones up to
    :attr:`batch_steps`; :attr:`due` says when, from the number of added steps alone, so every
    rank agrees. :meth:`gather` is both for one step.

    A rank whose rows cannot be built (``error``, an exception while encoding them, more values
    than agreed) sends status *failed* and, once per cause, the cause; rank 0 warns once per
    rank and cause, naming both. Rank 0 turns the vectors back into :class:`~bnprobe.store.Rows`
    by slicing (no pandas), so the other ranks' rows take the same fast path to the store and
    TensorBoard as its own; a rank's values are read with its layout as soon as rank 0 knows
    the key (its own layout is the same on every rank nearly always).

    ``eps`` maps layer names to their eps (for :func:`rank_divergence`); ``warn`` is how rank 0
    reports what the other ranks sent (default: ``warnings.warn``); ``capacity`` (a callable,
    asked once at the first exchange) what :func:`capacity` says for the layers of the model;
    ``batch`` the most measured steps per exchange (fewer when they would exceed
    :data:`BATCH_BYTES`).
    """

    def __init__(
        self,
        eps: Mapping[str, float],
        warn: Warn | None = None,
        capacity: Callable[[], int] | None = None,
        batch: int = BATCH,
    ) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"RankGather(batch=...) must be a positive int; got {batch!r}")
        self.eps = dict(eps)
        self.warn: Warn = warn or _warn
        self.capacity = capacity
        self.batch = batch
        self.batch_steps = 1
        """Steps per exchange, the same on every rank: 1 until the first exchange agreed the
        sizes, then ``batch`` or fewer (:data:`BATCH_BYTES`)."""
        self._cap: int | None = None  # values per step, the same on every rank
        self._steps: list[_Step] = []  # added, not exchanged yet
        self._layout: Layout | None = None  # this rank's, as last encoded
        self._key = 0
        self._sent_causes: set[str] = set()
        self._outbox: list[str] = []
        self._next = _Note()  # what the next note holds
        self._note = b""  # the note in flight
        self._note_at = 0  # bytes of it already sent
        self._known: dict[int, Layout] = {}  # rank 0: key -> layout
        self._inbox: dict[int, bytearray] = {}  # rank 0: rank -> note being received
        self._said: dict[int, list[str]] = {}  # rank 0: what each rank said (warned once)
        self._plan: tuple[Layout, np.ndarray, np.ndarray, tuple[str, ...], object] | None = None
        self._names: tuple[Any, Any] | None = None  # the name columns the layout was made from
        self._into: torch.Tensor | None = None  # rank 0: where the exchanges arrive
        self._buffer: np.ndarray | None = None  # this rank's vector of an exchange, reused

    @property
    def due(self) -> bool:
        """Whether the steps added so far fill an exchange (call :meth:`exchange` now): a
        function of the number of added steps alone, the same on every rank."""
        return self.fills(0)

    def fills(self, pending: int) -> bool:
        """Whether the steps added so far and ``pending`` gathered steps not added yet fill an
        exchange (:attr:`due` once they are added): what a caller that adds its steps at the
        exchange asks (the callback, whose tap keeps steps for blocks)."""
        return len(self._steps) + pending >= self.batch_steps

    @property
    def note_bytes(self) -> int:
        """Bytes of note an exchange carries: :data:`NOTE_BYTES` per step of room."""
        return NOTE_BYTES * self.batch_steps

    def tell(self, message: str) -> None:
        """Pass a warning of this rank (not 0) to rank 0 with the next exchange: ranks other
        than 0 do not warn themselves."""
        if message not in self._outbox:
            self._outbox.append(message)

    def encode(self, snapshot: Snapshot) -> tuple[Layout, np.ndarray]:
        """This rank's layer rows of stage train and running moments as a layout and float64
        values: one vector for the rows of one step; for a block of K steps (multi-step
        :class:`~bnprobe.store.Rows`, every step naming its rows alike:
        :meth:`~bnprobe.store.Rows.tiling`), a (K, size) matrix, one row per step in order.
        A block's running moments are its channels with the steps on the first axis (see
        :func:`_running_columns`)."""
        parts = [p for p in snapshot.parts if p.channels is None and p.stage == "train"]
        block = any(p.multi for p in parts)
        k, names = 1, parts
        if block:
            k, names = _block_names(parts)
        counts, mu, var = _running_columns(snapshot.channels, k if block else None)
        values = [np.asarray(p.values, dtype=np.float64).reshape(k, -1) for p in parts]
        matrix = (
            np.concatenate([*values, mu, var], axis=1) if values or counts else np.zeros((k, 0))
        )
        layout = self._layout
        if (
            layout is None
            or layout.running != counts
            or len(layout.metrics) != sum(len(p.metrics) for p in names)
            or not _same_names(self._names, names)
        ):
            layers = tuple(name for p in names for name in p.layers)
            metric_names = tuple(name for p in names for name in p.metrics)
            layout = Layout(layers, metric_names, counts)
            self._names = (names[0].layers, names[0].metrics) if len(names) == 1 else None
        if matrix.shape[1] != layout.size:
            raise ValueError(f"{matrix.shape[1]} values for a layout of {layout.size}")
        return layout, matrix if block else matrix[0]

    def add(
        self,
        snapshot: Snapshot | None,
        *,
        step: int | Sequence[int],
        epoch: int | Sequence[int],
        error: str | None = None,
    ) -> None:
        """Keep this rank's rows of a gathered step, or of a block of gathered steps, for the
        next :meth:`exchange` (no communication; call it on every rank at the same steps).
        ``snapshot=None`` with ``error`` None: this rank measured nothing; with ``error``: its
        rows could not be built, and why (one line). Never raises: an encoding failure is sent
        as a failed status. Does nothing without a process group of more than one process.

        A block: ``step`` (and ``epoch``, or one epoch for all) the K steps in order, and the
        snapshot's layer rows those K steps as multi-step :class:`~bnprobe.store.Rows`
        (:meth:`encode`); it counts as K steps towards :attr:`due`, and rank 0 gets the same
        rows as from K single steps."""
        if not is_distributed():
            return
        steps = [int(step)] if isinstance(step, int | np.integer) else [int(s) for s in step]
        if isinstance(epoch, int | np.integer):
            epochs = [int(epoch)] * len(steps)
        else:
            epochs = [int(e) for e in epoch]
        status, rows, cause = _NOTHING, [_EMPTY] * len(steps), error
        if error is None and snapshot is not None and len(steps) > 1 and len(epochs) == len(steps):
            try:
                singles = _split_block(snapshot, steps)
            except Exception as err:
                cause = f"building its rows to send failed with {type(err).__name__}: {err}"
            else:
                if singles is not None:  # steps that name their rows differently: one by one
                    for one, s, e in zip(singles, steps, epochs, strict=True):
                        self.add(one, step=s, epoch=e)
                    return
        if cause is None and snapshot is not None:
            try:
                own, values = self.encode(snapshot)
                if values.ndim == 1:
                    values = values.reshape(1, -1)
                if len(values) != len(steps) or len(epochs) != len(steps):
                    raise ValueError(
                        f"{len(values)} steps of rows for {len(steps)} steps and "
                        f"{len(epochs)} epochs"
                    )
                if len(steps) > 1 and _block_steps(snapshot) != steps:
                    raise ValueError(f"a block of steps {_block_steps(snapshot)}, not {steps}")
                rows, status = list(values), _OK
                if own != self._layout:
                    self._layout, self._key = own, own.key
                    self._known[self._key] = own  # rank 0 reads its own layout too
                    self._next.layouts.append(own)
            except Exception as err:  # never skip the collective: send "failed" instead
                cause = f"building its rows to send failed with {type(err).__name__}: {err}"
                rows = [_EMPTY] * len(steps)
        if cause is not None:
            status = _FAILED
            self._cause(cause)
        key = self._key if status == _OK else 0
        if len(epochs) != len(steps):
            epochs = [epochs[0] if epochs else 0] * len(steps)
        self._steps += [
            _Step(s, e, status, key, v) for s, e, v in zip(steps, epochs, rows, strict=True)
        ]

    def gather(
        self, snapshot: Snapshot | None, *, step: int, epoch: int, error: str | None = None
    ) -> list[Rows] | None:
        """:meth:`add` this step, then :meth:`exchange` (a collective): one step per
        collective."""
        self.add(snapshot, step=step, epoch=epoch, error=error)
        return self.exchange(step=step, epoch=epoch)

    def exchange(self, *, step: int, epoch: int) -> list[Rows] | None:
        """Collective: call it on every rank at the same points (when :attr:`due`, and at the
        schedule's flush points), with or without added steps. Sends the added steps (one
        ``gather`` per :attr:`batch_steps` of them, at least one). Returns on rank 0 the other
        ranks' rows of those steps (their real ``rank``) and per step one ``rank_divergence``
        row per layer (rank 0) when every rank sent its running moments; None on the other
        ranks and without a process group of more than one process. ``step`` and ``epoch``:
        where the caller is (for the warnings).

        Only ``torch.distributed`` itself can raise here (a broken process group); encoding and
        decoding failures are turned into a failed status or a warning."""
        if not is_distributed():
            self._steps = []
            return None
        dist = torch.distributed
        if self._cap is None:  # the first exchange: every rank agrees on the sizes
            bound = max((len(s.values) for s in self._steps), default=0)
            with contextlib.suppress(Exception):  # the rows' own length is a bound too
                bound = max(bound, self.capacity() if self.capacity is not None else 0)
            cap = torch.tensor([bound], dtype=torch.int64).to(collective_device())
            dist.all_reduce(cap, op=dist.ReduceOp.MAX)
            self._cap = int(cap.item())
            per_step = 8 * (STEP_HEADER + self._cap)
            self.batch_steps = max(1, min(self.batch, BATCH_BYTES // per_step))
        steps, self._steps = self._steps, []
        for i, s in enumerate(steps):
            if len(s.values) > self._cap:
                self._cause(
                    f"building its rows to send failed: {len(s.values)} values, more than the "
                    f"{self._cap} agreed at the first gather"
                )
                steps[i] = _Step(s.step, s.epoch, _FAILED, 0, _EMPTY)
        out: list[Rows] | None = None
        for at in range(0, max(len(steps), 1), self.batch_steps):
            got = self._send(steps[at : at + self.batch_steps], step, epoch)
            if got is not None:
                out = [*(out or []), *got]
        return out

    def _cause(self, cause: str) -> None:
        if cause not in self._sent_causes:
            self._sent_causes.add(cause)
            self._next.causes.append(cause)

    def _send(self, steps: list[_Step], step: int, epoch: int) -> list[Rows] | None:
        """One ``gather`` of these steps (at most :attr:`batch_steps`)."""
        dist = torch.distributed
        rank, world = dist.get_rank(), dist.get_world_size()
        send = self._pack(steps)
        tensor = torch.from_numpy(send).to(collective_device())
        into = None  # rank 0: every rank's vector, as the rows of one table (no stack)
        if rank == 0:
            into = self._into
            if into is None or into.shape != (world, len(send)) or into.device != tensor.device:
                into = torch.empty((world, len(send)), dtype=tensor.dtype, device=tensor.device)
                self._into = into  # kept: rows read from it are copies (_rows_of, _decode)
        dist.gather(tensor, None if into is None else list(into.unbind(0)), dst=0)
        if into is None:
            return None
        try:
            table = into.cpu().numpy()
            return self._decode(table, step=step, epoch=epoch)
        except Exception as err:  # the collective is done: only rank 0's table misses rows
            self.warn(
                f"BNProbe: reading the rows of the other ranks failed with "
                f"{type(err).__name__}: {err}. Rank 0's table misses them at this step; "
                "training goes on."
            )
            return []

    def _pack(self, steps: list[_Step]) -> np.ndarray:
        """This rank's vector of one exchange: the header, the next piece of its note, these
        steps (at most :attr:`batch_steps`) and zeros for the rest."""
        assert self._cap is not None
        self._next.messages += self._outbox
        self._outbox = []
        if not self._note and self._next:  # one note at a time, whole
            self._note, self._note_at = zlib.compress(pickle.dumps(self._next)), 0
            self._next = _Note()
        piece = self._note[self._note_at : self._note_at + self.note_bytes]
        slots = self.note_bytes // 8
        width = STEP_HEADER + self._cap
        size = HEADER + slots + self.batch_steps * width
        send = self._buffer  # reused: what a step row holds past its length is never read
        if send is None or len(send) != size:
            send = self._buffer = np.zeros(size, dtype=np.float64)
        send[:HEADER].view(np.int64)[:] = [
            len(steps),
            len(self._note) if piece else 0,
            self._note_at,
            len(piece),
        ]
        send[HEADER : HEADER + slots].view(np.uint8)[: len(piece)] = np.frombuffer(piece, np.uint8)
        body = send[HEADER + slots :].reshape(self.batch_steps, width)
        if steps:
            heads = np.array(
                [(s.step, s.epoch, s.status, len(s.values), s.key) for s in steps], dtype=np.int64
            )
            body[: len(steps), :STEP_HEADER].view(np.int64)[:] = heads
            for row, s in zip(body, steps, strict=False):
                row[STEP_HEADER : STEP_HEADER + len(s.values)] = s.values
        self._note_at += len(piece)
        if self._note_at >= len(self._note):
            self._note, self._note_at = b"", 0
        return send

    def _decode(self, table: np.ndarray, *, step: int, epoch: int) -> list[Rows]:
        slots = self.note_bytes // 8
        assert self._cap is not None
        width = STEP_HEADER + self._cap
        world = len(table)
        heads = table[:, :HEADER].view(np.int64).tolist()
        body = table[:, HEADER + slots :].reshape(world, self.batch_steps, width)
        step_heads = body[:, :, :STEP_HEADER].view(np.int64)
        n = min(int(h[0]) for h in heads)
        first = int(step_heads[0, 0, 0]) if n else step
        for r, (_, total, at, size) in enumerate(heads):
            note = self._receive(r, table[r, HEADER : HEADER + slots], total, at, size)
            if note is not None:
                for new in note.layouts:
                    self._known[new.key] = new
                if r != 0:  # rank 0 warned itself
                    self._report(r, note, first)
        runs = [self._runs(step_heads[r, :n], r) for r in range(world)]
        out: list[Rows] = []
        for r in range(1, world):  # rank 0's own rows are recorded as it measures them
            merged: list[tuple[Layout, list[int]]] = []  # steps read with one layout, in order
            for a, b, layout in runs[r]:
                if layout is None:
                    continue
                if merged and merged[-1][0] is layout:
                    merged[-1][1].extend(range(a, b))
                else:
                    merged.append((layout, list(range(a, b))))
            out += [_rows_of(body, step_heads, r, steps, layout) for layout, steps in merged]
        out += self._divergences(body, step_heads, runs, n)
        return out

    def _runs(self, heads: np.ndarray, rank: int) -> list[tuple[int, int, Layout | None]]:
        """A rank's steps of an exchange (their headers) as runs ``[a, b)`` of consecutive steps
        read with one layout (None: no rows), nearly always one run: no per-step work."""
        n = len(heads)
        if not n:
            return []
        status, length, key = heads[:, 2], heads[:, 3], heads[:, 4]
        change = (status[1:] != status[:-1]) | (length[1:] != length[:-1]) | (key[1:] != key[:-1])
        starts = [0, *(np.flatnonzero(change) + 1).tolist()]
        runs: list[tuple[int, int, Layout | None]] = []
        for a, b in zip(starts, [*starts[1:], n], strict=True):
            layout = self._known.get(int(key[a])) if status[a] == _OK else None
            if status[a] == _OK and (layout is None or layout.size != int(length[a])):
                layout = None
                if rank not in self._inbox:  # not on its way
                    self.warn(
                        f"BNProbe: rank {rank} sent values without the layout that names them; "
                        "its rows are left out of rank 0's table until it sends its layout."
                    )
            runs.append((a, b, layout))
        return runs

    def _divergences(
        self,
        body: np.ndarray,
        step_heads: np.ndarray,
        runs: list[list[tuple[int, int, Layout | None]]],
        n: int,
    ) -> list[Rows]:
        """``rank_divergence`` rows (rank 0) of every step where every rank sent its values:
        when every rank read all its steps with one layout, all of them having rank 0's
        running layers (nearly always), one numpy pass over slices of the exchange; otherwise
        the steps that share rank 0's running layers in one pass, the others step by step."""
        if not n or len(runs) < 2:
            return []
        if all(len(r) == 1 and r[0][2] is not None for r in runs):
            lays = [r[0][2] for r in runs]
            first = lays[0]
            assert first is not None
            if not first.running:
                return []
            if all(lay.running == first.running for lay in lays[1:]):  # type: ignore[union-attr]
                at = [STEP_HEADER + len(lay.metrics) for lay in lays]  # type: ignore[union-attr]
                return self._divergence_block(body, step_heads, first, at, slice(0, n))
        layouts: list[list[Layout | None]] = [[] for _ in range(n)]
        for rank_runs in runs:
            for a, b, layout in rank_runs:
                for j in range(a, b):
                    layouts[j].append(layout)
        out: list[Rows] = []
        same: list[int] = []
        for j, lays in enumerate(layouts):
            if any(lay is None for lay in lays):
                continue
            first = lays[0]
            assert first is not None
            if not first.running:
                continue
            if all(lay.running == first.running for lay in lays[1:]):  # type: ignore[union-attr]
                same.append(j)
                continue
            by_rank = [
                _running(lay, body[r, j, STEP_HEADER:])  # type: ignore[arg-type]
                for r, lay in enumerate(lays)
            ]
            found = rank_divergence(by_rank, self.eps)
            if found:
                s, e = step_heads[0, j, :2].tolist()
                names = list(found)
                result = np.array(list(found.values()), dtype=np.float64)
                out.append(Rows(s, e, "train", 0, names, _divergence_metrics(len(names)), result))
        if same:
            lays0 = layouts[same[0]]
            first = lays0[0]
            assert first is not None
            if all(layouts[j] == lays0 for j in same):  # one layout per rank: slices
                at = [STEP_HEADER + len(lay.metrics) for lay in lays0]  # type: ignore[union-attr]
                block = self._divergence_block(body, step_heads, first, at, np.array(same))
            else:
                block = []
                for j in same:
                    at = [STEP_HEADER + len(lay.metrics) for lay in layouts[j]]  # type: ignore[union-attr]
                    block += self._divergence_block(body, step_heads, first, at, np.array([j]))
                block = [Rows.stack(block)] if len(block) > 1 else block
            if not out:  # one block of every step, in step order
                return block
            out += [one for rows in block for one in rows.split()]
        out.sort(key=lambda rows: int(rows.step))
        return out

    def _divergence_block(
        self,
        body: np.ndarray,
        step_heads: np.ndarray,
        first: Layout,
        at: list[int],
        steps: slice | np.ndarray,
    ) -> list[Rows]:
        """``rank_divergence`` of these steps (of the exchange), where every rank's running
        moments sit at ``at[rank]`` of its values, for rank 0's running layers: one
        :func:`layer_divergences` over every step and layer at once."""
        plan = self._plan
        if plan is None or plan[0].running != first.running or plan[4] is not self.eps:
            counts = np.array([c for _, c in first.running], dtype=np.int64)
            eps = np.array([float(self.eps.get(k, 1e-5)) for k, _ in first.running])
            names_array = tuple(k for k, _ in first.running)  # tuples: cached downstream
            plan = self._plan = (first, counts, eps, names_array, self.eps)
        _, counts, eps, names, _ = plan
        total = first.size - len(first.metrics)
        half = total // 2
        world = body.shape[0]
        mu = np.stack([body[r, steps, a : a + half] for r, a in enumerate(at)])
        var = np.stack([body[r, steps, a + half : a + total] for r, a in enumerate(at)])
        k = mu.shape[1]
        result = layer_divergences(
            mu.reshape(world, k * half),
            var.reshape(world, k * half),
            np.tile(counts, k),
            np.tile(eps, k),
        ).reshape(k, len(counts))
        metrics = _divergence_metrics(len(names))
        heads = step_heads[0, steps, :2]
        if k == 1:
            s, e = heads[0].tolist()
            return [Rows(s, e, "train", 0, names, metrics, result[0])]
        size = len(names)
        return [
            Rows(
                read_only(np.repeat(heads[:, 0], size)),
                read_only(np.repeat(heads[:, 1], size)),
                "train",
                0,
                tile(names, k),
                tile(metrics, k),
                result.reshape(-1),
            )
        ]

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
            for cause in note.causes:
                if cause in message:
                    text += (
                        f" Rank {rank}'s train rows are missing from rank 0's table from step "
                        f"{step}."
                    )
                    said.append(cause)
                    break
            self.warn(f"BNProbe (rank {rank}): {text}")
        for cause in note.causes:
            if not any(cause in m for m in said):
                said.append(cause)
                self.warn(
                    f"BNProbe (rank {rank}): {cause}. Rank {rank}'s train rows are missing "
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


_EMPTY = np.zeros(0)


def _same_names(names: tuple[Any, Any] | None, parts: Sequence[Rows]) -> bool:
    """Whether one part of rows names the same layers and metrics as ``names`` (the columns of
    the part the layout was made from: the tap hands out the same read-only arrays every step,
    compared by identity; :func:`bnprobe.store.same_names`)."""
    if names is None or len(parts) != 1:
        return False
    return same_names(names[1], parts[0].metrics) and same_names(names[0], parts[0].layers)


def _block_names(parts: Sequence[Rows]) -> tuple[int, list[Rows]]:
    """The number of steps K of a block's layer rows, and its parts with one step's name
    columns (what a single step of the block names its rows with). Raises unless every part
    holds the same K steps, each naming its rows alike (:meth:`~bnprobe.store.Rows.tiling`)."""
    names: list[Rows] = []
    steps: np.ndarray | None = None
    for part in parts:
        tiled = part.tiling()
        if tiled is None:
            raise ValueError("a block's layer rows must name every step's rows alike")
        n, layers, metrics = tiled
        first = np.asarray(part.step)[::n]
        if steps is not None and not np.array_equal(first, steps):
            raise ValueError("a block's layer rows must hold the same steps in every part")
        steps = first
        names.append(part._replace(layers=layers, metrics=metrics))
    return (0 if steps is None else len(steps)), names


def _split_block(snapshot: Snapshot, steps: list[int]) -> list[Snapshot | None] | None:
    """A block whose steps do not all name their layer rows alike (the first measured step has
    its trace rows, a layer switched off, ...) as one snapshot per step (None: no rows at that
    step), each with its own step's channels; None for a block :meth:`RankGather.encode` reads
    at once."""
    parts = [p for p in snapshot.parts if p.channels is None and p.stage == "train"]
    if all(p.multi and p.tiling() is not None for p in parts):
        return None
    by_step: dict[int, list[Rows]] = {s: [] for s in steps}
    for part in parts:
        for one in part.split():
            if int(one.step) not in by_step:
                raise ValueError(f"a block holds rows of step {one.step}, not one of {steps}")
            by_step[int(one.step)].append(one)
    return [
        Snapshot(by_step[s], _step_channels(snapshot.channels, i, len(steps)))
        if by_step[s]
        else None
        for i, s in enumerate(steps)
    ]


def _step_channels(channels: Any, i: int, k: int) -> Any:
    """Step ``i`` of a block's channels (:func:`_running_columns` says what they may be)."""
    if isinstance(channels, Sequence) and not isinstance(channels, Mapping):
        return channels[i]
    columns = getattr(channels, "columns", None)
    if isinstance(columns, dict):
        one = {key: np.asarray(col).reshape(k, -1)[i] for key, col in columns.items()}
        return type(channels)(channels.layers, channels.sizes, one, channels.present)
    return {
        layer: {key: np.asarray(v).reshape(k, -1)[i] for key, v in per.items()}
        for layer, per in channels.items()
    }


def _block_steps(snapshot: Snapshot) -> list[int]:
    """The steps of a block's train layer rows, in order."""
    for part in snapshot.parts:
        if part.channels is None and part.stage == "train" and part.multi:
            step = np.asarray(part.step)
            return [int(step[a]) for a, _ in part.runs()]
    return []


def _running_columns(
    channels: Any, k: int | None
) -> tuple[tuple[tuple[str, int], ...], np.ndarray, np.ndarray]:
    """The running means and variances of the layers that have them, as (layer, channels) in
    layer order and two (K, channels of those layers) float64 matrices (K = 1 for one step,
    ``k=None``). ``channels``: a snapshot's per-channel vectors, either the tap's
    :class:`~bnprobe.tap.rows.ChannelColumns` (every layer's channels in one column per name:
    read as they are, no per-layer work) or a mapping layer -> {name: vector}; for a block of
    ``k`` steps the steps are on the first axis ((k, channels) per layer, (k, all channels) per
    column), or ``channels`` is a sequence of one such mapping per step."""
    rows = 1 if k is None else k
    if isinstance(channels, Sequence) and not isinstance(channels, Mapping):
        if len(channels) == rows and rows > 1:
            block = _block_columns(channels)
            if block is not None:  # a tap block: every step read at once
                return block
        per_step = [_running_columns(c, None) for c in channels]
        if len(per_step) != rows or len({counts for counts, _, _ in per_step}) > 1:
            raise ValueError("a block's channels must hold the same layers at every step")
        if not per_step:
            return (), np.zeros((rows, 0)), np.zeros((rows, 0))
        mu = np.concatenate([m for _, m, _ in per_step])
        return per_step[0][0], mu, np.concatenate([v for _, _, v in per_step])
    columns = getattr(channels, "columns", None)
    if isinstance(columns, dict) and "running_mean" in columns and "running_var" in columns:
        present = channels.present
        has = present["running_mean"] & present["running_var"]
        sizes = np.asarray(channels.sizes, dtype=np.int64)
        mu = np.asarray(columns["running_mean"], dtype=np.float64).reshape(rows, -1)
        var = np.asarray(columns["running_var"], dtype=np.float64).reshape(rows, -1)
        if not has.all():
            keep = np.repeat(has, sizes)
            mu, var = mu[:, keep], var[:, keep]
        names = [n for n, h in zip(channels.layers, has.tolist(), strict=True) if h]
        return tuple(zip(names, sizes[has].tolist(), strict=True)), mu, var
    running = running_moments(Snapshot([], channels))
    if not running:
        return (), np.zeros((rows, 0)), np.zeros((rows, 0))
    means = [m.reshape(rows, -1) for m, _ in running.values()]
    variances = [v.reshape(rows, -1) for _, v in running.values()]
    counts = tuple((name, m.shape[1]) for name, m in zip(running, means, strict=True))
    return counts, np.concatenate(means, axis=1), np.concatenate(variances, axis=1)


def _block_columns(
    channels: Sequence[Any],
) -> tuple[tuple[tuple[str, int], ...], np.ndarray, np.ndarray] | None:
    """:func:`_running_columns` of a block's channels given one per step, read at once when
    every step is the tap's :class:`~bnprobe.tap.rows.ChannelColumns` of the same layers,
    channel counts and running layers (a tap block: its steps share one plan); None
    otherwise (read step by step). The checks per step are cheap (the tap hands every step
    the same ``sizes`` array and layer names), so a block costs one read, not one per step."""
    first = channels[0]
    columns = getattr(first, "columns", None)
    if not isinstance(columns, dict) or not {"running_mean", "running_var"} <= columns.keys():
        return None
    present, sizes, layers = first.present, first.sizes, first.layers
    has = present["running_mean"] & present["running_var"]
    flags = has.tobytes()
    width = int(np.sum(sizes))
    mus, variances = [], []
    for step in channels:
        cols = getattr(step, "columns", None)
        if not isinstance(cols, dict) or step.layers != layers:
            return None
        if step.sizes is not sizes and not np.array_equal(step.sizes, sizes):
            return None
        mu, var = cols.get("running_mean"), cols.get("running_var")
        if mu is None or var is None or len(mu) != width or len(var) != width:
            return None
        have = step.present
        if (have["running_mean"] & have["running_var"]).tobytes() != flags:
            return None
        mus.append(mu)
        variances.append(var)
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(channels)
    mu = np.concatenate(mus).astype(np.float64, copy=False).reshape(k, width)
    var = np.concatenate(variances).astype(np.float64, copy=False).reshape(k, width)
    if not has.all():
        keep = np.repeat(has, sizes)
        mu, var = mu[:, keep], var[:, keep]
    names = [n for n, h in zip(layers, has.tolist(), strict=True) if h]
    return tuple(zip(names, sizes[has].tolist(), strict=True)), mu, var


def _rows_of(
    body: np.ndarray, step_heads: np.ndarray, rank: int, steps: list[int], layout: Layout | None
) -> Rows:
    """The layer rows of ``rank`` at these steps (indices into the exchange), all read with
    ``layout``: one :class:`Rows` of the steps (single-step rows for one step)."""
    assert layout is not None
    size = len(layout.metrics)
    if len(steps) == 1:
        s, e = step_heads[rank, steps[0], :2].tolist()
        values = body[rank, steps[0], STEP_HEADER : STEP_HEADER + size].copy()  # not the table's
        return Rows(s, e, "train", rank, layout.layers, layout.metrics, values)
    k = len(steps)
    heads = step_heads[rank, steps, :2]
    return Rows(
        read_only(np.repeat(heads[:, 0], size)),
        read_only(np.repeat(heads[:, 1], size)),
        "train",
        rank,
        tile(layout.layers, k),
        tile(layout.metrics, k),
        body[rank, steps, STEP_HEADER : STEP_HEADER + size].reshape(-1),
    )


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
