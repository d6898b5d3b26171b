"""Rules on the numbers themselves: variances near eps (collapsed, or small from the start) and
non-finite or invalid values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bnprobe.diagnosis.advice import advice
from bnprobe.diagnosis.findings import Evidence, Finding, Kind, Severity
from bnprobe.diagnosis.table import (
    Run,
    by_layer,
    col,
    episodes,
    evidence,
    fmt,
    get,
    groups,
    latest,
    spans,
    trailing,
)

MOMENT_METRICS = ("batch_mean", "batch_var", "running_mean", "running_var")
RUNNING_METRICS = ("running_mean", "running_var")
AFFINE_METRICS = ("gamma_mean", "gamma_std", "beta_mean", "beta_std", "gamma", "beta")
NONFINITE_METRICS = frozenset(MOMENT_METRICS + AFFINE_METRICS)


def variance_levels(run: Run) -> pd.DataFrame:
    """Training rows with what the variance rules judge, per (rank, layer, step):

    ``var_over_eps`` = min(batch_var, running_var) / eps (channel means); ``zero_over_eps`` =
    batch_var / eps; ``collapsed_frac``, the fraction of channels whose batch variance is below
    ``var_small_eps_factor * eps`` (``var_small_frac`` metric or per-channel rows);
    ``var_drop`` = batch_var / its peak over earlier steps; ``var_fall`` = batch_var / its value
    at the layer's first measurement; ``frac_rise`` = collapsed_frac minus its first value.
    """
    return run.memo("variance_levels", lambda: _variance_levels(run))


def _earlier_peak(rows: pd.DataFrame, bv: np.ndarray) -> np.ndarray:
    """Per row, the largest ``bv`` of the earlier rows of its (rank, layer) (NaN skipped; NaN
    at the first row and where ``bv`` is NaN one row earlier): pandas' ``cummax().shift(1)``."""
    out = np.full(len(rows), np.nan)
    for pos in groups(rows["rank"], rows["layer"])[1]:
        x = bv[pos]
        peak = np.where(np.isnan(x), np.nan, np.fmax.accumulate(x))
        out[pos[1:]] = peak[:-1]
    return out


def _variance_levels(run: Run) -> pd.DataFrame:
    th = run.th
    train = run.active()
    if not len(train):
        return train
    eps = run.eps_of(train)
    bv = col(train, "batch_var").to_numpy(dtype=float)
    rv = col(train, "running_var").to_numpy(dtype=float)
    out = train.assign(eps=eps)
    out = out.assign(
        var_over_eps=np.fmin(bv, rv) / eps,
        zero_over_eps=bv / eps,
    )
    out = _with_channel_fraction(run, out)
    by = out.groupby(["rank", "layer"], sort=False)
    peak = _earlier_peak(out, bv) if "batch_var" in out else None
    first_bv = by["batch_var"].transform("first") if "batch_var" in out else None
    first_frac = by["collapsed_frac"].transform("first")
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = bv / (peak if peak is not None else np.nan)
        fall = bv / (first_bv.to_numpy(float) if first_bv is not None else np.nan)
    frac = out["collapsed_frac"].to_numpy(float)
    out = out.assign(
        peak_batch_var=np.nan if peak is None else peak,
        first_batch_var=np.nan if first_bv is None else first_bv.to_numpy(float),
        var_drop=np.where(bv > 0, drop, np.where(np.isfinite(drop), 0.0, np.nan)),
        var_fall=fall,
        frac_rise=frac - first_frac.to_numpy(float),
    )
    small = (
        np.nan_to_num(out["var_over_eps"].to_numpy(float), nan=np.inf) < th.var_small_eps_factor
    ) | (np.nan_to_num(frac) > th.var_small_channel_frac)
    zero = np.nan_to_num(out["zero_over_eps"].to_numpy(float), nan=np.inf) < th.var_zero_eps_factor
    dropped = np.nan_to_num(out["var_drop"].to_numpy(float), nan=np.inf) < th.var_collapse_drop
    small_at_first = (
        pd.Series(small, index=out.index).groupby([out["rank"], out["layer"]]).transform("first")
    ).to_numpy(dtype=bool)
    fell = small & (
        ~small_at_first
        | (np.nan_to_num(fall, nan=np.inf) < th.var_collapse_fall)
        | (np.nan_to_num(out["frac_rise"].to_numpy(float)) > th.var_small_channel_frac)
    )
    return out.assign(
        small=small, collapsed=zero | dropped | fell, zero=zero, dropped=dropped, fell=fell
    )


def _with_channel_fraction(run: Run, cols: pd.DataFrame) -> pd.DataFrame:
    if "var_small_frac" in cols:
        return cols.assign(collapsed_frac=cols["var_small_frac"].to_numpy(dtype=float))
    chan = run.channels("train", "batch_var")
    if not len(chan):
        return cols.assign(collapsed_frac=np.nan)
    low = chan["value"].to_numpy(dtype=float) < run.th.var_small_eps_factor * run.eps_of(chan)
    frac = (
        chan.assign(low=low.astype(float))
        .groupby(["rank", "layer", "step"], sort=False)["low"]
        .mean()
        .rename("collapsed_frac")
        .reset_index()
    )
    return cols.merge(frac, on=["rank", "layer", "step"], how="left")


def rule_variance_collapse(run: Run) -> list[Finding]:
    """Inputs whose variance is gone or fell during training (``warning``), at the latest logged
    step: channel-mean batch variance below ``var_zero_eps_factor * eps`` (~0); below
    ``var_collapse_drop`` times its earlier peak; or below ``var_small_eps_factor * eps`` (or
    that many more channels below it) after having been ``1 / var_collapse_fall`` times larger
    at the first measurement. Variance small from the start and stable is
    ``small_input_variance``."""
    th = run.th
    rows = variance_levels(run)
    if not len(rows):
        return []
    flag = rows["collapsed"].to_numpy(dtype=bool)
    s = np.where(
        flag,
        1.0 + 1.0 / np.fmax(np.nan_to_num(rows["zero_over_eps"].to_numpy(float), nan=1e12), 1e-12),
        0.0,
    )
    bad = trailing(rows.assign(score=s), flag)
    out = []
    for layer, first, worst in episodes(bad):
        bvw, rvw, e = get(worst, "batch_var"), get(worst, "running_var"), get(worst, "eps")
        step = int(worst["step"])
        if bool(worst["dropped"]) or (
            bool(worst["fell"]) and get(worst, "var_fall") < th.var_collapse_fall
        ):
            peak = (
                get(worst, "peak_batch_var")
                if bool(worst["dropped"])
                else get(worst, "first_batch_var")
            )
            fold = f", a {fmt(peak / bvw, '.0f')}-fold drop" if bvw > 0 else ""
            what = (
                f"the variance of its input fell from {fmt(peak, '.3g')} to {fmt(bvw, '.3g')}{fold}"
            )
        elif bool(worst["fell"]) and not get(worst, "collapsed_frac") > th.var_small_channel_frac:
            what = (
                f"the variance of its input fell to {fmt(bvw, '.2g')} ("
                f"{fmt(get(worst, 'var_over_eps'), '.2g')} x eps = {e:g}), from "
                f"{fmt(get(worst, 'first_batch_var'), '.3g')} at its first measurement"
            )
        elif bool(worst["fell"]):
            what = (
                f"{fmt(100 * get(worst, 'collapsed_frac'), '.0f')}% of its channels now have a "
                f"batch variance below {th.var_small_eps_factor:g} x eps = "
                f"{th.var_small_eps_factor * e:.1e}, more than at the start"
            )
        else:
            what = (
                f"the variance of its input is ~0 (mean batch variance {fmt(bvw, '.2g')}, running "
                f"variance {fmt(rvw, '.2g')}; eps = {e:g})"
            )
        message = (
            f"Layer {layer}: {what} (since step {first}, worst at step {step}). BatchNorm "
            "divides by sqrt(var + eps): with a variance this close to eps the output no longer "
            "has unit variance, and the division amplifies noise and rounding."
        )
        ev = evidence(
            worst,
            ("batch_var", "running_var", "peak_batch_var", "first_batch_var", "collapsed_frac"),
            eps=e,
            step_worst=step,
            threshold_zero_eps_factor=th.var_zero_eps_factor,
            threshold_drop=th.var_collapse_drop,
            threshold_fall=th.var_collapse_fall,
        )
        out.append(
            Finding(
                Kind.VARIANCE_COLLAPSE,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.VARIANCE_COLLAPSE),
                first,
                ev,
            )
        )
    return out


def rule_small_input_variance(run: Run) -> list[Finding]:
    """Input variance comparable to eps from the first measurement on, and stable (``info``):
    channel-mean batch or running variance below ``var_small_eps_factor * eps`` (or more than
    ``var_small_channel_frac`` of the channels), without the fall or drop of
    ``variance_collapse``. The usual cause is a depthwise conv in torchvision's init
    (kaiming_normal_, mode fan_out) in front of a BN with eps 1e-3."""
    th = run.th
    rows = variance_levels(run)
    if not len(rows):
        return []
    flag = rows["small"].to_numpy(dtype=bool) & ~rows["collapsed"].to_numpy(dtype=bool)
    bad = trailing(rows.assign(score=1.0), flag)
    out = []
    at = by_layer(rows)
    steps, collapsed = rows["step"].to_numpy(), rows["collapsed"].to_numpy(dtype=bool)
    for layer, first, _ in spans(bad):
        pos = at[layer]
        if int(steps[pos].min()) != first and bool(collapsed[pos].any()):
            continue  # it collapsed earlier and partly recovered: not the init pattern
        row = latest(rows, pos)
        bvw, e = get(row, "batch_var"), get(row, "eps")
        ratio = get(row, "var_over_eps")
        frac = get(row, "collapsed_frac")
        share = (
            f"; {fmt(100 * frac, '.0f')}% of its channels below {th.var_small_eps_factor:g} x eps"
            if math.isfinite(frac)
            else ""
        )
        message = (
            f"Layer {layer}: the variance of its input is comparable to eps from the first "
            f"measurement on (mean batch variance {fmt(bvw, '.2g')}, {fmt(ratio, '.2g')} x eps "
            f"= {e:g}{share}; since step {first}, stable). Such a BN partly acts as a fixed "
            "scale 1/sqrt(var + eps) instead of normalizing, in train and eval mode alike; "
            "eval mode stays faithful as long as the running variance follows the batch "
            "variance. Likely cause: a depthwise conv initialized with "
            "kaiming_normal_(mode='fan_out'); for a share of channels at exactly 0, ReLU "
            "channels dead from the start."
        )
        ev: Evidence = evidence(
            row,
            ("batch_var", "running_var", "collapsed_frac"),
            eps=e,
            var_over_eps=ratio,
            threshold_eps_factor=th.var_small_eps_factor,
        )
        out.append(
            Finding(
                Kind.SMALL_INPUT_VARIANCE,
                Severity.INFO,
                layer,
                message,
                advice(Kind.SMALL_INPUT_VARIANCE),
                first,
                ev,
            )
        )
    return out


def rule_nonfinite(run: Run) -> list[Finding]:
    """NaN or inf in the batch moments, running statistics or affine parameters, or invalid
    running statistics (an ``error``): a ``nonfinite`` count above 0 or a non-finite moment or
    parameter row at the training or validation stage; and, at every stage (probe rows of
    ``check_mismatch`` included), ``running_invalid`` above 0 (non-finite or negative running
    variance) or a non-finite running statistic. Reported from the first step, per layer, with
    the layer where it appeared first."""
    r = run.rows
    unused = run.unused()
    # only the rows of the metrics judged here (a third of a layer's rows) are looked at
    rows = np.flatnonzero(r.codes(NONFINITE_METRICS | {"nonfinite", "running_invalid"})[r.metric])
    values, metric = r.value[rows], r.metric[rows]
    measured = r.codes(["train", "val"])[r.stage[rows]] & ~r.codes(unused)[r.layer[rows]]
    counted = (metric == r.code("nonfinite")) & (values > 0)
    moments = r.codes(NONFINITE_METRICS)[metric] & ~np.isfinite(values)
    invalid = (metric == r.code("running_invalid")) & (values > 0)
    running = r.codes(RUNNING_METRICS)[metric] & ~np.isfinite(values)
    picked = rows[np.flatnonzero((measured & (counted | moments)) | invalid | running)]
    bad = r.frame(picked, ["step", "stage", "rank", "layer", "metric", "value"])
    if not len(bad):
        return []
    stage_order = bad["stage"].map({"train": 0, "val": 1, "probe": 2}).fillna(3)
    bad = bad.assign(stage_order=stage_order).sort_values(["step", "stage_order"], kind="stable")
    firsts = bad.groupby("layer", sort=False)["step"].min()
    origin_step = int(firsts.min())
    origin = min((str(la) for la, s in firsts.items() if s == origin_step), key=run.layer_key)
    out = []
    for layer, g in bad.groupby("layer", sort=False):
        name = str(layer)
        first_row = g.iloc[0]
        first, stage, rank = int(first_row["step"]), str(first_row["stage"]), int(first_row["rank"])
        at_first = g[(g["step"] == first) & (g["stage"] == stage)]
        names = sorted(set(at_first["metric"]) - {"nonfinite", "running_invalid"})
        count = g.loc[g["metric"] == "nonfinite", "value"]
        channels = int(count.max()) if len(count) else 0
        inv = g.loc[g["metric"] == "running_invalid", "value"]
        invalid_channels = int(inv.max()) if len(inv) else 0
        poisoned = invalid_channels > 0 or any(n.startswith("running_") for n in names)
        if not poisoned:
            poisoned = _running_bad_at_end(run, name)
        what = _nonfinite_what(names, channels, invalid_channels)
        on_rank = f", rank {rank}" if run.ranks > 1 else ""
        message = f"Layer {name}: {what} at step {first} ({stage} stage{on_rank})."
        if name == origin:
            message += " This is the first layer where it appears."
        else:
            message += (
                f" It appeared first in layer {origin} at step {origin_step} and most likely "
                "flows from there."
            )
        if poisoned:
            message += (
                " Its running statistics are invalid from then on: every eval-mode output of "
                "this layer (and of the layers after it) is wrong or NaN."
            )
        ev: Evidence = {
            "stage": stage,
            "rank": rank,
            "metrics": ", ".join(names) if names else "nonfinite",
            "nonfinite_channels": channels,
            "running_invalid_channels": invalid_channels,
            "running_stats_nonfinite": int(poisoned),
            "origin_layer": origin,
            "origin_step": origin_step,
        }
        only_running = not channels and not any(not n.startswith("running_") for n in names)
        out.append(
            Finding(
                Kind.NONFINITE,
                Severity.ERROR,
                name,
                message,
                advice(Kind.NONFINITE, "running" if only_running and poisoned else ""),
                first,
                ev,
            )
        )
    return out


def _running_bad_at_end(run: Run, layer: str) -> bool:
    train = run.wide("train")
    i = run.memo("latest_train_row", lambda: _latest_rows(train)).get(layer)
    if i is None:
        return False
    tail = train.iloc[i]
    return (
        any(not math.isfinite(get(tail, m, 0.0)) for m in RUNNING_METRICS)
        or get(tail, "running_invalid", 0.0) > 0
    )


def _latest_rows(train: pd.DataFrame) -> dict[str, int]:
    """Per layer, the position of its latest training row (of the same step, the last)."""
    step = train["step"].to_numpy()
    out = {}
    for layer, pos in zip(*groups(train["layer"]), strict=True):
        at = step[pos]
        out[str(layer)] = int(pos[np.flatnonzero(at == at.max())[-1]])
    return out


def _nonfinite_what(names: Sequence[str], channels: int, invalid: int) -> str:
    parts = []
    if channels or any(n.startswith("batch_") for n in names):
        parts.append(
            f"NaN or inf in the batch moments ({channels} channels)"
            if channels
            else "NaN or inf in the batch moments"
        )
    if invalid:
        parts.append(
            f"invalid running statistics in {invalid} channel{'s' if invalid != 1 else ''} "
            "(non-finite, or a negative running variance)"
        )
    elif any(n.startswith("running_") for n in names):
        parts.append("NaN or inf in the running statistics")
    if any(n.startswith(("gamma", "beta")) for n in names):
        parts.append("NaN or inf in the affine parameters gamma/beta")
    return " and ".join(parts) or "NaN or inf in its measurements"
