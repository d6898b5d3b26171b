"""bnprobe: watch every BatchNorm layer while a model trains.

``from bnprobe import BNProbe`` and add it to ``Trainer(callbacks=[...])``; in a plain PyTorch loop,
``with bnprobe.watch(model, log_dir) as probe:`` and ``with probe.step(step, epoch):`` around each
step (:mod:`bnprobe.loop`). Both drive the same core: :class:`BNTap` measures, :class:`Recorder`
writes the store, TensorBoard and loggers. Names are imported on
first use, so ``import bnprobe`` stays fast and loads Lightning only when the callback is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The diagnosis lives in the package ``bnprobe.diagnosis``, so ``bnprobe.diagnose`` is the function
# and no submodule can shadow it. Imported eagerly (cheap: pandas).
from bnprobe.diagnosis import Finding, Kind, Severity, Thresholds, diagnose

_EXPORTS = {
    "BNProbe": "bnprobe.callback",
    "BNTap": "bnprobe.tap",
    "Recorder": "bnprobe.recorder",
    "Watcher": "bnprobe.loop",
    "watch": "bnprobe.loop",
    "check_mismatch": "bnprobe.mismatch",
    "recalibrate": "bnprobe.recalibration",
    "load": "bnprobe.store",
    "read_tensorboard": "bnprobe.tensorboard",
}

__all__ = [
    "BNProbe",
    "BNTap",
    "Finding",
    "Kind",
    "Recorder",
    "Severity",
    "Thresholds",
    "Watcher",
    "check_mismatch",
    "diagnose",
    "load",
    "read_tensorboard",
    "recalibrate",
    "watch",
]

if TYPE_CHECKING:
    from bnprobe.callback import BNProbe
    from bnprobe.loop import Watcher, watch
    from bnprobe.mismatch import check_mismatch
    from bnprobe.recalibration import recalibrate
    from bnprobe.recorder import Recorder
    from bnprobe.store import load
    from bnprobe.tap import BNTap
    from bnprobe.tensorboard import read_tensorboard


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
