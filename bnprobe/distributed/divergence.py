"""Rank divergence: how far the running statistics of the ranks are apart.

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

import numpy as np

from bnprobe.stats import mean_shift, var_shift
from bnprobe.tap import Snapshot

RunningMoments = dict[str, tuple[np.ndarray, np.ndarray]]
"""layer -> (running mean, running variance) per channel, float64."""


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
    names: list[str] = []
    for name in common:
        shapes = {r[name][0].shape for r in by_rank} | {r[name][1].shape for r in by_rank}
        if len(shapes) == 1 and by_rank[0][name][0].ndim == 1:
            names.append(name)
    if not names:
        return {}
    mu = np.stack([np.concatenate([r[name][0] for name in names]) for r in by_rank])
    var = np.stack([np.concatenate([r[name][1] for name in names]) for r in by_rank])
    counts = np.array([by_rank[0][name][0].size for name in names], dtype=np.int64)
    eps_values = np.array([float(eps.get(name, 1e-5)) for name in names])
    return dict(zip(names, layer_divergences(mu, var, counts, eps_values).tolist(), strict=True))


def layer_divergences(
    mu: np.ndarray, var: np.ndarray, counts: np.ndarray, eps: np.ndarray
) -> np.ndarray:
    """:func:`rank_divergence` of every layer at once: ``mu``, ``var`` are (ranks, channels of
    all layers, in layer order), ``counts`` each layer's channels, ``eps`` each layer's eps.
    The same arithmetic per channel as one layer at a time, so the same values."""
    mu = mu.astype(np.float64, copy=False)
    var = var.astype(np.float64, copy=False)
    mu_mean, var_mean = mu.mean(axis=0), var.mean(axis=0)
    if _at_their_means(mu, var, mu_mean, var_mean):
        return np.zeros(len(counts))  # what the formula gives there, without its logarithms
    e = np.repeat(eps, counts)
    with np.errstate(divide="ignore", invalid="ignore"):  # d and v against the rank means
        mean_gap = np.abs(mean_shift(mu, mu_mean, var_mean, e))
        var_gap = np.abs(var_shift(var, var_mean, e))
    gap = np.fmax.reduce(np.fmax(mean_gap, var_gap), axis=0)  # NaN gaps (0/0) ignored
    gap = np.where(np.isnan(gap), 0.0, gap)
    finite = np.isfinite(mu).all(axis=0) & np.isfinite(var).all(axis=0)
    out = np.zeros(len(counts))
    nonempty = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    if len(starts):
        out[nonempty] = np.maximum.reduceat(gap, starts)
        ok = np.logical_and.reduceat(finite, starts)
        out[np.flatnonzero(nonempty)[~ok]] = math.nan
    return out


def _at_their_means(
    mu: np.ndarray, var: np.ndarray, mu_mean: np.ndarray, var_mean: np.ndarray
) -> bool:
    """Whether every rank's running moments equal, exactly, their means over ranks, all finite
    (DDP's default ``broadcast_buffers=True``: the ranks hold the same buffers): then every
    channel's distance is ``0 / sqrt(.)`` and ``log(1)`` (or 0/0, which the formula ignores),
    so every layer's ``rank_divergence`` is exactly 0.0, as the full formula computes it."""
    if not (np.array_equal(mu, np.broadcast_to(mu_mean, mu.shape))):
        return False
    if not np.array_equal(var, np.broadcast_to(var_mean, var.shape)):
        return False
    return bool(np.isfinite(mu_mean).all() and np.isfinite(var_mean).all())
