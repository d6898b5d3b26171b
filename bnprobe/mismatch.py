"""The train/eval probe, :func:`check_mismatch`, on any ``nn.Module`` (no Lightning).

"How differently does my model behave in eval mode, and which layer is to blame?" One batch, two
forwards (BN layers on batch statistics, then on running statistics), gaps per layer and for the
whole model (stage ``probe``), and what a recalibration would change. Its sibling
:func:`bnprobe.recalibrate` (:mod:`bnprobe.recalibration`, re-exported here) repairs the running
statistics. Both run the model through :mod:`bnprobe.passes`, which says how a BN layer is made
to use batch statistics without touching its buffers. Imports no Lightning and no sink.

The taps of :mod:`bnprobe.tap` record every forward of a BN layer; callers that have taps attached
must set ``tap.active = False`` around these functions (the Lightning callback does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from bnprobe import metrics, passes, store
from bnprobe.passes import ForwardFn, FrozenSelection
from bnprobe.recalibration import PopulationMoments, recalibrate, write_population
from bnprobe.tap import LayerSelection

__all__ = ["check_mismatch", "recalibrate"]

_GAPS: tuple[str, ...] = metrics.names("probe", group="probe")
"""``output_gap``, ``local_gap``: the probe's per-layer rows (then the warm-up rows, then the
whole-model ones; bnprobe.metrics has them all)."""


def check_mismatch(
    model: nn.Module,
    batch: Any,
    *,
    layers: LayerSelection = None,
    step: int | None = None,
    epoch: int = 0,
    rank: int = 0,
    recal_batches: Iterable[Any] = (),
    frozen: FrozenSelection = "auto",
    forward_fn: ForwardFn | None = None,
) -> pd.DataFrame:
    """Measure the train/eval mismatch of every BN layer on one batch (rows of stage ``probe``).

    The model runs twice under ``torch.no_grad()``, with every non-BN module in eval mode (dropout
    off, so the only difference between the passes is BatchNorm) and the same RNG state:

    1. *train pass*: every BN layer with running statistics normalizes with the batch moments
       (training behaviour) but updates nothing;
    2. *eval pass*: every BN layer normalizes with its running moments (inference behaviour).

    Per BN layer (``layers`` selects which get rows; all BN layers switch mode):

    * ``output_gap`` = ||y_train − y_eval|| / ||y_train|| at the layer's output: the cumulative
      mismatch of the model up to and including this layer.
    * ``local_gap`` = ||BN_batch(x) − BN_running(x)|| / ||BN_batch(x)||, both the layer's *own*
      forward (so whatever a subclass adds after the normalization, e.g. timm's
      ``BatchNormAct2d`` activation, is in both) on the same input x: the input the layer sees in
      the *train pass*. That input is what the running statistics are meant to summarise, and it
      does not depend on the running statistics of earlier layers, so a layer with bad running
      stats shows a large ``local_gap`` while the layers before *and after* it stay near 0. At
      the first BN layer (same input in both passes) it equals ``output_gap``. Non-finite
      running statistics give a NaN gap, never 0.
    * ``num_batches_tracked`` (the layer's buffer: how many training updates its running
      statistics have had; the ``step`` given when the layer has no such buffer),
      ``warmup_residual`` r = (1 − momentum)**n (``momentum=None``: 1 if n = 0 else 0), the share
      of the initial buffers (mean 0, variance 1) still in the running statistics, and
      ``running_invalid``, the number of channels whose running mean or variance is non-finite
      or whose running variance is negative.

    For layer ``"<model>"``: ``logits_gap`` (the same relative gap of the model outputs; for a
    tuple, list or dict output the first tensor) and ``pred_agreement`` (fraction of rows whose
    argmax over the last dimension agrees; only when the output has at least 2 dimensions), and
    what recalibrating would buy: the running statistics of every BN layer are re-estimated
    (PreciseBN, as :func:`recalibrate` does: exact pooled moments of each layer's train-pass
    input) on the batch and the ``recal_batches``, written into the buffers for a third,
    eval-mode pass, and put back. ``recal_logits_shift`` = ||y_recal − y_eval|| / ||y_eval|| and
    ``recal_pred_change`` = fraction of rows whose argmax changes (with at least 2 dimensions).
    Estimated on the probe batch alone, y_recal is close to the train pass (it is in-sample);
    held batches (``recal_batches``) make it a fairer estimate of what
    ``recalibrate(model, loader)`` would change.

    ``step``: the step column; by default the largest ``num_batches_tracked`` of the model's BN
    layers (so that rows of a trained model carry its update count).

    ``batch``: a tuple or list is taken as ``(input, target, ...)`` and only its first element is
    passed to the model; anything else is passed as is, ``model(batch)``. If neither is what your
    model takes, pass the input itself, or ``forward_fn(model, batch)`` that runs the model on
    one batch. Tensors are moved to the model's device.

    Frozen BN layers (``frozen``, as in :func:`recalibrate`: by default those in eval mode while
    the model is in training mode, as in fine-tuning) normalize with their running statistics in
    every pass, as they do in training: their gaps are 0, the layers after them see what they see
    in training, and the re-estimate leaves their statistics as they are.

    BN layers without running statistics (``track_running_stats=False``) behave the same in both
    modes and get no rows. A BN layer that never runs in the forward gets no rows. A layer called
    several times pools its calls (sums of squares over all calls).

    Afterwards every buffer (bit for bit, ``num_batches_tracked`` included), every module's own
    ``training`` flag, every BN layer's ``track_running_stats`` and the torch CPU (and, if
    initialized, CUDA) RNG state are exactly as before, whatever happens.
    """
    all_bn = passes.all_batchnorm(model, "check_mismatch")
    frozen_names = passes.frozen_layers(model, all_bn, frozen, "check_mismatch")
    selected = {
        n: m for n, m in passes.select_layers(model, layers).items() if passes.has_running_stats(m)
    }
    device = passes.model_device(model)
    with_running = {
        n: m for n, m in all_bn.items() if passes.has_running_stats(m) and n not in frozen_names
    }
    tracked = {n: _buffer_value(m, "num_batches_tracked") for n, m in selected.items()}
    if step is None:
        counts = [_buffer_value(m, "num_batches_tracked") for m in with_running.values()]
        step = int(max((c for c in counts if c is not None), default=0))

    train_out: dict[str, list[Tensor]] = {n: [] for n in selected}
    local_sq: dict[str, list[float]] = {n: [0.0, 0.0] for n in selected}  # ||diff||², ||y_b||²
    output_sq: dict[str, list[float]] = {n: [0.0, 0.0] for n in selected}
    eval_calls: dict[str, int] = dict.fromkeys(selected, 0)
    pool = PopulationMoments(with_running)  # train-pass inputs, then recal_batches: the re-estimate

    def train_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
                return
            bn = selected[name]
            y_run = _own_forward_eval(bn, args[0], state)  # same input, running statistics
            local_sq[name][0] += _sq_norm(output - y_run)
            local_sq[name][1] += _sq_norm(output)
            train_out[name].append(output.detach().clone())  # clone: in-place ops may follow

        return hook

    def eval_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            i = eval_calls[name]
            eval_calls[name] += 1
            if not isinstance(output, Tensor) or i >= len(train_out[name]):
                return
            y_train = train_out[name][i]
            if y_train.shape != output.shape:
                return
            output_sq[name][0] += _sq_norm(y_train - output)
            output_sq[name][1] += _sq_norm(y_train)

        return hook

    state = passes.ModelState.capture(model)
    handles: list[RemovableHandle] = []
    y_recal: Tensor | None = None
    try:
        with torch.no_grad():
            passes.set_modes(state, all_bn, bn_batch_stats=True, frozen=frozen_names)
            handles = [m.register_forward_hook(train_hook(n)) for n, m in selected.items()]
            handles += pool.attach(kernel=False)  # the train hook needs the buffers as they are
            y_train = passes.first_tensor(
                passes.forward(model, batch, device, forward_fn, "check_mismatch")
            )
            if y_train is not None:
                y_train = y_train.detach().clone()
            passes.remove_handles(handles)

            state.restore_rng()  # same random draws in both passes
            passes.set_modes(state, all_bn, bn_batch_stats=False)
            handles = [m.register_forward_hook(eval_hook(n)) for n, m in selected.items()]
            y_eval = passes.first_tensor(
                passes.forward(model, batch, device, forward_fn, "check_mismatch")
            )
            passes.remove_handles(handles)
            if y_eval is not None:
                y_eval = y_eval.detach().clone()  # the next pass reuses the model's buffers

                # what recalibration would buy: re-estimated statistics (held batches too)
                passes.set_modes(state, all_bn, bn_batch_stats=True, frozen=frozen_names)
                handles = pool.attach()
                for i, extra in enumerate(recal_batches):
                    who = "check_mismatch (recal_batches)"
                    passes.forward(model, extra, device, forward_fn, who, index=i)
                passes.remove_handles(handles)
                for name, bn in with_running.items():
                    write_population(bn, pool.moments.get(name))
                state.restore_rng()
                passes.set_modes(state, all_bn, bn_batch_stats=False)
                y_recal = passes.first_tensor(
                    passes.forward(model, batch, device, forward_fn, "check_mismatch")
                )
    finally:
        passes.remove_handles(handles)
        state.restore()

    names: list[str] = []
    metric_names: list[str] = []
    values: list[float] = []
    for name, bn in selected.items():
        warmup = _warmup_rows(bn, tracked[name], step)
        if not train_out[name]:  # the layer did not run: only what its buffers say
            names += [name] * len(warmup)
            metric_names += list(warmup)
            values += list(warmup.values())
            continue
        names += [name] * (2 + len(warmup))
        metric_names += [*_GAPS, *warmup]
        values += [_ratio(*output_sq[name]), _ratio(*local_sq[name]), *warmup.values()]
    if y_train is not None and y_eval is not None and y_train.shape == y_eval.shape:
        names.append(store.MODEL)
        metric_names.append("logits_gap")
        values.append(_ratio(_sq_norm(y_train - y_eval), _sq_norm(y_train)))
        if y_train.dim() >= 2:
            agree = y_train.argmax(dim=-1) == y_eval.argmax(dim=-1)
            names.append(store.MODEL)
            metric_names.append("pred_agreement")
            values.append(float(agree.double().mean().item()))
    if y_recal is not None and y_eval is not None and y_recal.shape == y_eval.shape:
        names.append(store.MODEL)
        metric_names.append("recal_logits_shift")
        values.append(_ratio(_sq_norm(y_recal - y_eval), _sq_norm(y_eval)))
        if y_eval.dim() >= 2:
            change = y_recal.argmax(dim=-1) != y_eval.argmax(dim=-1)
            names.append(store.MODEL)
            metric_names.append("recal_pred_change")
            values.append(float(change.double().mean().item()))
    return store.make_rows(
        step=step,
        epoch=epoch,
        stage="probe",
        rank=rank,
        layers=names,
        metrics=metric_names,
        values=values,
    )


def _sq_norm(t: Tensor) -> float:
    return float(t.detach().to(torch.float64).square().sum().item())


def _ratio(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff_sq / ref_sq); 0 when both are 0, inf when only the reference is 0, NaN when
    either is NaN (a NaN gap is never reported as 0)."""
    if math.isnan(diff_sq) or math.isnan(ref_sq):
        return math.nan
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf


def _own_forward_eval(bn: _BatchNorm, x: Tensor, state: passes.ModelState) -> Tensor:
    """The layer's own forward (a subclass's additions included) on ``x`` with its running
    statistics, called as ``bn.forward`` (no hooks re-entered); the layer goes back to the
    batch-statistics mode of the train pass. Its buffers are not written in eval mode."""
    track = dict((id(m), t) for m, t in state.track)[id(bn)]
    bn.training, bn.track_running_stats = False, track
    try:
        out = bn.forward(x)
    finally:
        bn.training, bn.track_running_stats = True, False
    if not isinstance(out, Tensor):
        raise TypeError(f"expected the BN layer to return a tensor, got {type(out).__name__}")
    return out


def _buffer_value(bn: _BatchNorm, name: str) -> int | None:
    buf = bn._buffers.get(name)
    return int(buf.item()) if buf is not None and buf.numel() == 1 else None


def _warmup_rows(bn: _BatchNorm, count: int | None, step: int) -> dict[str, float]:
    """``num_batches_tracked``, ``warmup_residual`` (initial buffers (0, 1) at n0 = 0 assumed)
    and ``running_invalid`` of a layer with running statistics."""
    assert bn.running_mean is not None and bn.running_var is not None
    n = count if count is not None else step
    m = bn.momentum
    r = float(n == 0) if m is None else (1.0 - float(m)) ** max(n, 0)
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    invalid = ~(torch.isfinite(mean) & torch.isfinite(var)) | (var < 0)
    return {
        "num_batches_tracked": float(n),
        "warmup_residual": min(max(r, 0.0), 1.0),
        "running_invalid": float(invalid.sum().item()),
    }
