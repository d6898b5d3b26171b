"""Pure tensor maths: BatchNorm moments and how far batch statistics are from running statistics.

Notation (per channel c of a BN layer with ``eps``): batch moments ``mu_B``, ``var_B`` (biased:
what BN normalizes with), running moments ``mu_R``, ``var_R`` as they were before this batch
updated them (what eval mode would use at that moment), and

    d = (mu_B - mu_R) / sqrt(var_R + eps)            # mean shift, in running standard deviations
    v = log((var_B + eps) / (var_R + eps))           # log variance ratio
    KL(N(mu_B, var_B + eps) || N(mu_R, var_R + eps)) = (exp(v) + d**2 - 1 - v) / 2

The tensor functions work on any device, never sync with the host, and return float64 tensors
so that O(channels) arithmetic adds no error of its own. :func:`segment_metrics` is the host side:
the tap moves each layer's raw per-channel vectors to the host once per logging step and derives
every metric there in float64 numpy, where one call on a few hundred channels costs about a
microsecond instead of a torch op's several (or a kernel launch on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

OUTLIER_MEAN_SHIFT = 5.0
"""Batch Renormalization's clip bound ``d_max`` on abs(d) (Ioffe, 2017)."""
OUTLIER_LOG_VAR_RATIO = 2.0 * math.log(3.0)
"""abs(v) above this is a standard deviation ratio outside Batch Renorm's ``[1/r_max, r_max]``,
``r_max = 3``: the variance ratio lies outside ``[1/9, 9]``."""
SMALL_GAMMA = 0.01
"""``gamma_small_frac`` counts channels with abs(gamma) below this fraction of max abs(gamma)."""
MIN_RECOVERY_FACTOR = 0.05
"""Recover batch moments from the running-stat update only when the update factor is at least
this; below it the float32 rounding of the buffers, amplified by 1/factor, costs more than 1e-5
in the mean shift, and the moments are computed directly from the input instead."""


class Moments(NamedTuple):
    """Per-channel moments of a batch: mean, biased variance, and elements per channel."""

    mean: Tensor
    var: Tensor
    n: float


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension of a BN input but the channel dimension (dim 1)."""
    return [0, *range(2, x.dim())]


def raw_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` in float32 (float64 for float64 input), one kernel."""
    if x.dim() < 2:
        raise ValueError(f"a BatchNorm input needs a channel dimension; got shape {tuple(x.shape)}")
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(xf, dim=reduce_dims(x), correction=0)
    return mean, var


def batch_moments(x: Tensor) -> Moments:
    """Mean and biased variance per channel (dim 1) over every other dimension, as float64.

    Half-precision inputs are upcast to float32, so moments are never computed in 16 bits.
    """
    mean, var = raw_moments(x)
    n = x.numel() / x.shape[1] if x.shape[1] else 0.0
    return Moments(mean.double(), var.double(), float(n))


def recover_moments(
    mean_old: np.ndarray,
    var_old: np.ndarray,
    mean_new: np.ndarray,
    var_new: np.ndarray,
    factor: float | np.ndarray,
    count: float | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch moments ``(mu_B, biased var_B)`` recovered exactly from one running-stat update.

    BN updates ``mu_R <- (1-f) mu_R + f mu_B`` and ``var_R <- (1-f) var_R + f var_B_unbiased``
    with ``f = momentum`` (or ``1/num_batches_tracked`` when momentum is None), so

        mu_B = mu_R_old + (mu_R_new - mu_R_old) / f
        var_B = (var_R_new - (1-f) var_R_old) / f * (n-1)/n     # back to the biased variance

    ``factor`` and ``count`` (elements per channel, n) are scalars or per-channel arrays; where
    n <= 1 the variance is left unbiased. The error is the float32 rounding of the new buffers
    times 1/f: about 1e-6 relative for f=0.1.
    """
    count = np.asarray(count, dtype=np.float64)
    bessel = np.where(count > 1, (count - 1.0) / np.maximum(count, 1.0), 1.0)
    with np.errstate(all="ignore"):
        mean = mean_old + (mean_new - mean_old) / factor
        var = (var_new - (1.0 - factor) * var_old) / factor * bessel
    return mean, var


def shifts(batch: Moments, mu_r: Tensor, var_r: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel ``d`` and ``v`` (module docstring)."""
    mu_r, var_r = mu_r.double(), var_r.double()
    d = (batch.mean - mu_r) / torch.sqrt(var_r + eps)
    v = torch.log((batch.var + eps) / (var_r + eps))
    return d, v


def combine(a: Moments, b: Moments) -> Moments:
    """Pool two sets of per-channel moments (Chan et al.): exact population mean and variance."""
    n = a.n + b.n
    if n == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.var * a.n + b.var * b.n + delta * delta * (a.n * b.n / n)
    return Moments(mean, m2 / n, n)


# --------------------------------------------------------------------------- host side (numpy)

SMALL_VAR_EPS_FACTOR = 10.0
"""``var_small_frac`` counts channels whose batch variance is below this many times ``eps``: BN
then divides by about sqrt(eps) and mostly amplifies noise (collapsed or zeroed channels)."""


@dataclass
class Segments:
    """Per-channel float64 vectors of several layers, concatenated; ``channels[i]`` values each.

    ``mu_r``/``var_r`` are NaN for layers without running statistics and ``gamma``, ``beta``,
    ``gamma0``, ``beta0`` NaN for layers without affine parameters; those layers simply get no
    such metric. ``eps`` is repeated per channel.
    """

    channels: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    mu_r: np.ndarray
    var_r: np.ndarray
    eps: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    gamma0: np.ndarray
    beta0: np.ndarray


_MEANS = (
    "batch_mean",
    "batch_var",
    "running_mean",
    "running_var",
    "mean_shift",
    "var_shift",
    "kl",
    "outlier_frac",
    "var_small_frac",
    "gamma_mean",
    "beta_mean",
)
"""The metrics that are channel means, in the order :func:`segment_metrics` sums them."""


def segment_metrics(seg: Segments) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every stage-train metric of many layers at once, from their concatenated channels.

    Returns ``{metric: one value per layer}`` (a layer row is the channel mean of the per-channel
    quantity, or its max for ``*_max``; module docstring for d, v and KL) and the concatenated
    per-channel vectors ``d``, ``v``, ``kl`` (d and v signed). The per-layer sums and maxima of
    all quantities take three numpy calls for all layers (``ufunc.reduceat`` over stacked
    rows), so the cost hardly grows with the number of layers or metrics. Division by zero
    gives inf/NaN, never a warning, as in torch; NaN propagates into means and maxima.
    """
    c = seg.channels.astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(seg.channels)[:-1]])

    def totals(*xs: np.ndarray) -> np.ndarray:  # one row of per-layer sums per argument
        return np.add.reduceat(np.stack(xs, dtype=np.float64), starts, axis=1)

    def each(x: np.ndarray) -> np.ndarray:  # one value per layer -> one per channel
        return np.repeat(x, seg.channels)

    with np.errstate(all="ignore"):
        d = (seg.mean - seg.mu_r) / np.sqrt(seg.var_r + seg.eps)
        v = np.log((seg.var + seg.eps) / (seg.var_r + seg.eps))
        kl = 0.5 * (np.exp(v) + d * d - 1.0 - v)
        ad, av = np.abs(d), np.abs(v)
        g, b = seg.gamma, seg.beta
        ag = np.abs(g)
        outlier = (ad > OUTLIER_MEAN_SHIFT) | (av > OUTLIER_LOG_VAR_RATIO)
        nonfinite = ~(np.isfinite(seg.mean) & np.isfinite(seg.var))
        small = seg.var < SMALL_VAR_EPS_FACTOR * seg.eps
        sums = totals(seg.mean, seg.var, seg.mu_r, seg.var_r, ad, av, kl, outlier, small, g, b)
        out: dict[str, np.ndarray] = dict(zip(_MEANS, sums / c, strict=True))
        peaks = np.maximum.reduceat(np.stack([ad, av, kl, ag]), starts, axis=1)
        out |= dict(zip(("mean_shift_max", "var_shift_max", "kl_max"), peaks[:3], strict=True))
        gamma_mean, beta_mean = out["gamma_mean"], out["beta_mean"]
        spread_g, spread_b, drift_g, drift_b, ref_g, small_g, bad = totals(
            (g - each(gamma_mean)) ** 2,
            (b - each(beta_mean)) ** 2,
            (g - seg.gamma0) ** 2,
            (b - seg.beta0) ** 2,
            seg.gamma0**2,
            ag < SMALL_GAMMA * each(peaks[3]),
            nonfinite,
        )
        bessel = np.where(c > 1, c - 1.0, np.nan)
        out["nonfinite"] = bad
        out["gamma_std"] = np.sqrt(spread_g / bessel)
        out["beta_std"] = np.sqrt(spread_b / bessel)
        out["gamma_drift"] = np.sqrt(drift_g / ref_g)
        out["beta_drift"] = np.sqrt(drift_b / c)
        out["gamma_small_frac"] = small_g / c
    return out, {"d": d, "v": v, "kl": kl}
