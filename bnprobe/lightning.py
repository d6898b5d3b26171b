"""``BNProbe`` for users of the ``lightning`` package (``import lightning.pytorch as L``).

``bnprobe.BNProbe`` is a ``pytorch_lightning.Callback``; a ``lightning.pytorch.Trainer`` only
accepts ``lightning.pytorch.Callback`` instances, so use this class there::

    from bnprobe.lightning import BNProbe
    trainer = lightning.pytorch.Trainer(callbacks=[BNProbe()])

Same options, same behaviour: the logic lives in :class:`bnprobe.callback.BNProbeBase`; this
module only names ``lightning.pytorch``'s ``Callback`` and ``TensorBoardLogger`` (the logger class
whose ``SummaryWriter`` the probe writes into). It and :mod:`bnprobe.callback` are the only modules
that import Lightning.
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "bnprobe.lightning needs the `lightning` package, which is not installed: "
        "`pip install lightning`. With `pytorch_lightning` use `from bnprobe import BNProbe`."
    ) from err

from lightning.pytorch.loggers import TensorBoardLogger

from bnprobe.callback import BNProbeBase


class BNProbe(BNProbeBase, Callback):  # type: ignore[misc]
    __doc__ = BNProbeBase.__doc__
    _tensorboard_logger = TensorBoardLogger


__all__ = ["BNProbe"]
