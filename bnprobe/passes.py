"""Running a model outside training without changing it: the shared machinery of
:func:`bnprobe.check_mismatch` and :func:`bnprobe.recalibrate` (no Lightning).

Owns: capturing and restoring everything a pass may change (:class:`ModelState`), switching BN
layers between batch and running statistics (:func:`set_modes`), finding and selecting the BN
layers (and the frozen ones), moving a batch to the model's device and running one forward.
Imports torch and :mod:`bnprobe.tap` (layer selection) only: no pandas, no Lightning, no sinks.

How a BN layer is made to use batch statistics without touching its buffers
---------------------------------------------------------------------------
Both functions put a BN layer in training mode *and* set ``track_running_stats = False`` for the
duration. ``_BatchNorm.forward`` then passes ``None`` for the running buffers to
``F.batch_norm``: the layer normalizes with the batch moments and nothing is written, not even
``num_batches_tracked``. The usual alternative, ``momentum = 0``, still increments
``num_batches_tracked`` and computes ``0 * batch_moment``, which is NaN when the batch moment is
inf. As a second line of defence every buffer of the model is cloned first and restored, bit for
bit and as the same tensor object, in ``finally``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from bnprobe.tap import LayerSelection, find_layers

FrozenSelection: TypeAlias = Literal["auto"] | bool | LayerSelection
"""Which BN layers keep their running statistics: ``"auto"`` (those in eval mode while the model
is in training mode), ``False`` (none), or names, glob patterns or a predicate as for ``layers``."""

ForwardFn: TypeAlias = Callable[[nn.Module, Any], Any]
"""``forward_fn(model, batch)`` runs the model on one batch (already moved to its device)."""


@dataclass
class ModelState:
    """Everything the probe may change, captured so that ``restore`` puts it back exactly."""

    training: list[tuple[nn.Module, bool]]
    track: list[tuple[_BatchNorm, bool]]
    momentum: list[tuple[_BatchNorm, float | None]]
    buffers: list[tuple[nn.Module, str, Tensor, Tensor]]  # owner, name, original object, copy
    cpu_rng: Tensor
    cuda_rng: list[Tensor] | None

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        modules = list(model.modules())
        buffers = []
        for mod in modules:
            for bname, buf in mod._buffers.items():
                if buf is not None:
                    buffers.append((mod, bname, buf, buf.detach().clone()))
        cuda_on = bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]
        cuda_rng = torch.cuda.get_rng_state_all() if cuda_on else None
        return cls(
            training=[(m, m.training) for m in modules],
            track=[(m, m.track_running_stats) for m in modules if isinstance(m, _BatchNorm)],
            momentum=[(m, m.momentum) for m in modules if isinstance(m, _BatchNorm)],
            buffers=buffers,
            cpu_rng=torch.get_rng_state(),
            cuda_rng=cuda_rng,
        )

    def restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def restore(self) -> None:
        with torch.no_grad():
            for mod, bname, original, copy in self.buffers:
                mod._buffers[bname] = original
                original.copy_(copy)
        for mod, flag in self.training:
            mod.training = flag
        for bn, track in self.track:
            bn.track_running_stats = track
        for bn, momentum in self.momentum:
            bn.momentum = momentum
        self.restore_rng()


def set_modes(
    state: ModelState,
    bns: dict[str, _BatchNorm],
    *,
    bn_batch_stats: bool,
    frozen: Collection[str] = (),
) -> None:
    """Non-BN modules to eval; BN layers to batch stats without updates, or to running stats.

    Layers named in ``frozen`` normalize with their running statistics in both cases.
    """
    for mod, _ in state.training:
        mod.training = False
    frozen_modules = {id(bns[n]) for n in frozen if n in bns}
    for bn, track in state.track:
        if bn_batch_stats and id(bn) not in frozen_modules:
            bn.training = True
            bn.track_running_stats = False  # forward then passes no buffers: nothing is updated
        else:
            bn.training = False
            bn.track_running_stats = track


def remove_handles(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()  # idempotent
    handles.clear()


def all_batchnorm(model: nn.Module, who: str) -> dict[str, _BatchNorm]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not bns:
        raise ValueError(
            f"no BatchNorm layer in the model; {who} needs at least one instance of "
            "torch.nn.modules.batchnorm._BatchNorm (BatchNorm1d/2d/3d, SyncBatchNorm, "
            "lazy variants)"
        )
    for name, bn in bns.items():
        if any(is_lazy(t) for t in (*bn.parameters(recurse=False), *bn.buffers(recurse=False))):
            raise ValueError(
                f"{who}: BatchNorm layer {name!r} is lazy and not initialized yet; "
                "run one forward pass on real data first"
            )
    return bns


def select_layers(model: nn.Module, layers: LayerSelection) -> dict[str, _BatchNorm]:
    """The BN layers ``layers`` selects: names, glob patterns or a predicate (``find_layers``)."""
    return find_layers(model, layers)


def has_running_stats(bn: _BatchNorm) -> bool:
    return bool(bn.track_running_stats) and (
        bn.running_mean is not None and bn.running_var is not None
    )


def model_input(batch: Any, who: str) -> Any:
    """A tuple/list batch is ``(input, target, ...)``: its first element; anything else as is."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(f"{who}: got an empty {type(batch).__name__} as batch")
        return batch[0]
    return batch


def model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def describe(obj: Any, depth: int = 0) -> str:
    if isinstance(obj, Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={obj.dtype}, device={obj.device})"
    if depth < 2 and isinstance(obj, (tuple, list)):
        inner = ", ".join(describe(v, depth + 1) for v in list(obj)[:4])
        more = ", ..." if len(obj) > 4 else ""
        return f"{type(obj).__name__} of {len(obj)} [{inner}{more}]"
    if depth < 2 and isinstance(obj, dict):
        return f"dict with keys {list(obj)[:8]}"
    return type(obj).__name__


def frozen_layers(
    model: nn.Module, bns: dict[str, _BatchNorm], frozen: object, who: str
) -> set[str]:
    """Names of the BN layers that keep their running statistics (see :func:`recalibrate`)."""
    if frozen is False or frozen is None:
        return set()
    if frozen is True:
        raise ValueError(
            f'{who}: frozen must be "auto", False, or layer names, glob patterns or a predicate; '
            "got True"
        )
    if frozen == "auto":
        if not model.training:
            return set()
        return {n for n, m in bns.items() if not m.training and has_running_stats(m)}
    return set(select_layers(model, frozen))  # type: ignore[arg-type]


def forward(
    model: nn.Module,
    batch: Any,
    device: torch.device | None,
    forward_fn: ForwardFn | None,
    who: str,
    index: int | None = None,
) -> Any:
    """Run the model on one batch: ``forward_fn(model, batch)``, or the model on its input."""
    if forward_fn is None:
        return run_batch(model, to_device(model_input(batch, who), device), batch, who, index)
    try:
        return forward_fn(model, to_device(batch, device))
    except Exception as exc:
        which = "the batch" if index is None else f"batch {index}"
        raise ValueError(
            f"{who}: forward_fn failed on {which}: {type(exc).__name__}: {exc}. It got "
            f"{describe(batch)}; forward_fn(model, batch) must run the model on one batch."
        ) from exc


def run_batch(model: nn.Module, inp: Any, batch: Any, who: str, index: int | None = None) -> Any:
    try:
        return model(inp)
    except Exception as exc:
        which = "the batch" if index is None else f"batch {index}"
        unpack = (
            f" (a {type(batch).__name__} batch is taken as (input, target, ...), so the model "
            f"got its first element: {describe(inp)})"
            if isinstance(batch, (tuple, list))
            else ""
        )
        raise ValueError(
            f"{who} could not run the model on {which}: {type(exc).__name__}: {exc}. "
            f"It got {describe(batch)}{unpack}. Pass what the model's forward takes: the input "
            "tensor itself, or a tuple/list whose first element is the input."
        ) from exc


def first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            t = first_tensor(v)
            if t is not None:
                return t
    return None
