"""Pure maths (torch and numpy): BatchNorm moments and how far batch statistics are from running
statistics. The names and meanings of the metrics are in :mod:`bnprobe.metrics`; this module
computes them and imports nothing else from bnprobe.

Notation (per channel c of a BN layer with ``eps``): batch moments ``mu_B``, ``var_B`` (biased:
what BN normalizes with), running moments ``mu_R``, ``var_R`` as they were before this batch
updated them (what eval mode would use at that moment), and

    d = (mu_B - mu_R) / sqrt(var_R + eps)            # mean shift, in running standard deviations
    v = log((var_B + eps) / (var_R + eps))           # log variance ratio
    KL(N(mu_B, var_B + eps) || N(mu_R, var_R + eps)) = (exp(v) + d**2 - 1 - v) / 2

each written once (:func:`mean_shift`, :func:`var_shift`, :func:`kl_divergence`) for torch
tensors and numpy arrays alike; every caller (the tap, recalibration, rank divergence, the
diagnosis) uses them.

The tensor functions work on any device, never sync with the host, and return float64 tensors
so that O(channels) arithmetic adds no error of its own. :func:`segment_metrics` is the host side:
the tap moves each layer's raw per-channel vectors to the host once per logging step and derives
every metric there in float64 numpy, where one call on a few hundred channels costs about a
microsecond instead of a torch op's several (or a kernel launch on a GPU).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

Array = TypeVar("Array", "Tensor", np.ndarray)
"""A torch tensor or a numpy array: :func:`mean_shift`, :func:`var_shift` and
:func:`kl_divergence` serve both (torch for tensors, numpy for anything else). torch is
imported only by the functions that take tensors, so the numpy callers (the diagnosis, which
reads a saved table) never load it."""

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
    import torch

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
    *,
    bessel: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch moments ``(mu_B, biased var_B)`` recovered from one running-stat update.

    BN updates ``mu_R <- (1-f) mu_R + f mu_B`` and ``var_R <- (1-f) var_R + f var_B_unbiased``
    with ``f = momentum`` (or ``1/num_batches_tracked`` when momentum is None), so

        mu_B = mu_R_old + (mu_R_new - mu_R_old) / f
        var_B = (var_R_new - (1-f) var_R_old) / f * (n-1)/n     # back to the biased variance

    ``factor`` and ``count`` (elements per channel, n) are scalars or per-channel arrays; where
    n <= 1 the variance is left unbiased. The buffers are float32: their rounding, amplified by
    1/f, is the error (:func:`recovery_bounds`). A variance within its bound of 0 (or below 0)
    is returned as exactly 0: the update cannot tell it from 0, and 0 is what a dead or
    constant channel has. Direct moments pass through unchanged with ``f = n = 1`` and zero old
    buffers (their bound, 4 ulp of var_B, is never above a positive var_B). ``bessel``:
    :func:`bessel` of ``count``, where the caller keeps it.
    """
    if bessel is None:
        bessel = _bessel(count)
    with np.errstate(all="ignore"):
        mean = mean_old + (mean_new - mean_old) / factor
        var = (var_new - (1.0 - factor) * var_old) / factor * bessel
        bound = ULPS * _ulp32(np.maximum(np.abs(var_old), np.abs(var_new))) / factor * bessel
        var = np.where(var <= bound, 0.0, var)  # NaN stays NaN
    return mean, var


def bessel(count: float | np.ndarray) -> np.ndarray:
    """``(n-1)/n`` for n > 1, else 1: from the unbiased variance back to the biased one."""
    count = np.asarray(count, dtype=np.float64)
    out: np.ndarray = np.where(count > 1, (count - 1.0) / np.maximum(count, 1.0), 1.0)
    return out


_bessel = bessel


def _ulp32(x: np.ndarray) -> np.ndarray:
    """The spacing of float32 numbers at x >= 0 (given in float64; the callers' maxima of
    absolute values), the caller silencing numpy's warnings (x beyond float32 gives inf)."""
    out: np.ndarray = np.spacing(x.astype(np.float32)).astype(np.float64)
    return out


ULPS = 4.0
"""The error of a new running buffer, in float32 ulps, that :func:`recovery_bounds` allows:
rounding to float32 (half an ulp), the device's float32 arithmetic of the update and of
``1 - f`` (about an ulp), and the batch variance's own float32 computation inside BN; the
largest seen on real CPU updates (tests/test_tap.py) was 2.2."""

RECOVERY_VAR_RTOL = 1e-4
"""A layer's recovered var_B must be within this fraction of var_B in every channel ..."""
RECOVERY_MEAN_TOL = 2e-5
"""... and its mu_B within this many batch standard deviations; otherwise the tap computes the
layer's moments directly at its next measured step (:func:`recovery_ill_conditioned`)."""


def recovery_bounds(
    mean_old: np.ndarray,
    var_old: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    factor: float | np.ndarray,
    count: float | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Worst-case error of recovered ``(mu_B, var_B)`` for a channel with these moments.

    The update stores ``mu_R_new`` and ``var_R_new`` in float32: rounding to the nearest
    (half an ulp), plus the float32 rounding of ``f`` and of the products where the device
    computes the update in float32, plus BN's own float32 batch moments (``ULPS`` = 4 in
    all). The recovery divides that by f, so

        err(mu_B)  <= 4 ulp(max(|mu_R_old|, |mu_R_new|)) / f
        err(var_B) <= 4 ulp(max(var_R_old, var_R_new)) / f * (n-1)/n

    with ulp the float32 spacing; the new buffers are predicted from the old ones and the
    batch moments, so the bound is known for a layer measured directly too.
    """
    bessel = _bessel(count)
    with np.errstate(all="ignore"):
        return _recovery_bounds(mean_old, var_old, mean, var, factor, bessel)


def _recovery_bounds(
    mean_old: np.ndarray,
    var_old: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    factor: float | np.ndarray,
    bessel: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`recovery_bounds` with ``(n-1)/n`` given, the caller silencing numpy's warnings."""
    keep = 1.0 - factor
    mean_new = keep * mean_old + factor * mean
    var_new = keep * var_old + factor * var / bessel
    err_mean = ULPS * _ulp32(np.maximum(np.abs(mean_old), np.abs(mean_new))) / factor
    err_var = ULPS * _ulp32(np.maximum(np.abs(var_old), np.abs(var_new))) / factor * bessel
    return err_mean, err_var


def recovery_ill_conditioned(
    mean_old: np.ndarray,
    var_old: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    factor: float | np.ndarray,
    count: float | np.ndarray,
    *,
    bessel: np.ndarray | None = None,
) -> np.ndarray:
    """Per channel: recovering these moments would not be accurate to ``RECOVERY_VAR_RTOL``
    (relative, var_B) and ``RECOVERY_MEAN_TOL`` (batch standard deviations, mu_B). Dead
    channels (var_B = 0) always are. ``bessel``: :func:`bessel` of ``count``, where the caller
    keeps it."""
    if bessel is None:
        bessel = _bessel(count)
    with np.errstate(all="ignore"):
        err_mean, err_var = _recovery_bounds(mean_old, var_old, mean, var, factor, bessel)
        ok = (err_var <= RECOVERY_VAR_RTOL * var) & (err_mean <= RECOVERY_MEAN_TOL * np.sqrt(var))
    ill: np.ndarray = ~ok
    return ill


def recovered_ill_conditioned(
    values: np.ndarray,
    factor: np.ndarray,
    keep: np.ndarray,
    bessel: np.ndarray,
    bound_factor: np.ndarray,
    bound_keep: np.ndarray,
    bound_bessel: np.ndarray,
) -> np.ndarray:
    """Per channel: :func:`recovery_ill_conditioned` of the moments :func:`recover_moments`
    gives, in one pass with fewer numpy calls (rows stacked where a formula repeats), the same
    arithmetic in the same order, so the same answer bit for bit. ``values``: rows mean_old,
    var_old, mean_new, var_new (the update) and mu_R, var_R (what the forward started from);
    ``keep``/``bound_keep``: ``1 - factor``/``1 - bound_factor``, kept by the caller. What the
    tap runs at every measured step (it decides whether the next one recovers a layer's
    moments); the caller silences nothing: numpy's warnings are off here."""
    mean_old, var_old, mean_new, var_new = values[0], values[1], values[2], values[3]
    with np.errstate(all="ignore"):
        # recover_moments
        mean = mean_old + (mean_new - mean_old) / factor
        var = (var_new - keep * var_old) / factor * bessel
        both = np.abs(values[1:4:2])
        bound = ULPS * _ulp32(np.maximum(both[0], both[1])) / factor * bessel
        np.copyto(var, 0.0, where=var <= bound)  # var is this function's own array
        # _recovery_bounds against mu_R, var_R: rows (mean, var) together
        scaled = np.stack((mean, var))
        scaled *= bound_factor
        scaled[1] /= bound_bessel
        new = bound_keep * values[4:6] + scaled  # mean_new, var_new
        peak = np.abs(values[4:6])
        np.maximum(peak, np.abs(new), out=peak)
        err = ULPS * _ulp32(peak)
        err /= bound_factor
        err[1] *= bound_bessel  # err_mean, err_var
        ok = (err[1] <= RECOVERY_VAR_RTOL * var) & (err[0] <= RECOVERY_MEAN_TOL * np.sqrt(var))
    ill: np.ndarray = ~ok
    return ill


def _xp(x: object) -> Any:
    """The namespace whose ``sqrt``, ``log`` and ``exp`` fit ``x``: torch or numpy. Each
    caller keeps its own library's functions, so a value is bit for bit what it was when the
    formula was written out in torch or in numpy."""
    torch = sys.modules.get("torch")  # x cannot be a tensor if torch was never imported
    return torch if torch is not None and isinstance(x, torch.Tensor) else np


def mean_shift(mean: Array, mu_r: Array, var_r: Array, eps: float | Array) -> Array:
    """``d = (mu_B - mu_R) / sqrt(var_R + eps)``, elementwise and signed: how far the batch mean
    is from the running mean, in running standard deviations. Tensors or numpy arrays (numpy
    callers silence division warnings with ``np.errstate`` themselves)."""
    d: Array = (mean - mu_r) / _xp(mean).sqrt(var_r + eps)
    return d


def var_shift(var: Array, var_r: Array, eps: float | Array) -> Array:
    """``v = log((var_B + eps) / (var_R + eps))``, elementwise and signed: the log ratio of the
    batch variance to the running one (0: equal). Tensors or numpy arrays."""
    v: Array = _xp(var).log((var + eps) / (var_r + eps))
    return v


def kl_divergence(d: Array, v: Array) -> Array:
    """``KL(N(mu_B, var_B + eps) || N(mu_R, var_R + eps)) = (exp(v) + d**2 - 1 - v) / 2`` from
    :func:`mean_shift` ``d`` and :func:`var_shift` ``v``. Tensors or numpy arrays."""
    kl: Array = 0.5 * (_xp(v).exp(v) + d * d - 1.0 - v)
    return kl


def shifts(batch: Moments, mu_r: Tensor, var_r: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel ``d`` and ``v`` (module docstring) of float64 batch moments."""
    mu_r, var_r = mu_r.double(), var_r.double()
    return mean_shift(batch.mean, mu_r, var_r, eps), var_shift(batch.var, var_r, eps)


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
    running: np.ndarray | None = None
    """bool per channel: the layer has running statistics (None: every layer has)."""
    mean0: np.ndarray | None = None
    """The initial running mean / variance (the warm-up reference) and ``num_batches_tracked``
    then (``n0``) and now, before this batch's update (``n``); NaN where unknown."""
    var0: np.ndarray | None = None
    n0: np.ndarray | None = None
    n: np.ndarray | None = None
    momentum: np.ndarray | None = None
    """The layer's momentum per channel; negative for ``momentum=None`` (cumulative average)."""
    ill_conditioned: np.ndarray | None = None
    """Per layer: recovering its moments from the update is (or would be) inaccurate."""
    per_layer_counts: bool = False
    """``n``, ``n0`` and ``momentum`` are given and the same in every channel of a layer (as
    the tap packs them): the warm-up residual is computed once per layer."""


WARMUP_LEARNED_MIN = 1e-6
"""Below this 1 - r (nothing of the running statistics comes from data yet) the excess shifts
are 0."""


def warmup_residual(n: np.ndarray, n0: np.ndarray, momentum: np.ndarray) -> np.ndarray:
    """r: the fraction of the initial running statistics still in them after ``n - n0``
    updates: (1-m)**(n-n0) for momentum m, and for ``momentum=None`` (negative here; a
    cumulative average) 1 when n == n0 else 0. Unknown n or n0 (NaN) gives 0."""
    with np.errstate(all="ignore"):
        return _warmup_residual(n, n0, momentum)


def _warmup_residual(n: np.ndarray, n0: np.ndarray, momentum: np.ndarray) -> np.ndarray:
    """:func:`warmup_residual`, the caller silencing numpy's warnings."""
    steps = np.maximum(n - n0, 0.0)
    r = np.where(momentum < 0, steps == 0, (1.0 - momentum) ** steps)  # bool -> 1.0 or 0.0
    out: np.ndarray = np.where(np.isfinite(r), r.clip(0.0, 1.0), 0.0)
    return out


def excess_shifts(
    mean: np.ndarray,
    var: np.ndarray,
    mu_r: np.ndarray,
    var_r: np.ndarray,
    eps: np.ndarray | float,
    r: np.ndarray,
    mean0: np.ndarray,
    var0: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Signed d* and v*: d and v against warm-up-corrected running statistics

        mu_R* = (mu_R - r mu_0) / (1 - r),   var_R* = max((var_R - r var_0) / (1 - r), 0)

    (Adam-style bias correction: what the running statistics have learned from data, with the
    initial buffers' share r taken out). 0 where 1 - r < ``WARMUP_LEARNED_MIN``.
    """
    with np.errstate(all="ignore"):
        mu_s, var_s, learned = _corrected(mu_r, var_r, r, mean0, var0)
        d = np.where(learned, mean_shift(mean, mu_s, var_s, eps), 0.0)
        v = np.where(learned, var_shift(var, var_s, eps), 0.0)
    return d, v


def _corrected(
    mu_r: np.ndarray, var_r: np.ndarray, r: np.ndarray, mean0: np.ndarray, var0: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The warm-up-corrected ``mu_R*``, ``var_R*`` of :func:`excess_shifts` and where 1 - r is
    at least ``WARMUP_LEARNED_MIN`` (the caller silencing numpy's warnings)."""
    one = 1.0 - r
    warm = r > 0
    mu_s = np.where(warm, (mu_r - r * mean0) / one, mu_r)
    var_s = np.where(warm, np.maximum((var_r - r * var0) / one, 0.0), var_r)
    learned: np.ndarray = one >= WARMUP_LEARNED_MIN
    return mu_s, var_s, learned


class _Layout(NamedTuple):
    """What :func:`segment_metrics` needs of a concatenation's layer sizes alone: the same at
    every step of a run (cached, read-only)."""

    c: np.ndarray  # channels per layer, float64
    starts: np.ndarray  # each layer's first channel
    bessel: np.ndarray  # C - 1, at least 1
    nan: np.ndarray  # per channel: defaults of the optional fields
    ones: np.ndarray
    momentum: np.ndarray


_LAYOUTS: dict[tuple[int, str, bytes], _Layout] = {}


def _layout(channels: np.ndarray, size: int) -> _Layout:
    key = (size, channels.dtype.str, channels.tobytes())
    found = _LAYOUTS.get(key)
    if found is None:
        if len(_LAYOUTS) >= 16:
            _LAYOUTS.clear()
        c = channels.astype(np.float64)
        found = _LAYOUTS[key] = _Layout(
            c,
            np.concatenate([[0], np.cumsum(channels)[:-1]]),
            np.maximum(c - 1.0, 1.0),  # one channel: std 0
            np.full(size, np.nan),
            np.ones(size, dtype=bool),
            np.full(size, 0.1),
        )
        for array in found:
            array.setflags(write=False)
    return found


def segment_metrics(seg: Segments) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every stage-train metric of many layers at once, from their concatenated channels.

    Returns ``{metric: one value per layer}`` (a layer row is the channel mean of the per-channel
    quantity, or its max for ``*_max``; module docstring for d, v and KL) and the concatenated
    per-channel vectors ``d``, ``v``, ``kl``, ``d_excess``, ``v_excess`` (d and v signed).

    The per-channel quantities are rows of a few stacked arrays, each formula applied once to
    all rows that share it (d and d* together, v and v* together), and the per-layer sums and
    maxima of all of them take three numpy calls (``ufunc.reduceat`` over the stacked rows); what
    depends only on the layer sizes is computed once per run (:func:`_layout`). So a measured
    step costs a fixed few dozen numpy calls whatever the number of layers, with the same
    arithmetic (bit for bit) as each formula written out alone (:func:`mean_shift`,
    :func:`var_shift`, :func:`kl_divergence`, :func:`warmup_residual`, :func:`excess_shifts`).
    Division by zero gives inf/NaN, never a warning, as in torch; NaN propagates into means
    and maxima.
    """
    size = len(seg.mean)
    lay = _layout(seg.channels, size)
    c, starts = lay.c, lay.starts
    mean, var, mu_r, var_r, eps = seg.mean, seg.var, seg.mu_r, seg.var_r, seg.eps
    g, b = seg.gamma, seg.beta
    running = seg.running if seg.running is not None else lay.ones
    n = seg.n if seg.n is not None else lay.nan
    n0 = seg.n0 if seg.n0 is not None else lay.nan
    momentum = seg.momentum if seg.momentum is not None else lay.momentum
    mean0 = seg.mean0 if seg.mean0 is not None else lay.nan
    var0 = seg.var0 if seg.var0 is not None else lay.nan
    with np.errstate(all="ignore"):
        if seg.per_layer_counts:  # one power per layer, not per channel: the same values
            r = _warmup_residual(n[starts], n0[starts], momentum[starts]).repeat(seg.channels)
        else:
            r = _warmup_residual(n, n0, momentum)
        mu_s, var_s, learned = _corrected(mu_r, var_r, r, mean0, var0)
        # rows d, d*, v, v*: against the running statistics and the warm-up-corrected ones
        shift = np.empty((4, size))
        var_eps = np.concatenate((var_r, var_s)).reshape(2, size) + eps
        mu = np.concatenate((mu_r, mu_s)).reshape(2, size)
        np.divide(mean - mu, np.sqrt(var_eps), out=shift[0:2])  # mean_shift
        np.log((var + eps) / var_eps, out=shift[2:4])  # var_shift
        np.copyto(shift[1::2], 0.0, where=~learned)  # d*, v*: 0 until something is learned
        d, dx, v, vx = shift
        # rows summed per layer; the first six also maxed
        rows = np.empty((21, size))
        np.abs(shift, out=rows[0:4])  # |d|, |d*|, |v|, |v*|
        np.multiply(0.5, np.exp(v) + d * d - 1.0 - v, out=rows[4])  # kl_divergence
        ad, _, av, _, kl, ag = rows[0:6]
        np.abs(g, out=ag)
        finite = np.isfinite(rows[0:5])
        derived = finite[0] & finite[1] & finite[2] & finite[3] & finite[4]
        np.concatenate(
            (
                mean, var, mu_r, var_r, g, b, n, r,
                (ad > OUTLIER_MEAN_SHIFT) | (av > OUTLIER_LOG_VAR_RATIO),
                var < SMALL_VAR_EPS_FACTOR * eps,
                ~(np.isfinite(mu_r) & np.isfinite(var_r)) | (var_r < 0),
                ~(np.isfinite(mean) & np.isfinite(var)) | (running & ~derived),  # nonfinite
                g - seg.gamma0, b - seg.beta0, seg.gamma0,
            ),
            out=rows[6:21].reshape(-1),
        )  # fmt: skip
        np.square(rows[18:21], out=rows[18:21])  # drifts and ||gamma_0||**2
        totals = np.add.reduceat(rows, starts, axis=1)
        peaks = np.maximum.reduceat(rows[0:6], starts, axis=1)
        per_layer = totals[0:17] / c  # the layer row is the channel mean
        m = per_layer
        out: dict[str, np.ndarray] = {
            "batch_mean": m[6], "batch_var": m[7], "running_mean": m[8], "running_var": m[9],
            "mean_shift": m[0], "var_shift": m[2], "kl": m[4], "outlier_frac": m[14],
            "var_small_frac": m[15], "gamma_mean": m[10], "beta_mean": m[11],
            "mean_shift_excess": m[1], "var_shift_excess": m[3],
            "running_invalid": np.rint(m[16] * c),  # a count, not a fraction
            "num_batches_tracked": m[12], "warmup_residual": m[13],
            "mean_shift_max": peaks[0], "var_shift_max": peaks[2], "kl_max": peaks[4],
            "mean_shift_excess_max": peaks[1], "var_shift_excess_max": peaks[3],
        }  # fmt: skip
        spread = np.empty((3, size))
        np.square(rows[10:12] - per_layer[10:12].repeat(seg.channels, axis=1), out=spread[0:2])
        np.less(ag, SMALL_GAMMA * peaks[5].repeat(seg.channels), out=spread[2])
        spread_g, spread_b, small_g = np.add.reduceat(spread, starts, axis=1)
        drift_g, drift_b, ref_g = totals[18:21]
        out["nonfinite"] = totals[17]
        out["gamma_std"] = np.sqrt(spread_g / lay.bessel)
        out["beta_std"] = np.sqrt(spread_b / lay.bessel)
        # relative to ||gamma_0||; to sqrt(C), as beta_drift, when gamma_0 = 0 (zero-init)
        out["gamma_drift"] = np.sqrt(drift_g / np.where(ref_g > 0, ref_g, c))
        out["beta_drift"] = np.sqrt(drift_b / c)
        out["gamma_small_frac"] = small_g / c
    return out, {"d": d, "v": v, "kl": kl, "d_excess": dx, "v_excess": vx}
