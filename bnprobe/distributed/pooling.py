"""Pooling per-channel moments across ranks exactly (:func:`bnprobe.recalibrate` under DDP)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bnprobe.stats import Moments, combine


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
