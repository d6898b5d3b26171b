"""Which BN layers the tap measures, and what it keeps of each one between steps.

Owns :func:`find_layers` (layer selection), :class:`LayerState` (one layer's measurement state,
written by the hooks and read by packing and row building), the buffer readers the hooks use,
and the drift references: gamma_0, beta_0 and the initial running buffers that ``gamma_drift``,
``beta_drift``, ``warmup_residual`` and the ``*_excess`` metrics compare against, with their
checkpoint form (:func:`saved_references`, :func:`restore_references`).

May import torch and :mod:`bnprobe.stats`; no Lightning, no TensorBoard, no pandas, and nothing
else of :mod:`bnprobe.tap`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from bnprobe import stats

if TYPE_CHECKING:
    from bnprobe.tap.packing import Layout

LayerSelection: TypeAlias = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
"""``None`` (every BN layer), a name or glob pattern, a list of them, or a predicate
``(name, module) -> bool``."""

ROOT = "<root>"
"""Layer name used when the model itself is a BN layer (``named_modules`` names it '')."""


def find_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, _BatchNorm]:
    """The BN layers of ``model`` selected by ``layers``, by qualified name, in module order.

    Every instance of ``torch.nn.modules.batchnorm._BatchNorm`` counts: BatchNorm1d/2d/3d,
    SyncBatchNorm, the lazy variants and user subclasses. Names and glob patterns
    (``"encoder.*.bn1"``) that match no BN layer raise ``ValueError`` naming them.
    """
    found = {(name or ROOT): m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if layers is None:
        return found
    if callable(layers):
        return {name: m for name, m in found.items() if layers(name, m)}
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"layers must hold layer names or glob patterns (str); got {pattern!r} "
                f"of type {type(pattern).__name__}"
            )
        hits = {name for name in found if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            known = ", ".join(found) or "none"
            raise ValueError(
                f"layers={pattern!r} matches no BatchNorm layer of the model. "
                f"Its BatchNorm layers are: {known}. Use one of these names or a glob pattern."
            )
        chosen |= hits
    return {name: m for name, m in found.items() if name in chosen}


@dataclass(eq=False)
class LayerState:
    """One measured BN layer: what its hooks recorded this step, and its references."""

    name: str
    module: _BatchNorm
    gamma0: Tensor | None = None
    beta0: Tensor | None = None
    calls: int = 0
    failed: bool = False
    layout: Layout | None = None
    """Set by the first forward of a measured step."""
    before: Tensor | None = None
    """cat(running_mean, running_var, num_batches_tracked, gamma, beta) (those the layer has) as
    that forward found them, copied by the pre-hook: only for a layer that :attr:`snapped`
    does not hold."""
    snapped: Snapped | None = None
    """Where the snapshot of every layer, taken at the step's first BN forward, holds what
    :attr:`before` would (the usual case)."""
    after: Tensor | None = None
    """``recovered``: cat(running_mean, running_var) after the first forward, taken by a second
    one (shared layer, activation checkpointing), else read at collect. Otherwise the batch
    moments cat(mu_B, var_B)."""
    modes: tuple[bool, bool] = (False, False)
    """(layer in training mode, model in training mode) at that forward."""
    frozen: bool = False
    """At its last measured training forward the layer was in eval mode while the model was in
    training mode (a frozen BN layer, as in fine-tuning)."""
    batch_size: float = 0.0
    producer: tuple[float, float] | None = None
    """(input_bias, input_dropout) of a traced step."""
    pooled: stats.Moments | None = None
    initial: Tensor | None = None
    """cat(running_mean, running_var[, num_batches_tracked]) when the tap first saw the layer:
    the warm-up reference (``warmup_residual``, ``*_excess``)."""
    suspect: bool = True
    """Compute the batch moments directly at the next measured step, as recovering them from
    the update would not be accurate (true until a measured step shows otherwise)."""
    facts: tuple[tuple[Any, ...], Layout, Tensor | None] | None = None
    """(key, layout, :attr:`initial`) of the last first forward whose blocks the step's
    snapshot held: the next one reuses that layout while its key and :attr:`initial` are the
    same (see ``BNTap._before``). Kept across steps, like :attr:`modes`."""

    def new_step(self) -> None:
        """Forget what the previous measured step recorded (references and flags stay)."""
        self.calls, self.layout, self.before, self.after = 0, None, None, None
        self.producer, self.pooled, self.snapped = None, None, None

    def has_initial(self, channels: int, tracked: bool) -> bool:
        """Whether the warm-up reference fits a layout of ``channels`` (2 C values, + 1 if
        tracked)."""
        init = self.initial
        return init is not None and init.numel() == 2 * channels + int(tracked)


class Snapped(NamedTuple):
    """A layer's place in the step's snapshot: which blocks it holds (running_mean and
    running_var, num_batches_tracked, gamma and beta), in group ``group`` (one per device and
    dtype) at ``offset`` of its values and ``count_at`` of its update counts (-1: none)."""

    running: bool
    tracked: bool
    affine: bool
    group: int
    offset: int
    count_at: int


def running_buffers(m: _BatchNorm) -> list[Tensor]:
    """[running_mean, running_var] of a BN layer, or [] without running statistics (read from
    its buffer dict: ``Module.__getattr__`` costs ~0.5 us a call, and a hook reads them often)."""
    buffers = m._buffers
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    return [mean, var] if mean is not None and var is not None else []


def tracked_buffer(m: _BatchNorm) -> list[Tensor]:
    """[num_batches_tracked viewed as 1 value] of a BN layer, or [] without that buffer."""
    nbt = m._buffers.get("num_batches_tracked")
    return [nbt.view(1)] if nbt is not None else []


def tensor_input(x: Any) -> Tensor:
    """The BN layer's input, which must be a tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the BN input to be a tensor, got {type(x).__name__}")
    return x


# -- drift references ---------------------------------------------------------------------------
def take_reference(layer: LayerState) -> None:
    """Take gamma_0 and beta_0 (the drift reference) and the initial running buffers (the
    warm-up reference) once the layer is initialized."""
    m = layer.module
    running = running_buffers(m)
    if layer.initial is None and running and not any(is_lazy(t) for t in running):
        layer.initial = torch.cat([*running, *tracked_buffer(m)])
    if layer.gamma0 is not None or not m.affine or is_lazy(m.weight):
        return
    layer.gamma0 = m.weight.detach().clone()
    layer.beta0 = m.bias.detach().clone()


def saved_references(layers: Sequence[LayerState]) -> dict[str, dict[str, Tensor]]:
    """gamma_0, beta_0, the initial running buffers and whether the next measured step computes
    the moments directly, of each layer, on the CPU (for checkpoints)."""
    out: dict[str, dict[str, Tensor]] = {}
    for layer in layers:
        refs = {}
        if layer.gamma0 is not None and layer.beta0 is not None:
            refs = {"gamma0": layer.gamma0.cpu(), "beta0": layer.beta0.cpu()}
        if layer.initial is not None:
            refs["initial"] = layer.initial.cpu()
        refs["suspect"] = torch.tensor(layer.suspect)  # a resumed run measures as this one
        if refs:
            out[layer.name] = refs
    return out


def restore_references(layers: Sequence[LayerState], refs: dict[str, dict[str, Tensor]]) -> None:
    """Restore what :func:`saved_references` saved (resumed runs keep drifting from the
    original reference)."""
    for layer in layers:
        saved = refs.get(layer.name)
        if saved is None:
            continue
        if "suspect" in saved:
            layer.suspect = bool(saved["suspect"])
        running = running_buffers(layer.module)
        if "initial" in saved and running:
            layer.initial = saved["initial"].to(running[0].device)
        if "gamma0" not in saved:
            continue
        device = layer.module.weight.device if layer.module.affine else None
        layer.gamma0 = saved["gamma0"].to(device)
        layer.beta0 = saved["beta0"].to(device)
