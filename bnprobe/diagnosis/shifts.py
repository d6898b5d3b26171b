"""Rules on what eval mode will see: stale running statistics and the train/eval gap.

The warm-up model. Running statistics start at (mu_0, var_0) = (0, 1) and follow the data as
``running <- (1 - m) running + m batch``; after n updates a fraction r = (1 - m)**n of the
initial values is left (``warmup_residual``; the cumulative average of ``momentum=None`` replaces
them at the first update). The table's ``mean_shift_excess`` and ``var_shift_excess`` compare
each batch with the running statistics with that residual taken out (Adam-style bias
correction, mu_R* = (mu_R - r mu_0) / (1 - r)): the shift the warm-up cannot explain. Those are
judged with the same thresholds at step 20 as at step 20,000, so a layer still warming up with
nothing else wrong stays quiet and a real shift is reported from the first validation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.diagnosis.advice import advice
from bnprobe.diagnosis.findings import Finding, Kind, Severity
from bnprobe.diagnosis.table import (
    Run,
    col,
    episodes,
    evidence,
    fmt,
    get,
    pct,
    rolling_median,
    score,
    spans,
    trailing,
)


def judged_shifts(run: Run, wide: pd.DataFrame) -> pd.DataFrame:
    """``wide`` with the shifts the stale rule judges: ``judged_mean_shift`` and
    ``judged_var_shift`` (the warm-up-corrected ``*_excess`` metrics), ``judged_kl`` (only for
    tables without them), and ``residual``. Tables of older versions, without the corrected
    metrics, are judged on the plain shifts of the rows past the warm-up only. Layers whose
    statistics never update (eval mode, momentum 0) are judged on the plain shifts: no warm-up
    is under way there."""
    r = run.residuals(wide)
    warm = r < run.th.warmup_residual
    out = wide.assign(residual=r)
    static = wide["layer"].isin(run.static).to_numpy(dtype=bool)
    legacy = np.ones(len(wide), dtype=bool)
    for name in ("mean_shift", "var_shift"):
        excess = col(wide, f"{name}_excess").to_numpy(dtype=float)
        plain = col(wide, name).to_numpy(dtype=float)
        has = np.isfinite(excess) & ~static
        legacy &= ~has
        out[f"judged_{name}"] = np.where(has, excess, np.where(warm, plain, np.nan))
    out["judged_kl"] = np.where(legacy & warm, col(wide, "kl").to_numpy(dtype=float), np.nan)
    return out


def val_shifts(run: Run) -> pd.DataFrame:
    """Validation rows with the judged shifts (one implementation for the rule and for
    :func:`bnprobe.diagnosis.worst_values`)."""
    val = run.wide("val")
    return judged_shifts(run, val) if len(val) else val


def train_shifts(run: Run) -> pd.DataFrame:
    """Training rows (layers that ran in train mode, without validation rows) with the rolling
    medians ``median_mean_shift`` and ``median_var_shift`` of the judged shifts."""
    train = run.active()
    if not len(train):
        return train
    val = run.wide("val")
    train = train[~train["layer"].isin(set(val["layer"]) if len(val) else set())]
    if "train_mode" in train:
        train = train[train["train_mode"] != 0.0]
    if not len(train):
        return train
    judged = judged_shifts(run, train)
    for name in ("mean_shift", "var_shift"):
        judged[f"median_{name}"] = rolling_median(judged, f"judged_{name}", run.th)
    return judged


def _warmup_text(r: float) -> str:
    if r < 1e-3:
        return ""
    return (
        f" {pct(r)} of the initial running statistics (mean 0, variance 1) are still in them; "
        "the shifts quoted are what that warm-up cannot explain."
    )


def rule_stale_running_stats(run: Run) -> list[Finding]:
    """Running statistics that do not fit the data eval sees, beyond the warm-up.

    With validation rows: the latest validation-stage judged shift (:func:`judged_shifts`)
    beyond ``val_*``; the finding starts at the first step of the unbroken stretch of such
    validation epochs that ends with the latest one. Without validation rows: the rolling median
    of the training-stage judged shifts beyond ``train_*``.
    """
    th = run.th
    out: list[Finding] = []
    val = val_shifts(run)
    if len(val):
        s = score(
            val,
            {
                "judged_mean_shift": th.val_mean_shift_max,
                "judged_var_shift": th.val_var_shift_max,
                "judged_kl": th.val_kl_max,
            },
        )
        bad = trailing(val.assign(score=s), s > 1.0)
        for layer, first, worst in episodes(bad):
            step = int(worst["step"])
            ms, vs = get(worst, "judged_mean_shift"), get(worst, "judged_var_shift")
            msm = get(worst, "mean_shift_excess_max", get(worst, "mean_shift_max"))
            numbers = (
                f"mean shift {fmt(ms)} std, worst channel {fmt(msm, '.1f')}; "
                f"variance log-ratio {fmt(vs)}"
            )
            kl = get(worst, "judged_kl")
            if np.isfinite(kl):
                numbers += f"; KL {fmt(kl)}"
            message = (
                f"Layer {layer}: running statistics do not match the validation data "
                f"({numbers}; worst at step {step}) since step {first}. In eval mode this layer "
                "normalizes with a mean and variance that the data it sees does not have."
                + _warmup_text(get(worst, "residual"))
            )
            ev = evidence(
                worst,
                (
                    "mean_shift",
                    "mean_shift_max",
                    "var_shift",
                    "var_shift_max",
                    "kl",
                    "mean_shift_excess",
                    "mean_shift_excess_max",
                    "var_shift_excess",
                    "var_shift_excess_max",
                ),
                stage="val",
                step_worst=step,
                warmup_residual=get(worst, "residual"),
                threshold_mean_shift=th.val_mean_shift_max,
                threshold_var_shift=th.val_var_shift_max,
            )
            out.append(
                Finding(
                    Kind.STALE_RUNNING_STATS,
                    Severity.WARNING,
                    layer,
                    message,
                    advice(Kind.STALE_RUNNING_STATS, "val"),
                    first,
                    ev,
                )
            )
    train = train_shifts(run)
    if not len(train):
        return out
    s = score(
        train,
        {"median_mean_shift": th.train_mean_shift_max, "median_var_shift": th.train_var_shift_max},
    )
    bad = trailing(train.assign(score=s), s > 1.0)
    for layer, first, worst in episodes(bad):
        ms, vs = get(worst, "median_mean_shift"), get(worst, "median_var_shift")
        message = (
            f"Layer {layer}: running statistics lag the training batches (median mean shift "
            f"{fmt(ms)} std, variance log-ratio {fmt(vs)} over the last {th.train_window} "
            f"logged steps) since step {first}. Eval mode will normalize with statistics the "
            "data no longer has. Without validation rows this is judged from training batches "
            "only." + _warmup_text(get(worst, "residual"))
        )
        ev = evidence(
            worst,
            ("median_mean_shift", "median_var_shift", "mean_shift", "var_shift"),
            stage="train",
            step_worst=int(worst["step"]),
            warmup_residual=get(worst, "residual"),
            threshold_mean_shift=th.train_mean_shift_max,
            threshold_var_shift=th.train_var_shift_max,
        )
        out.append(
            Finding(
                Kind.STALE_RUNNING_STATS,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.STALE_RUNNING_STATS, "train"),
                first,
                ev,
            )
        )
    return out


def probe_layers(run: Run) -> pd.DataFrame:
    """Probe rows of the BN layers with ``residual`` (their warm-up residual)."""
    probe = run.wide("probe")
    layers = probe[probe["layer"] != store.MODEL] if len(probe) else probe
    return layers.assign(residual=run.residuals(layers)) if len(layers) else layers


def probe_model(run: Run) -> pd.DataFrame:
    """Probe rows of the whole model with ``disagreement`` (1 - pred_agreement),
    ``max_residual`` (the largest warm-up residual of any layer at that probe) and
    ``most_warming`` (that layer)."""
    probe = run.wide("probe")
    model = probe[probe["layer"] == store.MODEL] if len(probe) else probe
    if not len(model):
        return model
    layers = probe_layers(run)
    res: dict[int, tuple[float, str]] = {}
    if len(layers):
        for step, g in layers.groupby("step", sort=False):
            i = int(np.argmax(g["residual"].to_numpy(dtype=float)))
            res[int(str(step))] = (float(g["residual"].iloc[i]), str(g["layer"].iloc[i]))
    steps = [int(s) for s in model["step"]]
    return model.assign(
        disagreement=1.0 - col(model, "pred_agreement"),
        max_residual=[res.get(s, (0.0, ""))[0] for s in steps],
        most_warming=[res.get(s, (0.0, ""))[1] for s in steps],
    )


def _recal_gain(model: pd.DataFrame, run: Run) -> np.ndarray:
    """Per model probe row: recalibration would change more than ``recal_pred_change_max`` of
    the predictions, with logits moving by more than ``recal_logits_shift_min``."""
    change = col(model, "recal_pred_change").to_numpy(dtype=float)
    shift = col(model, "recal_logits_shift").to_numpy(dtype=float)
    if "recal_logits_shift" not in model:
        shift = np.full(len(model), np.inf)
    big_change = np.nan_to_num(change, nan=0.0) > run.th.recal_pred_change_max
    moved = np.nan_to_num(shift, nan=0.0, posinf=np.inf) > run.th.recal_logits_shift_min
    return np.asarray(big_change & moved, dtype=bool)


def rule_train_eval_gap(run: Run) -> list[Finding]:
    """The train/eval probe: outputs that change when BN switches to running statistics.

    Per layer: the latest probe-stage ``local_gap`` above ``local_gap_max`` (``warning``) once
    the layer is past its warm-up; a layer still warming up stays quiet (the model-level
    verdict below speaks for the predictions). For the model (layer ``<model>``), at the latest
    probe, a ``warning``: ``pred_agreement`` below ``pred_agreement_min`` while some layer is
    still warming up (the warm-up is named as the likely cause: the case the old warm-up
    excuse silenced) or with a layer to blame; recalibration would change more than
    ``recal_pred_change_max`` of the predictions; or ``logits_gap`` above ``logits_gap_max``
    with a layer to blame. Past the warm-up, changed predictions or a large logits gap without
    a layer to blame are ``info``: the small gaps of many layers add up and flip near-tied
    predictions of a barely trained net.
    """
    th = run.th
    out: list[Finding] = []
    layers = probe_layers(run)
    if len(layers) and "local_gap" in layers:
        warm = layers["residual"].to_numpy(dtype=float) < th.warmup_residual
        s = np.where(warm, score(layers, {"local_gap": th.local_gap_max}), 0.0)
        bad = trailing(layers.assign(score=s), s > 1.0)
        for layer, first, worst in episodes(bad):
            step = int(worst["step"])
            message = (
                f"Layer {layer}: its output changes by {pct(get(worst, 'local_gap'))} (relative) "
                "when it uses its running statistics instead of the batch statistics "
                f"(train/eval probe, since step {first})."
            )
            ev = evidence(
                worst,
                ("local_gap", "output_gap", "num_batches_tracked"),
                step_worst=step,
                warmup_residual=get(worst, "residual"),
                threshold_local_gap=th.local_gap_max,
            )
            out.append(
                Finding(
                    Kind.TRAIN_EVAL_GAP,
                    Severity.WARNING,
                    layer,
                    message,
                    advice(Kind.TRAIN_EVAL_GAP, "layer"),
                    first,
                    ev,
                )
            )
    model = probe_model(run)
    if not len(model):
        return out
    disagree = np.nan_to_num(model["disagreement"].to_numpy(dtype=float), nan=0.0)
    low_agreement = disagree > 1.0 - th.pred_agreement_min
    gain = _recal_gain(model, run)
    big_logits = score(model, {"logits_gap": th.logits_gap_max}) > 1.0
    bad_rows = low_agreement | gain | big_logits
    rank_score = np.fmax(disagree / max(1.0 - th.pred_agreement_min, 1e-12), 0.0)
    rank_score += np.nan_to_num(col(model, "recal_pred_change").to_numpy(dtype=float))
    bad = trailing(model.assign(score=rank_score), bad_rows)
    for _, first, _ in spans(bad):
        latest = bad.sort_values("step").iloc[-1]
        step = int(latest["step"])
        i = int(np.flatnonzero(model["step"].to_numpy() == step)[-1])
        at = layers[layers["step"] == step] if len(layers) else layers
        local = col(at, "local_gap").to_numpy(dtype=float)
        blamed = bool(np.any(np.nan_to_num(local, nan=0.0, posinf=0.0) > th.local_gap_max))
        r, warming = get(latest, "max_residual", 0.0), str(latest["most_warming"])
        agree, gap = get(latest, "pred_agreement"), get(latest, "logits_gap")
        parts = [
            f"At the latest probe (step {step}) the model's outputs differ between train and "
            f"eval mode: relative logits gap {pct(gap)}, {pct(1.0 - agree)} of the probe "
            f"batch's predictions change (train/eval probe; bad since step {first})."
        ]
        if np.isfinite(local).any():
            top = at.iloc[int(np.nanargmax(np.where(np.isfinite(local), local, -1)))]
            parts.append(
                f"The largest single-layer gap is at {top['layer']} "
                f"(local gap {fmt(float(top['local_gap']))})."
            )
        variant = "layer"
        warming_up = r >= th.warmup_residual
        severe = gain[i] or blamed or (low_agreement[i] and warming_up)
        severity = Severity.WARNING if severe else Severity.INFO
        if gain[i]:
            parts.append(
                "Recalibrating would change "
                f"{pct(get(latest, 'recal_pred_change'))} of the eval-mode predictions (logits "
                f"move by {pct(get(latest, 'recal_logits_shift'))}): re-estimated running "
                "statistics fit this data better than the ones the layers hold."
            )
            variant = "recal"
        if (low_agreement[i] or gain[i]) and warming_up:
            m = run.momentum.get(warming)
            momentum = "" if m is None else ", momentum None" if m != m else f", momentum {m:g}"
            parts.append(
                f"Likely cause: the running statistics are still warming up ({pct(r)} of the "
                f"initial values left in {warming}{momentum})."
            )
            variant = "warmup"
        elif severity is Severity.INFO:
            parts.append(
                f"No single layer's gap exceeds {th.local_gap_max:g}: the small gaps of many "
                "layers add up (part of them is the sampling noise of the probe batch), which "
                "is common early in training and shrinks as the network settles."
            )
        ev = evidence(
            latest,
            ("logits_gap", "pred_agreement", "recal_pred_change", "recal_logits_shift"),
            step_latest=step,
            warmup_residual=float(r) if np.isfinite(r) else 0.0,
            threshold_pred_agreement=th.pred_agreement_min,
            threshold_logits_gap=th.logits_gap_max,
            threshold_recal_pred_change=th.recal_pred_change_max,
        )
        out.append(
            Finding(
                Kind.TRAIN_EVAL_GAP,
                severity,
                store.MODEL,
                " ".join(parts),
                advice(Kind.TRAIN_EVAL_GAP, variant),
                first,
                ev,
            )
        )
    return out
