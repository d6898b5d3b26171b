"""Rules on the batches BN normalizes with: too small, or different per DDP rank."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bnprobe import stats
from bnprobe.diagnosis.advice import advice
from bnprobe.diagnosis.findings import Evidence, Finding, Kind, Severity
from bnprobe.diagnosis.table import (
    Run,
    col,
    episodes,
    fmt,
    groups,
    num,
    rolling_median,
    trailing,
)

BATCH_METRICS = ("batch_size", "samples_per_channel")


def batch_medians(run: Run) -> pd.DataFrame:
    """Per (rank, layer): the median over the logged training steps of ``batch_size`` and
    ``samples_per_channel`` (the median, so that the short last batch of an epoch does not
    count), the number of steps and the first step any of them was below its limit."""
    return run.memo("batch_medians", lambda: _batch_medians(run))


def _batch_medians(run: Run) -> pd.DataFrame:
    train = run.active()
    limits = {
        "batch_size": run.th.small_batch_min_batch,
        "samples_per_channel": run.th.small_batch_min_samples,
    }
    rows = []
    rank, layer, step = (train[c].to_numpy() for c in ("rank", "layer", "step"))
    values = {m: col(train, m).to_numpy(dtype=float) for m in BATCH_METRICS}
    for pos in groups(train["rank"], train["layer"])[1]:
        small = np.zeros(len(pos), dtype=bool)
        for m, limit in limits.items():
            small |= values[m][pos] < limit
        at = step[pos]
        row: dict[str, object] = {
            "rank": int(rank[pos[0]]),
            "layer": str(layer[pos[0]]),
            "steps": len(pos),
            "first_small": int(at[small].min()) if small.any() else int(at.min()),
        }
        for m in BATCH_METRICS:
            v = values[m][pos]
            v = v[~np.isnan(v)]
            row[m] = float(np.median(v)) if len(v) else math.nan
            row[f"{m}_min"] = float(v.min()) if len(v) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def rule_small_batch(run: Run) -> list[Finding]:
    """Too few samples for reliable batch moments, per layer and rank: median ``batch_size``
    below ``small_batch_min_batch``, or median ``samples_per_channel`` (N·H·W) below
    ``small_batch_min_samples``. The worst rank is reported."""
    th = run.th
    med = batch_medians(run)
    if not len(med):
        return []
    limits = {
        "batch_size": th.small_batch_min_batch,
        "samples_per_channel": th.small_batch_min_samples,
    }
    worst: dict[str, tuple[float, int, pd.Series]] = {}
    for _, r in med.iterrows():
        s = 0.0
        for m, limit in limits.items():
            v = float(r[m])
            if math.isfinite(v) and v < limit:
                s = max(s, limit / max(v, 1e-12))
        if s == 0.0:
            continue
        layer, first = str(r["layer"]), int(r["first_small"])
        old = worst.get(layer)
        if old is None or s > old[0]:
            worst[layer] = (s, min(first, old[1]) if old else first, r)
        else:
            worst[layer] = (old[0], min(first, old[1]), old[2])
    multi_rank = run.ranks > 1
    out = []
    for layer, (_, first, r) in worst.items():
        rank = int(r["rank"])
        on_rank = f" on rank {rank}" if multi_rank else ""
        batch, samples, steps = (
            float(r["batch_size"]),
            float(r["samples_per_channel"]),
            int(r["steps"]),
        )
        per_channel = f"; {samples:g} values per channel" if math.isfinite(samples) else ""
        if math.isfinite(batch) and batch < th.small_batch_min_batch:
            what = (
                f"batches of only {batch:g} samples (median over {steps} logged steps{on_rank}"
                f"{per_channel})"
            )
        else:
            what = (
                f"moments taken over only {fmt(samples, 'g')} values per channel (median over "
                f"{steps} logged steps{on_rank})"
            )
        message = (
            f"Layer {layer} normalizes each training batch with {what} since step {first}. "
            "Moments from so few samples are noisy: every batch is normalized differently, and "
            "differently from what eval mode will use."
        )
        ev: Evidence = {}
        for m in BATCH_METRICS:
            if math.isfinite(float(r[m])):
                ev[f"{m}_median"] = num(float(r[m]))
                ev[f"{m}_min"] = num(float(r[f"{m}_min"]))
        ev |= {
            "logged_steps": steps,
            "rank": rank,
            "threshold_batch_size": th.small_batch_min_batch,
            "threshold_samples_per_channel": th.small_batch_min_samples,
        }
        out.append(
            Finding(
                Kind.SMALL_BATCH,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.SMALL_BATCH, min_batch=th.small_batch_min_batch),
                first,
                ev,
            )
        )
    return out


def divergence_rows(run: Run) -> pd.DataFrame:
    """Per (rank, layer, step): ``divergence`` (the ``rank_divergence`` metric, or each rank's
    distance from rank 0 computed from per-rank rows) and its rolling ``median_divergence``."""
    train = run.active()
    if not len(train):
        return train
    if "rank_divergence" in train:
        given = train[train["rank_divergence"].notna()]
        rows = given.assign(divergence=given["rank_divergence"], other_rank=-1)
    elif train["rank"].nunique() > 1 and "running_mean" in train and "running_var" in train:
        rows = _cross_rank(run, train)
    else:
        return train.iloc[0:0]
    if not len(rows):
        return rows
    rows = rows.sort_values(["rank", "layer", "step"], kind="stable").reset_index(drop=True)
    return rows.assign(median_divergence=rolling_median(rows, "divergence", run.th))


def rule_rank_divergence(run: Run) -> list[Finding]:
    """Running statistics that differ between DDP ranks, persistently: the rolling median over
    ``train_window`` logged steps of the ``rank_divergence`` metric above
    ``rank_divergence_max`` at the latest step. Tables without that metric but with rows of
    several ranks: each rank's distance from rank 0 instead."""
    th = run.th
    rows = divergence_rows(run)
    if not len(rows):
        return []
    s = rows["median_divergence"].to_numpy(float) / th.rank_divergence_max
    rows = rows.assign(score=s)
    bad = trailing(rows, np.nan_to_num(s) > 1.0)
    out = []
    for layer, first, worst in episodes(bad):
        x = float(worst["median_divergence"])
        other = int(worst["other_rank"])
        versus = f", rank {other} vs rank 0" if other >= 0 else ""
        message = (
            f"Layer {layer}: running statistics differ between DDP ranks (divergence "
            f"{fmt(x)}, median of {th.train_window} logged steps{versus}) since step {first}. "
            "Each rank evaluates with different statistics, and a checkpoint saved by rank 0 "
            "holds only rank 0's."
        )
        ev: Evidence = {
            "rank_divergence_median": num(x),
            "rank_divergence": num(float(worst["divergence"])),
            "step_worst": int(worst["step"]),
            "threshold": th.rank_divergence_max,
        }
        if other >= 0:
            ev["rank"] = other
        out.append(
            Finding(
                Kind.RANK_DIVERGENCE,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.RANK_DIVERGENCE),
                first,
                ev,
            )
        )
    return out


def _cross_rank(run: Run, train: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, step, rank != 0): how far that rank's running statistics are from rank 0's."""
    base_rank = int(train["rank"].min())
    base = train[train["rank"] == base_rank][["layer", "step", "running_mean", "running_var"]]
    others = train[train["rank"] != base_rank][
        ["layer", "step", "rank", "running_mean", "running_var"]
    ]
    m = others.merge(base, on=["layer", "step"], suffixes=("", "_base"))
    eps = run.eps_of(m)
    mean, var = (m[c].to_numpy(dtype=float) for c in ("running_mean", "running_var"))
    mean0, var0 = (m[c].to_numpy(dtype=float) for c in ("running_mean_base", "running_var_base"))
    with np.errstate(divide="ignore", invalid="ignore"):  # d and v against rank 0's
        dm = np.abs(stats.mean_shift(mean, mean0, var0, eps))
        dv = np.abs(stats.var_shift(var, var0, eps))
    div = np.fmax(np.nan_to_num(np.asarray(dm, dtype=float)), np.nan_to_num(dv))
    return m.assign(divergence=div, other_rank=m["rank"].astype(int))
