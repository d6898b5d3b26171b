"""Pure tensor maths: BatchNorm moments and how far batch statistics are from running statistics.

Notation (per channel c of a BN layer with ``eps``): batch moments ``mu_B``, ``var_B`` (biased:
what BN normalizes with), running moments ``mu_R``, ``var_R`` as they were before this batch
updated them (what eval mode would use at that moment), and

    d = (mu_B - mu_R) / sqrt(var_R + eps)            # mean shift, in running standard deviations
    v = log((var_B + eps) / (var_R + eps))           # log variance ratio
    KL(N(mu_B, var_B + eps) || N(mu_R, var_R + eps)) = (exp(v) + d**2 - 1 - v) / 2

All functions work on any device, never sync with the host, and return float64 tensors so that
O(channels) arithmetic adds no error of its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


def batch_moments(x: Tensor) -> Moments:
    """Mean and biased variance per channel (dim 1) over every other dimension.

    Half-precision inputs are upcast to float32, so moments are never computed in 16 bits.
    """
    if x.dim() < 2:
        raise ValueError(f"a BatchNorm input needs a channel dimension; got shape {tuple(x.shape)}")
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(xf, dim=reduce_dims(x), correction=0)
    n = x.numel() / x.shape[1] if x.shape[1] else 0.0
    return Moments(mean.double(), var.double(), float(n))


def recover_moments(
    mean_old: Tensor,
    var_old: Tensor,
    mean_new: Tensor,
    var_new: Tensor,
    factor: float,
    count: float,
) -> Moments:
    """Batch moments recovered exactly from one running-statistics update.

    BN updates ``mu_R <- (1-f) mu_R + f mu_B`` and ``var_R <- (1-f) var_R + f var_B_unbiased``
    with ``f = momentum`` (or ``1/num_batches_tracked`` when momentum is None), so

        mu_B = mu_R_old + (mu_R_new - mu_R_old) / f
        var_B = (var_R_new - (1-f) var_R_old) / f * (n-1)/n     # back to the biased variance

    The error is the float32 rounding of the new buffers times 1/f: about 1e-6 relative for f=0.1.
    """
    f = float(factor)
    mo, vo = mean_old.double(), var_old.double()
    mean = mo + (mean_new.double() - mo) / f
    var_unbiased = (var_new.double() - (1.0 - f) * vo) / f
    var = var_unbiased * ((count - 1.0) / count) if count > 1 else var_unbiased
    return Moments(mean, var, count)


def shifts(batch: Moments, mu_r: Tensor, var_r: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel ``d`` and ``v`` (module docstring)."""
    mu_r, var_r = mu_r.double(), var_r.double()
    d = (batch.mean - mu_r) / torch.sqrt(var_r + eps)
    v = torch.log((batch.var + eps) / (var_r + eps))
    return d, v


def gaussian_kl(d: Tensor, v: Tensor) -> Tensor:
    """KL(N(mu_B, var_B+eps) || N(mu_R, var_R+eps)) per channel, from ``d`` and ``v``."""
    return 0.5 * (torch.exp(v) + d * d - 1.0 - v)


def nonfinite_channels(batch: Moments) -> Tensor:
    """Number of channels whose batch mean or variance is NaN or infinite (a 0-d tensor)."""
    bad = ~(torch.isfinite(batch.mean) & torch.isfinite(batch.var))
    return bad.sum().double()


def combine(a: Moments, b: Moments) -> Moments:
    """Pool two sets of per-channel moments (Chan et al.): exact population mean and variance."""
    n = a.n + b.n
    if n == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.var * a.n + b.var * b.n + delta * delta * (a.n * b.n / n)
    return Moments(mean, m2 / n, n)


def std(x: Tensor) -> Tensor:
    """Standard deviation over channels with Bessel's correction (torch's and pandas' default)."""
    return (
        x.std() if x.numel() > 1 else torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    )
