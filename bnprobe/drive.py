"""What both drivers (the Lightning callback and the plain loop) do around the tap, beyond
stepping it: the train/eval probe with the tap paused, the check that the hooks ran at all, and
the world size a layer's statistics are synced over.

It may not import Lightning, and it writes nothing: the driver hands what it returns to its
:class:`~bnprobe.recorder.Recorder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bnprobe.tap import BNTap, LayerSelection, Snapshot

RECAL_HELD = 3
"""Validation batches (the first of each epoch) that the probe also re-estimates the running
statistics on for ``recal_pred_change``/``recal_logits_shift`` (docs/mismatch.md)."""


def probe(
    tap: BNTap,
    model: nn.Module,
    layers: LayerSelection,
    batch: Any,
    held: Sequence[Any],
    step: int,
    epoch: int,
    rank: int = 0,
) -> Snapshot:
    """The train/eval probe (:func:`bnprobe.check_mismatch`, stage ``probe``) of the ``layers``
    the tap was made with, on ``batch``, with
    ``held`` batches for the running-statistics re-estimate, as a snapshot. The tap is paused
    meanwhile: the probe's forwards are not data. Called after validation, with the model in
    eval mode, so the tap's frozen layers are passed on."""
    from bnprobe.mismatch import check_mismatch

    paused, tap.active = tap.active, False
    try:
        rows = check_mismatch(
            model,
            batch,
            layers=layers,
            step=step,
            epoch=epoch,
            rank=rank,
            recal_batches=list(held),
            frozen=tap.frozen_layers(),
        )
    finally:
        tap.active = paused
    return Snapshot([rows])


def check_hooks_fired(tap: BNTap, pl_module: nn.Module, warn: Callable[[str], None]) -> None:
    """Warn when no BN hook ran in a measured training step although the model has BN layers:
    the usual cause is a module compiled (and run once) before the probe registered its hooks,
    whose compiled code dynamo keeps reusing without them."""
    live = [layer for layer in tap.layers if not layer.failed]
    if not live or any(layer.calls for layer in live):
        return
    compiled = [
        name or type(pl_module).__name__
        for name, m in pl_module.named_modules()
        if type(m).__name__ == "OptimizedModule" or getattr(m, "_compiler_ctx", None)
    ]
    where = f" ({', '.join(compiled)} is torch.compile'd)" if compiled else ""
    warn(
        "BNProbe: no BatchNorm layer ran its forward in the first measured training step, so "
        f"nothing is measured{where}. If part of the model was compiled with torch.compile and "
        "called before BNProbe registered its hooks (at fit start), dynamo reuses the compiled "
        "code without them. Compile after the probe attached: pass the compiled module to "
        "trainer.fit, compile inside LightningModule.configure_model, or call "
        "torch._dynamo.reset() before trainer.fit; or set "
        "torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling so that dynamo "
        "recompiles when hooks are added. If the BN layers are simply not used in "
        "training_step, this warning is expected."
    )


def sync_world_size(module: nn.Module) -> int:
    group = getattr(module, "process_group", None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size(group))
    return 1


__all__ = ["RECAL_HELD", "check_hooks_fired", "probe", "sync_world_size"]
