"""The one-step producer trace: which module produced each BN layer's input.

:class:`ProducerTrace` gives ``input_bias`` and ``input_dropout`` on a traced step. For that
step only it registers one global module forward hook (``register_module_forward_hook``: the
one place that sees every module's output without a hook per module) that remembers, for each
tensor a module of the model returns, that module; the BN pre-hook then asks
:meth:`ProducerTrace.producer` about its input. The hook is removed at :meth:`stop`, which the
tap calls at every collect and detach, so it never outlives the step.

May import torch; no Lightning, no TensorBoard, no pandas, and nothing else of
:mod:`bnprobe.tap`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class ProducerTrace:
    """The producer of each tensor the modules of ``model`` return, while started."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._outputs: dict[int, tuple[weakref.ReferenceType[Tensor], nn.Module]] | None = None
        self._modules: set[int] = set()
        self._handle: RemovableHandle | None = None

    @property
    def running(self) -> bool:
        return self._outputs is not None

    def start(self) -> None:
        """Trace the forwards from now until :meth:`stop`."""
        self._modules = {id(m) for m in self.model.modules()}
        self._outputs = {}
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._record_output)

    def stop(self) -> None:
        """Remove the global hook and forget what was traced. Safe to call any number of times."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._outputs = None

    def _record_output(self, module: nn.Module, args: Any, output: Any) -> None:
        """Remember which module returned each tensor. A module with children (Sequential, a
        block) that returns a tensor one of its modules already returned does not replace it:
        forward hooks fire innermost first, so ``Sequential(conv, Dropout)`` leaves the Dropout
        as the producer. Leaf modules do replace (``ReLU(inplace=True)`` returns the conv's
        tensor, and it is the ReLU that feeds the next layer). Functional calls
        (``F.dropout``, ``x + bias``) are not modules and cannot be seen."""
        traced = self._outputs is not None and id(module) in self._modules
        if traced and isinstance(output, Tensor):
            assert self._outputs is not None
            if module._modules:
                entry = self._outputs.get(id(output))
                if entry is not None and entry[0]() is output:
                    return
            self._outputs[id(output)] = (weakref.ref(output), module)

    def producer(self, x: Tensor) -> tuple[float, float]:
        """(input_bias, input_dropout) of a BN input ``x``: whether the module that returned it
        is a Linear or convolution with a bias, and its dropout probability if it is a
        Dropout (0 for any other or unknown producer)."""
        assert self._outputs is not None
        entry = self._outputs.get(id(x))
        producer = entry[1] if entry is not None and entry[0]() is x else None
        bias = isinstance(producer, nn.Linear | nn.modules.conv._ConvNd) and (
            getattr(producer, "bias", None) is not None
        )
        p = producer.p if isinstance(producer, nn.modules.dropout._DropoutNd) else 0.0
        return (float(bias), float(p))
