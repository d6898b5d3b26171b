"""Rules on how the layer is built and wired: unused, without running statistics, with a
TensorFlow-style momentum, after a bias or after dropout."""

from __future__ import annotations

import numpy as np

from bnprobe.diagnosis.advice import advice
from bnprobe.diagnosis.findings import Evidence, Finding, Kind, Severity
from bnprobe.diagnosis.table import Run, by_layer, col, episodes, groups, num, spans


def rule_unused_layer(run: Run) -> list[Finding]:
    """A BN layer that never ran: ``forward_calls`` 0 at every logged training step."""
    train = run.wide("train")
    out = []
    at = by_layer(train)
    for layer in sorted(run.unused(), key=run.layer_key):
        rows = train.iloc[at[layer]]
        first = int(rows["step"].min())
        steps = len(rows)
        message = (
            f"Layer {layer} was never called: forward_calls is 0 at all {steps} logged "
            "training step" + ("s" if steps != 1 else "") + ". Its running statistics keep "
            "their initial values and its parameters get no gradient."
        )
        ev: Evidence = {"forward_calls": 0, "logged_steps": steps}
        out.append(
            Finding(
                Kind.UNUSED_LAYER,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.UNUSED_LAYER),
                first,
                ev,
            )
        )
    return out


def rule_no_running_stats(run: Run) -> list[Finding]:
    """A layer without running statistics (``has_running_stats`` 0 and no running-moment rows):
    eval mode normalizes with the statistics of whatever batch it gets (``info``)."""
    train = run.active()
    if "has_running_stats" not in train:
        return []
    bad = train[train["has_running_stats"] == 0.0]
    out = []
    running = col(train, "running_mean").notna().to_numpy()
    at = by_layer(train)
    for layer, first, _ in spans(bad):
        if running[at[layer]].any():
            continue  # buffers kept but not updated: frozen_bn reports it
        message = (
            f"Layer {layer} keeps no running statistics (track_running_stats=False): in eval "
            "mode it normalizes with the statistics of the batch it is given, so an eval "
            "output depends on the other samples in its batch, and a batch of one sample "
            "cannot be normalized."
        )
        ev: Evidence = {"has_running_stats": 0}
        out.append(
            Finding(
                Kind.NO_RUNNING_STATS,
                Severity.INFO,
                layer,
                message,
                advice(Kind.NO_RUNNING_STATS),
                first,
                ev,
            )
        )
    return out


def momenta(run: Run) -> np.ndarray:
    """The momentum of every training row of a layer that ran with running statistics (NaN for
    momentum=None)."""
    train = run.active()
    if "momentum" not in train:
        return np.array([], dtype=float)
    has_stats = col(train, "has_running_stats").fillna(1.0) != 0.0
    rows = train[has_stats.to_numpy() & col(train, "train_mode").notna().to_numpy()]
    return rows["momentum"].to_numpy(dtype=float)


def rule_suspicious_momentum(run: Run) -> list[Finding]:
    """``momentum`` at or above ``tf_momentum_min`` (``warning``): a TensorFlow-convention value.
    ``momentum=None`` (cumulative average) is ``info``."""
    train = run.active()
    if "momentum" not in train:
        return []
    has_stats = col(train, "has_running_stats").fillna(1.0) != 0.0
    rows = train[has_stats.to_numpy() & col(train, "train_mode").notna().to_numpy()]
    out = []
    momentum, step = rows["momentum"].to_numpy(dtype=float), rows["step"].to_numpy()
    for layer, pos in zip(*groups(rows["layer"]), strict=True):
        name = str(layer)
        m = momentum[pos]
        first = int(step[pos].min())
        if np.isnan(m).any():
            message = (
                f"Layer {name} uses momentum=None: its running statistics are a cumulative "
                "average over every batch since the start, so the batches of the early, "
                "untrained network weigh as much as the latest ones."
            )
            ev: Evidence = {"momentum": "None"}
            out.append(
                Finding(
                    Kind.SUSPICIOUS_MOMENTUM,
                    Severity.INFO,
                    name,
                    message,
                    advice(Kind.SUSPICIOUS_MOMENTUM, "none"),
                    first,
                    ev,
                )
            )
            continue
        worst = float(np.max(m))
        if worst < run.th.tf_momentum_min:
            continue
        message = (
            f"Layer {name} has momentum {worst:g}. In PyTorch momentum is the weight of the NEW "
            "batch (running = (1 - momentum) * running + momentum * batch), the opposite of "
            "TensorFlow/Keras, where 0.9 or 0.99 keeps 90-99% of the old value. With "
            f"{worst:g} the running statistics are mostly the last batch: eval mode normalizes "
            "with the statistics of one noisy batch."
        )
        ev = {"momentum": num(worst), "threshold": run.th.tf_momentum_min}
        out.append(
            Finding(
                Kind.SUSPICIOUS_MOMENTUM,
                Severity.WARNING,
                name,
                message,
                advice(Kind.SUSPICIOUS_MOMENTUM, "tf", fixed=1.0 - worst),
                first,
                ev,
            )
        )
    return out


def rule_bias_before_bn(run: Run) -> list[Finding]:
    """The module feeding the layer is a conv/linear with a bias (``input_bias`` 1; ``info``):
    BN subtracts the batch mean, which cancels any per-channel constant."""
    train = run.wide("train")
    if "input_bias" not in train:
        return []
    bad = train[train["input_bias"] == 1.0].assign(score=1.0)
    out = []
    for layer, first, _ in spans(bad):
        message = (
            f"Layer {layer} follows a convolution or linear layer with a bias. BatchNorm "
            "subtracts the batch mean, which cancels any per-channel constant, so that bias "
            "has no effect on the output: its parameters are wasted and their gradient is zero."
        )
        ev: Evidence = {"input_bias": 1}
        out.append(
            Finding(
                Kind.BIAS_BEFORE_BN,
                Severity.INFO,
                layer,
                message,
                advice(Kind.BIAS_BEFORE_BN),
                first,
                ev,
            )
        )
    return out


def rule_dropout_before_bn(run: Run) -> list[Finding]:
    """The module feeding the layer is dropout with p above ``dropout_before_bn_min_p``
    (``input_dropout``): the variance shift of Li et al. (2019)."""
    train = run.wide("train")
    if "input_dropout" not in train:
        return []
    bad = train[train["input_dropout"] > run.th.dropout_before_bn_min_p]
    out = []
    for layer, first, worst in episodes(bad.assign(score=bad["input_dropout"])):
        p = float(worst["input_dropout"])
        keep = f"{1.0 / (1.0 - p):.2g}" if p < 1.0 else "n/a"
        message = (
            f"Layer {layer} takes its input straight from dropout (p={p:g}). In training, "
            f"dropout zeroes a fraction {p:g} of the values and scales the rest by "
            f"1/(1-p) = {keep}; in eval mode it does nothing. So the variance this layer sees "
            "in training is larger than at inference, and its running variance does not fit "
            "eval-mode inputs (the 'variance shift' of Li et al., 2019)."
        )
        ev: Evidence = {"input_dropout": num(p), "threshold": run.th.dropout_before_bn_min_p}
        out.append(
            Finding(
                Kind.DROPOUT_BEFORE_BN,
                Severity.WARNING,
                layer,
                message,
                advice(Kind.DROPOUT_BEFORE_BN),
                first,
                ev,
            )
        )
    return out
