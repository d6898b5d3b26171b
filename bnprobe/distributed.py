"""Several processes (DDP): gather every rank's train rows to rank 0 and measure rank divergence.

Uses ``torch.distributed`` only (no Lightning). Under DDP every rank runs its own probe; at each
logging step every rank calls :meth:`RankGather.gather` (a collective: it must be called by all
ranks, at the same steps, whatever happened inside the probe on any of them), which sends one
float64 vector per rank to rank 0 (the names of its values, a :class:`Layout`, only when they
change):

- the layer-aggregate rows of stage ``train`` (about 25 numbers per BN layer), and
- the per-channel running moments mu_R, var_R of each layer (2·C numbers per layer, as they were
  before this step's batch updated them), from which rank 0 computes ``rank_divergence``.

For a layer with C channels, ranks r = 1..R, running moments mu_R^r, var_R^r and eps::

    m = mean_r mu_R^r,   s2 = mean_r var_R^r                     (per channel)
    rank_divergence = max over r, c of max( |mu_R^r - m| / sqrt(s2 + eps),
                                            |log((var_R^r + eps) / (s2 + eps))| )

the largest distance, over channels and ranks, of one rank's running mean from the mean over
ranks in running standard deviations, or of its running variance in abs(log ratio). It is 0 when
every rank holds the same running statistics, which DDP's default ``broadcast_buffers=True``
ensures at every forward (rank 0's buffers are copied to every rank before the forward).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bnprobe.stats import Moments, combine, mean_shift, var_shift
from bnprobe.store import Rows
from bnprobe.tap import Snapshot

RunningMoments = dict[str, tuple[np.ndarray, np.ndarray]]
"""layer -> (running mean, running variance) per channel, float64."""


def is_distributed() -> bool:
    """True inside an initialized ``torch.distributed`` process group of more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks.

    A collective: every rank of the default group must call it. Without a process group of more
    than one process it returns ``[obj]``.
    """
    if not is_distributed():
        return [obj]
    rank = torch.distributed.get_rank()
    out: list[Any] | None = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def running_moments(snapshot: Snapshot) -> RunningMoments:
    """Per-channel running mean and variance of each layer in a snapshot taken with
    ``keep_channels=True`` (layers without running statistics are left out)."""
    out: RunningMoments = {}
    for layer, per in snapshot.channels.items():
        if "running_mean" in per and "running_var" in per:
            mean = np.asarray(per["running_mean"], dtype=np.float64)
            var = np.asarray(per["running_var"], dtype=np.float64)
            out[layer] = (mean, var)
    return out


def rank_divergence(
    by_rank: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]], eps: Mapping[str, float]
) -> dict[str, float]:
    """``rank_divergence`` of each layer that every rank measured (see the module docstring).

    ``by_rank`` holds one mapping layer -> (running mean, running variance) per rank; ``eps`` the
    layers' eps. NaN when a running moment is not finite on some rank.
    """
    if len(by_rank) < 2:
        return {}
    common = [name for name in by_rank[0] if all(name in r for r in by_rank[1:])]
    out: dict[str, float] = {}
    for name in common:
        shapes = {r[name][0].shape for r in by_rank} | {r[name][1].shape for r in by_rank}
        if len(shapes) != 1:
            continue
        mu = np.stack([r[name][0] for r in by_rank]).astype(np.float64)
        var = np.stack([r[name][1] for r in by_rank]).astype(np.float64)
        e = float(eps.get(name, 1e-5))
        if not (np.isfinite(mu).all() and np.isfinite(var).all()):
            out[name] = math.nan
            continue
        with np.errstate(divide="ignore", invalid="ignore"):  # d and v against the rank means
            mean_gap = np.abs(mean_shift(mu, mu.mean(axis=0), var.mean(axis=0), e))
            var_gap = np.abs(var_shift(var, var.mean(axis=0), e))
        out[name] = float(max(np.nanmax(mean_gap, initial=0.0), np.nanmax(var_gap, initial=0.0)))
    return out


Warn = Callable[[str], None]

_OK, _NOTHING, _FAILED = 0, 1, 2
"""A rank's status at a gather: rows sent, nothing measured, or its rows could not be built."""


@dataclass(frozen=True)
class Layout:
    """What one rank's float64 vector means: a name per value, exchanged only when it changes.

    ``layers`` and ``metrics`` name the layer rows (channel NA) of stage ``train``, one entry
    per row; ``running`` the layers whose running mean and variance follow, with their channel
    counts. The vector is ``[values of the rows..., mu_R of running[0], var_R of running[0],
    ...]``."""

    layers: tuple[str, ...]
    metrics: tuple[str, ...]
    running: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return len(self.metrics) + 2 * sum(c for _, c in self.running)


@dataclass
class _Note:
    """What a rank sends with the object round (only when something in it is new): its layout,
    the cause of a failure, and the warnings it could not show (only rank 0 warns)."""

    layout: Layout | None = None
    cause: str | None = None
    messages: list[str] = field(default_factory=list)


class RankGather:
    """Brings one logging step's stage-``train`` layer rows of every rank to rank 0, as numbers.

    Every gather is the same collectives on every rank, failure or not:

    1. ``all_gather`` of a 4-number header per rank: status (rows / nothing / failed), the
       version of its layout, the length of its vector, whether it has a note to send;
    2. only when some header says so (a layout changed, a new cause of failure, a warning to
       pass on): ``gather_object`` of each rank's note (:class:`_Note`) to rank 0; every rank
       reads the same headers, so every rank takes part or none does;
    3. only when some rank has values: ``gather`` to rank 0 of one float64 tensor per rank
       (padded to the longest), laid out by that rank's :class:`Layout`.

    A rank whose rows cannot be built (``error``, or an exception while encoding them) sends
    status *failed* and, once per cause, the cause; rank 0 warns once per rank and cause,
    naming both. Rank 0 turns the vectors back into :class:`~bnprobe.store.Rows` (no pandas),
    so the other ranks' rows take the same fast path to the store and TensorBoard as its own.

    ``eps`` maps layer names to their eps (for :func:`rank_divergence`); ``warn`` is how rank 0
    reports what the other ranks sent (default: ``warnings.warn``).
    """

    def __init__(self, eps: Mapping[str, float], warn: Warn | None = None) -> None:
        self.eps = dict(eps)
        self.warn: Warn = warn or _warn
        self._layout: Layout | None = None  # this rank's, as last sent
        self._version = 0
        self._sent_causes: set[str] = set()
        self._outbox: list[str] = []
        self._layouts: dict[int, tuple[int, Layout]] = {}  # rank 0: rank -> (version, layout)
        self._said: dict[int, list[str]] = {}  # rank 0: what each rank said (warned once)

    def tell(self, message: str) -> None:
        """Pass a warning of this rank (not 0) to rank 0 with the next gather: ranks other than
        0 do not warn themselves."""
        if message not in self._outbox:
            self._outbox.append(message)

    def encode(self, snapshot: Snapshot) -> tuple[Layout, np.ndarray]:
        """This rank's layer rows of stage train and running moments as a layout and one float64
        vector."""
        parts = [p for p in snapshot.parts if p.channels is None and p.stage == "train"]
        layers = tuple(name for p in parts for name in p.layers)
        metric_names = tuple(name for p in parts for name in p.metrics)
        running = running_moments(snapshot)
        values = [np.asarray(p.values, dtype=np.float64).reshape(-1) for p in parts]
        for mean, var in running.values():
            values += [mean.reshape(-1), var.reshape(-1)]
        layout = Layout(layers, metric_names, tuple((k, m.size) for k, (m, _) in running.items()))
        vector = np.concatenate(values) if values else np.zeros(0)
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
        status, vector, cause = _NOTHING, np.zeros(0), error
        own: Layout | None = None
        if error is None and snapshot is not None:
            try:
                own, vector = self.encode(snapshot)
                status = _OK
            except Exception as err:  # never skip the collective: send "failed" instead
                cause = f"building its rows to send failed with {type(err).__name__}: {err}"
                vector = np.zeros(0)
        if cause is not None:
            status = _FAILED
        note = _Note(messages=self._outbox)
        if own is not None and own != self._layout:
            self._layout, self._version = own, self._version + 1
            note.layout = own
        if cause is not None and cause not in self._sent_causes:
            self._sent_causes.add(cause)
            note.cause = cause
        has_note = bool(note.layout is not None or note.cause is not None or note.messages)
        device = _device()
        header = torch.tensor(
            [status, self._version, len(vector), int(has_note)], dtype=torch.int64
        ).to(device)
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header)
        table = torch.stack(headers).cpu().tolist()
        notes: list[Any] | None = None
        if any(h[3] for h in table):
            notes = [None] * world if rank == 0 else None
            dist.gather_object(note if has_note else None, notes, dst=0)
            self._outbox = []
        longest = max(h[2] for h in table)
        vectors: list[torch.Tensor] | None = None
        if longest:
            padded = torch.zeros(longest, dtype=torch.float64)
            padded[: len(vector)] = torch.from_numpy(vector)
            padded = padded.to(device)
            vectors = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
            dist.gather(padded, vectors, dst=0)
        if rank != 0:
            return None
        try:
            return self._decode(table, notes, vectors, own, vector, step=step, epoch=epoch)
        except Exception as err:  # the collectives are done: only rank 0's table misses rows
            self.warn(
                f"BNProbe: reading the rows of the other ranks failed with "
                f"{type(err).__name__}: {err}. Rank 0's table misses them at this step; "
                "training goes on."
            )
            return []

    def _decode(
        self,
        table: list[list[int]],
        notes: list[Any] | None,
        vectors: list[torch.Tensor] | None,
        own: Layout | None,
        own_vector: np.ndarray,
        *,
        step: int,
        epoch: int,
    ) -> list[Rows]:
        out: list[Rows] = []
        running: list[RunningMoments] = []
        for r, (status, version, length, _) in enumerate(table):
            note = notes[r] if notes is not None else None
            if isinstance(note, _Note):
                if note.layout is not None:
                    self._layouts[r] = (version, note.layout)
                if r != 0:  # rank 0 warned itself
                    self._report(r, note, step)
            if r == 0:
                if status == _OK and own is not None:
                    running.append(_running(own, own_vector))
                continue
            if status != _OK or vectors is None:
                continue
            known = self._layouts.get(r)
            if known is None or known[0] != version or known[1].size != length:
                self.warn(
                    f"BNProbe: rank {r} sent values without the layout that names them; its "
                    "rows are left out of rank 0's table until it sends its layout again."
                )
                continue
            layout = known[1]
            values = vectors[r][:length].cpu().numpy()
            n = len(layout.metrics)
            out.append(Rows(step, epoch, "train", r, layout.layers, layout.metrics, values[:n]))
            running.append(_running(layout, values))
        if len(running) == len(table):
            divergence = rank_divergence(running, self.eps)
            if divergence:
                out.append(
                    Rows(
                        step,
                        epoch,
                        "train",
                        0,
                        list(divergence),
                        ["rank_divergence"] * len(divergence),
                        list(divergence.values()),
                    )
                )
        return out

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
        flag = torch.tensor([value], dtype=torch.int64).to(_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return int(flag.item())


def _running(layout: Layout, values: np.ndarray) -> RunningMoments:
    out: RunningMoments = {}
    at = len(layout.metrics)
    for name, c in layout.running:
        out[name] = (values[at : at + c], values[at + c : at + 2 * c])
        at += 2 * c
    return out


def _device() -> torch.device:
    """Where this group's collectives want their tensors (NCCL: the current CUDA device)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


__all__ = [
    "Layout",
    "RankGather",
    "gather_to_rank_zero",
    "global_rank",
    "is_distributed",
    "rank_divergence",
    "running_moments",
]


def pool_moments_across_ranks(
    names: Sequence[str],
    moments: Mapping[str, Moments],
    channels: Mapping[str, int],
    error: str | None = None,
) -> dict[str, Moments]:
    """Every rank's per-channel ``(n, mean, M2)``, pooled exactly: the same moments on all ranks.

    A collective: every rank of the default group must call it, also a rank whose own pass
    failed (``error``); then every rank raises, naming the ranks that failed, instead of the
    others waiting for the process-group timeout. Each rank sends one float64 vector laid out by
    ``names`` (``[failed, n, mean[C], M2[C]]`` per layer; zeros for a layer it never ran),
    gathers all of them, and pools them in rank order with Chan's formula
    (:func:`bnprobe.stats.combine`), so every rank computes bit-identical moments, equal up to
    float64 rounding to one process pooling the union of the shards.
    """
    dist = torch.distributed
    parts = [torch.tensor([1.0 if error else 0.0], dtype=torch.float64)]
    for name in names:
        c = channels[name]
        m = moments.get(name)
        if m is None or error:
            parts.append(torch.zeros(1 + 2 * c, dtype=torch.float64))
            continue
        parts += [
            torch.tensor([m.n], dtype=torch.float64),
            m.mean.detach().to("cpu", torch.float64).reshape(c),
            (m.var.detach().to("cpu", torch.float64) * m.n).reshape(c),
        ]
    local = torch.cat(parts)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    gathered = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.to(device))
    vectors = [g.cpu() for g in gathered]
    failed = [r for r, vec in enumerate(vectors) if vec[0].item() != 0.0]
    if failed:
        raise RuntimeError(
            f"recalibrate failed on rank(s) {failed}"
            + (f" (this rank: {error})" if error else "")
            + "; no rank wrote its running statistics"
        )
    pooled: dict[str, Moments] = {}
    offset = 1
    for name in names:
        c = channels[name]
        for vec in vectors:
            n = float(vec[offset].item())
            if n > 0:
                mean = vec[offset + 1 : offset + 1 + c]
                m2 = vec[offset + 1 + c : offset + 1 + 2 * c]
                part = Moments(mean, m2 / n, n)
                pooled[name] = part if name not in pooled else combine(pooled[name], part)
        offset += 1 + 2 * c
    return pooled
