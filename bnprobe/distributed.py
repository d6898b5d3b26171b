"""Several processes (DDP): gather every rank's train rows to rank 0 and measure rank divergence.

Uses ``torch.distributed`` only (no Lightning). Under DDP every rank runs its own probe; at each
logging step every rank calls :meth:`RankGather.gather` (a collective: it must be called by all
ranks, at the same steps, whatever happened inside the probe on any of them), which sends one
small pickled payload per rank to rank 0:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from bnprobe.stats import Moments, combine, mean_shift, var_shift
from bnprobe.store import make_rows
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


@dataclass
class _Payload:
    rank: int
    rows: pd.DataFrame
    running: RunningMoments = field(default_factory=dict)


class RankGather:
    """Brings one logging step's stage-``train`` rows of every rank to rank 0.

    ``eps`` maps layer names to their eps (for :func:`rank_divergence`).
    """

    def __init__(self, eps: Mapping[str, float]) -> None:
        self.eps = dict(eps)

    def gather(self, snapshot: Snapshot | None, *, step: int, epoch: int) -> pd.DataFrame | None:
        """Collective: call it on every rank at the same steps, with ``snapshot=None`` where
        this rank measured nothing. Returns on rank 0 the rows of the other ranks (layer
        aggregates, their real ``rank``) and one ``rank_divergence`` row per layer (rank 0);
        None on the other ranks. A payload that cannot be built is replaced by None, so this
        rank still takes part in the collective."""
        rank = global_rank()
        payload: _Payload | None = None
        if snapshot is not None:
            try:
                rows = snapshot.rows
                rows = rows[rows["channel"].isna().to_numpy()].reset_index(drop=True)
                payload = _Payload(rank, rows, running_moments(snapshot))
            except Exception:  # never skip the collective: send nothing instead
                payload = None
        gathered = gather_to_rank_zero(payload)
        if gathered is None:
            return None
        frames = [p.rows for p in gathered if isinstance(p, _Payload) and p.rank != rank]
        running = [p.running for p in gathered if isinstance(p, _Payload)]
        divergence = rank_divergence(running, self.eps) if len(running) == len(gathered) else {}
        if divergence:
            frames.append(
                make_rows(
                    step=step,
                    epoch=epoch,
                    stage="train",
                    rank=rank,
                    layers=list(divergence),
                    metrics=["rank_divergence"] * len(divergence),
                    values=list(divergence.values()),
                )
            )
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True)


__all__ = [
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
