"""Rules on what the layer learns: dead (zero-scale) channels and frozen layers."""

from __future__ import annotations

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
    groups,
    latest,
    num,
    pct,
    spans,
    trailing,
)


def dead_fractions(run: Run) -> pd.DataFrame:
    """Training rows with ``dead_frac`` (``gamma_small_frac``; 1 when every gamma is exactly 0)
    and ``zero_init`` (every gamma of the layer was exactly 0 at its first measurement)."""
    train = run.active()
    if "gamma_small_frac" not in train:
        return train.iloc[0:0]
    all_zero = (col(train, "gamma_mean").abs() == 0.0) & (col(train, "gamma_std") == 0.0)
    frac = np.where(all_zero.to_numpy(), 1.0, train["gamma_small_frac"].to_numpy(dtype=float))
    out = train.assign(dead_frac=frac, all_zero=all_zero.to_numpy())
    first = out.groupby(["rank", "layer"], sort=False)["all_zero"].transform("first")
    return out.assign(zero_init=first.to_numpy(dtype=bool))


def rule_dead_channels(run: Run) -> list[Finding]:
    """Channels whose scale gamma is ~0 NOW: ``gamma_small_frac`` above
    ``dead_channel_frac_max`` at the latest logged training step (the finding dates from the
    start of that unbroken stretch). A layer whose gammas were all exactly 0 at its first
    measurement is the zero-init pattern of residual blocks (Goyal et al. 2017): quiet once its
    gammas grow, ``info`` while they have not moved yet."""
    th = run.th
    rows = dead_fractions(run)
    if not len(rows):
        return []
    s = np.nan_to_num(
        rows["dead_frac"].to_numpy(dtype=float) / max(th.dead_channel_frac_max, 1e-12)
    )
    bad = trailing(rows.assign(score=s), s > 1.0)
    out = []
    at = by_layer(rows)
    steps = rows["step"].to_numpy()
    for layer, first, worst in episodes(bad):
        pos = at[layer]
        now = latest(rows, pos)
        worst_frac, last_frac = float(worst["dead_frac"]), float(now["dead_frac"])
        ev = evidence(
            worst,
            ("gamma_mean", "gamma_std"),
            gamma_small_frac=worst_frac,
            gamma_small_frac_latest=last_frac,
            step_worst=int(worst["step"]),
            threshold=th.dead_channel_frac_max,
        )
        if bool(now["zero_init"]):
            if not bool(now["all_zero"]):
                continue  # zero-init gammas that grew: a young layer, judged later
            ev["zero_init"] = 1
            message = (
                f"Layer {layer}: every gamma is still exactly 0 at step {int(now['step'])}, "
                f"as at its first measurement (step {int(steps[pos].min())}): a zero-initialized "
                "residual BN (torchvision zero_init_residual, timm zero_init_last). Its block "
                "starts as the identity; the gammas grow once they get gradient."
            )
            out.append(
                Finding(
                    Kind.DEAD_CHANNELS,
                    Severity.INFO,
                    layer,
                    message,
                    advice(Kind.DEAD_CHANNELS, "zero_init"),
                    first,
                    ev,
                )
            )
            continue
        message = (
            f"Layer {layer}: {pct(last_frac)} of its channels have a scale gamma near zero "
            f"(below 1% of the largest) at step {int(now['step'])}, the latest measurement, "
            f"and so since step {first} (worst: {pct(worst_frac)} at step "
            f"{int(worst['step'])}). Those channels output only their shift beta and pass no "
            "signal on."
        )
        out.append(
            Finding(
                Kind.DEAD_CHANNELS,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.DEAD_CHANNELS),
                first,
                ev,
            )
        )
    return out


def rule_frozen_bn(run: Run) -> list[Finding]:
    """A BN layer that does not learn while the model trains.

    ``warning``: the layer is in eval mode (``train_mode`` 0) while the model is in training
    mode; or its running statistics never change over at least ``frozen_min_steps`` logged
    training steps (momentum 0, ``track_running_stats`` switched off with buffers kept).
    ``info``: gamma and beta never move while other layers' parameters do.
    """
    train = run.active()
    if not len(train):
        return []
    out = []
    model_mode = col(train, "model_train_mode").fillna(1.0)
    in_eval = (col(train, "train_mode") == 0.0) & (model_mode != 0.0)
    bad = train[in_eval.to_numpy()].assign(score=1.0)
    at, bad_at = by_layer(train), by_layer(bad)
    for layer, first, _ in spans(bad):
        k = len(bad_at[layer])
        message = (
            f"Layer {layer} is in eval mode while the model trains ({k} of {len(at[layer])} logged "
            f"training steps since step {first}). It normalizes with its running statistics "
            "and never updates them, so eval mode uses statistics that never saw this training."
        )
        ev: Evidence = {
            "train_mode": 0,
            "model_train_mode": 1,
            "steps_in_eval_mode": k,
            "logged_steps": len(at[layer]),
        }
        out.append(
            Finding(
                Kind.FROZEN_BN,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.FROZEN_BN, "eval_mode"),
                first,
                ev,
            )
        )
    flagged = set(bad["layer"])
    out += _frozen_running_stats(run, train, flagged)
    out += _frozen_affine(run, train, flagged | {f.layer for f in out})
    return out


def _frozen_running_stats(run: Run, train: pd.DataFrame, skip: set[str]) -> list[Finding]:
    if "running_mean" not in train or "running_var" not in train:
        return []
    out = []
    known = (train["running_mean"].notna() & train["running_var"].notna()).to_numpy()
    rank, step = train["rank"].to_numpy(), train["step"].to_numpy()
    stats = [train[c].to_numpy(dtype=float) for c in ("running_mean", "running_var")]
    for layer, pos in zip(*groups(train["layer"]), strict=True):
        name = str(layer)
        if name in skip:
            continue
        pos = pos[known[pos]]
        at_steps = step[pos]
        if len(at_steps) > 1 and bool((at_steps[1:] > at_steps[:-1]).all()):
            steps = len(at_steps)  # one rank: a wide view's steps of a layer are in order
        else:
            steps = len(np.unique(at_steps))
        if steps < run.th.frozen_min_steps:
            continue
        unchanged = True
        one_rank = not len(pos) or bool((rank[pos] == rank[pos[0]]).all())
        for at in [np.arange(len(pos))] if one_rank else groups(rank[pos])[1]:
            for x in (s[pos[at]] for s in stats):
                scale = max(float(np.max(np.abs(x))), 1e-12)
                if np.max(np.abs(x - x[0])) > run.th.frozen_rel_change * scale:
                    unchanged = False
        if not unchanged:
            continue
        g = train.iloc[pos]
        first, last = int(g["step"].min()), int(g["step"].max())
        momentum = run.momentum.get(name, 0.1)
        tracked = col(g, "has_running_stats")
        why = ""
        if momentum == 0.0:
            why = " Its momentum is 0, so its running statistics never update."
        elif len(tracked.dropna()) and float(tracked.dropna().iloc[-1]) == 0.0:
            why = (
                " It does not track running statistics (track_running_stats=False) but keeps "
                "its buffers, which eval mode still uses."
            )
        message = (
            f"Layer {name}: its running statistics never changed over {steps} logged training "
            f"steps (steps {first} to {last}) while the model trained.{why} Eval mode will "
            "normalize with statistics that never saw the data."
        )
        ev: Evidence = {
            "running_mean": num(float(g["running_mean"].iloc[-1])),
            "running_var": num(float(g["running_var"].iloc[-1])),
            "logged_steps": steps,
            "momentum": num(momentum),
        }
        out.append(
            Finding(
                Kind.FROZEN_BN,
                Severity.WARNING,
                name,
                message,
                advice(Kind.FROZEN_BN, "running"),
                first,
                ev,
            )
        )
    return out


def _frozen_affine(run: Run, train: pd.DataFrame, skip: set[str]) -> list[Finding]:
    if "gamma_drift" not in train or "beta_drift" not in train:
        return []
    later = train[train["step"] > train["step"].min()]
    drift = later[["gamma_drift", "beta_drift"]].abs().max(axis=1)
    moving = later.loc[drift > run.th.frozen_rel_change, "layer"]
    if not len(moving):
        return []  # nothing moves at all (lr 0, or too few steps): no comparison possible
    out = []
    at = by_layer(train)
    both = later[["gamma_drift", "beta_drift"]]
    known = both.notna().all(axis=1).to_numpy()
    size = both.abs().to_numpy(dtype=float)
    for layer, pos in zip(*groups(later["layer"]), strict=True):
        name = str(layer)
        pos = pos[known[pos]]
        if name in skip or len(pos) < run.th.frozen_min_steps - 1:
            continue
        if float(size[pos].max()) > run.th.frozen_rel_change:
            continue
        d = both.iloc[pos]
        first = int(train["step"].to_numpy()[at[name]].min())
        message = (
            f"Layer {name}: gamma and beta did not change over {len(d) + 1} logged training "
            "steps while other layers' parameters did: its affine parameters are frozen "
            "(requires_grad=False, or left out of the optimizer)."
        )
        ev: Evidence = {"gamma_drift": 0.0, "beta_drift": 0.0, "logged_steps": len(d) + 1}
        out.append(
            Finding(
                Kind.FROZEN_BN,
                Severity.INFO,
                name,
                message,
                advice(Kind.FROZEN_BN, "affine"),
                first,
                ev,
            )
        )
    return out


__all__ = ["dead_fractions", "rule_dead_channels", "rule_frozen_bn"]
