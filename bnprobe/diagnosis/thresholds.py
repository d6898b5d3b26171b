"""Every threshold of the diagnosis in one frozen dataclass that users can pass.

``diagnose(df, thresholds=Thresholds(local_gap_max=0.8))``. Each rule fires when a measurement is
strictly beyond its threshold; docs/diagnosis.md lists them with the values measured on healthy
and broken runs (``python tools/calibrate_thresholds.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

DEFAULT_MOMENTUM = 0.1
"""Momentum assumed for the warm-up when the table has no ``momentum`` row (PyTorch's default)."""

DEFAULT_EPS = 1e-5
"""``eps`` assumed when the table has no ``eps`` row (PyTorch's default)."""


@dataclass(frozen=True)
class Thresholds:
    """The limits the rules compare measurements with (all keyword, all documented).

    Shifts are in running standard deviations (``mean_shift``) or as abs(log variance ratio)
    (``var_shift``); gaps are relative norms; fractions are in 0..1.
    """

    warmup_residual: float = 0.05
    """A layer counts as still warming up while more than this fraction of its initial running
    statistics is left (``warmup_residual``, or ``(1 - momentum) ** updates`` for tables without
    it). Only used where no warm-up-corrected metric exists (per-layer ``local_gap``, tables of
    older versions); a finding there is not suppressed but named a warm-up effect."""

    val_mean_shift_max: float = 0.75
    """stale_running_stats: validation-stage ``mean_shift_excess`` (the shift the warm-up cannot
    explain; plain ``mean_shift`` in older tables) above this."""

    val_var_shift_max: float = 1.0
    """stale_running_stats: validation-stage ``var_shift_excess`` above this: the variances differ
    by more than a factor e = 2.7 beyond what the warm-up explains."""

    val_kl_max: float = 0.5
    """stale_running_stats: validation-stage ``kl`` above this, only for tables without the
    warm-up-corrected metrics (KL is not corrected for the warm-up)."""

    train_mean_shift_max: float = 1.0
    """stale_running_stats without validation data: the rolling median (``train_window`` logged
    steps) of the training-stage ``mean_shift_excess`` above this."""

    train_var_shift_max: float = 1.0
    """stale_running_stats without validation data: the same for ``var_shift_excess``."""

    train_window: int = 5
    """Logged training steps in the rolling median of the training-stage stale rule."""

    train_min_steps: int = 3
    """Logged training steps the training-stage rolling medians need before they judge."""

    local_gap_max: float = 0.6
    """train_eval_gap of a layer: probe-stage ``local_gap`` above this."""

    logits_gap_max: float = 1.0
    """train_eval_gap of the model: probe-stage ``logits_gap`` above this."""

    pred_agreement_min: float = 0.8
    """train_eval_gap of the model: probe-stage ``pred_agreement`` below this (more than 20% of
    the predictions change between train and eval mode): a warning whatever the warm-up."""

    recal_pred_change_max: float = 0.04
    """train_eval_gap of the model: ``recal_pred_change`` above this (re-estimating the running
    statistics would change more than 4% of the probe batch's eval-mode predictions). A 6-point
    eval gap is reported; one flipped prediction of a 32-row probe batch (3.1%) is not; healthy
    runs measured 0."""

    recal_logits_shift_min: float = 0.1
    """...and ``recal_logits_shift`` above this: two flipped near-ties of a 32-row probe batch
    with logits that move by 5% (a frozen-BN fine-tuning replica re-estimated on 3 batches) are
    sampling noise, not a gain worth reporting."""

    small_batch_min_batch: float = 8.0
    """small_batch: median ``batch_size`` below this (Wu and He, Group Normalization, 2018)."""

    small_batch_min_samples: float = 8.0
    """small_batch: median ``samples_per_channel`` (N·H·W) below this."""

    dead_channel_frac_max: float = 0.1
    """dead_channels: latest ``gamma_small_frac`` above this."""

    var_small_eps_factor: float = 10.0
    """small_input_variance / variance_collapse: channel-mean batch or running variance below
    this many times ``eps`` (or more than ``var_small_channel_frac`` of the channels below it)."""

    var_small_channel_frac: float = 0.1
    """Fraction of channels whose batch variance is below ``var_small_eps_factor * eps``."""

    var_zero_eps_factor: float = 0.01
    """variance_collapse: channel-mean batch variance below this many times ``eps``: the input
    is (almost) constant and BN's output is the input divided by sqrt(eps)."""

    var_collapse_drop: float = 1e-3
    """variance_collapse over time: batch variance below this fraction of its own earlier peak."""

    var_collapse_fall: float = 0.1
    """variance_collapse: a variance below ``var_small_eps_factor * eps`` now that was more than
    ten times larger (1 / this) at the first measurement fell during training."""

    frozen_min_steps: int = 3
    """frozen_bn: logged training steps over which unchanged running statistics count as frozen."""

    frozen_rel_change: float = 1e-9
    """frozen_bn: relative change below which running statistics (and gamma/beta) are unchanged."""

    tf_momentum_min: float = 0.5
    """suspicious_momentum: momentum at or above this is almost surely TensorFlow's convention."""

    dropout_before_bn_min_p: float = 0.0
    """dropout_before_bn: dropout probability of the module feeding the layer above this."""

    rank_divergence_max: float = 0.5
    """rank_divergence: rolling median (``train_window`` steps) of ``rank_divergence`` above
    this."""

    @property
    def pred_change_max(self) -> float:
        """``1 - pred_agreement_min``: the share of predictions that may change between train
        and eval mode (what ``worst_values`` calibrates as ``pred_change``)."""
        return 1.0 - self.pred_agreement_min

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(
                    f"Thresholds.{f.name} must be a number; got {type(value).__name__} {value!r}"
                )
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Thresholds.{f.name} must be a finite number >= 0; got {value!r}")
        for name in ("train_window", "train_min_steps", "frozen_min_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"Thresholds.{name} must be an integer >= 1; got {getattr(self, name)!r}"
                )


DEFAULT_THRESHOLDS = Thresholds()
