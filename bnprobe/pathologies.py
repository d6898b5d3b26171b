"""The pathology zoo: induce one named BatchNorm problem on the demo, to see how bnprobe reports it.

``apply_pathology(name, module, datamodule)`` changes a fresh :class:`~bnprobe.demo.DemoModule`
and :class:`~bnprobe.demo.DemoDataModule` in place, before ``trainer.fit``::

    module, data = DemoModule(), DemoDataModule()
    apply_pathology("tf_momentum", module, data)
    trainer.fit(module, data)          # with BNProbe attached: probe.findings() names the problem

``PATHOLOGIES`` maps each name to a one-line description; ``EXPECTED`` to the finding kind and
the layer(s) it should be reported on. ``bnprobe demo --pathology NAME`` does the same from the
command line, and examples/pathologies.py walks through all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bnprobe.demo import DemoDataModule, DemoModule, DemoNet

PATHOLOGIES: dict[str, str] = {
    "shifted_val": "validation images shifted by +2 and scaled by 3: the running statistics do "
    "not fit the data eval sees",
    "tiny_batches": "training batches of 2 images (the training set shrinks so that an epoch "
    "keeps its number of steps)",
    "frozen_bn": "the second BN layer is kept in eval mode while the model trains",
    "dead_channels": "half the channels of the first BN layer get gamma = 0 and stay there",
    "variance_collapse": "the conv before the second BN layer is scaled by 1e-4 and frozen: "
    "its outputs have almost no variance",
    "tf_momentum": "momentum=0.99 on every BN layer (TensorFlow's convention, wrong in PyTorch)",
    "dropout_before_bn": "Dropout2d(p=0.3) between each conv and its BN layer",
    "nan_input": "one training image is NaN: the batch that holds it poisons the running stats",
    "bias_before_bn": "the convs before the BN layers have a bias, which BN cancels",
    "unused_layer": "a spare BatchNorm1d layer that forward() never calls",
    "no_running_stats": "the second BN layer is built with track_running_stats=False",
}
"""Every pathology by name, with a one-line description."""

FIRST_BN = "net.features.1"
SECOND_BN = "net.features.5"

EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "shifted_val": ("stale_running_stats", (FIRST_BN, SECOND_BN)),
    "tiny_batches": ("small_batch", (FIRST_BN, SECOND_BN)),
    "frozen_bn": ("frozen_bn", (SECOND_BN,)),
    "dead_channels": ("dead_channels", (FIRST_BN,)),
    "variance_collapse": ("variance_collapse", (SECOND_BN,)),
    "tf_momentum": ("suspicious_momentum", (FIRST_BN, SECOND_BN)),
    "dropout_before_bn": ("dropout_before_bn", ("net.features.2", "net.features.7")),
    "nan_input": ("nonfinite", (FIRST_BN, SECOND_BN)),
    "bias_before_bn": ("bias_before_bn", (FIRST_BN, SECOND_BN)),
    "unused_layer": ("unused_layer", ("net.spare_bn",)),
    "no_running_stats": ("no_running_stats", (SECOND_BN,)),
}
"""Per pathology: the finding kind bnprobe reports and every layer (qualified names in the
DemoModule) it reports it on. Shifted inputs and NaN reach both BN layers; the first one is where
they enter (the nonfinite finding names it as ``origin_layer``)."""


def apply_pathology(name: str, module: DemoModule, datamodule: DemoDataModule) -> None:
    """Induce the pathology ``name`` on a fresh demo module and data module, in place.

    Call it before ``trainer.fit``. Raises ``ValueError`` for an unknown name (the message
    lists the valid ones) and ``TypeError`` when the module is not a demo module with a
    :class:`~bnprobe.demo.DemoNet`.
    """
    if name not in _APPLY:
        valid = ", ".join(sorted(PATHOLOGIES))
        raise ValueError(f"unknown pathology {name!r}; choose one of: {valid}")
    if not isinstance(module, DemoModule) or not isinstance(module.net, DemoNet):
        raise TypeError(
            "apply_pathology needs a bnprobe.demo.DemoModule whose net is a DemoNet; "
            f"got {type(module).__name__} with net {type(getattr(module, 'net', None)).__name__}"
        )
    if not isinstance(datamodule, DemoDataModule):
        raise TypeError(
            f"apply_pathology needs a bnprobe.demo.DemoDataModule; got {type(datamodule).__name__}"
        )
    _APPLY[name](module, datamodule)


# -- one function per pathology ------------------------------------------------------------------


def _shifted_val(module: DemoModule, data: DemoDataModule) -> None:
    data.val_shift, data.val_scale = 2.0, 3.0
    data.val_set = None  # rebuilt by setup() with the shift


def _tiny_batches(module: DemoModule, data: DemoDataModule) -> None:
    steps = max(1, data.num_train // data.batch_size)
    data.batch_size, data.num_train = 2, 2 * steps
    data.train_set = None


class EvalOnlyBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode whatever ``train()`` asks (a frozen BN layer)."""

    def train(self, mode: bool = True) -> EvalOnlyBatchNorm2d:
        super().train(False)
        return self


def _frozen_bn(module: DemoModule, data: DemoDataModule) -> None:
    old = _bn(module, 5)
    frozen = EvalOnlyBatchNorm2d(old.num_features, momentum=old.momentum)
    frozen.load_state_dict(old.state_dict())
    frozen.eval()  # Lightning restores captured modes by attribute, bypassing train()
    _features(module)[5] = frozen


def _dead_channels(module: DemoModule, data: DemoDataModule) -> None:
    bn = _bn(module, 1)
    keep = torch.ones_like(bn.weight)
    keep[: bn.num_features // 2] = 0.0
    with torch.no_grad():
        bn.weight.mul_(keep)
    # no gradient for those channels: Adam leaves them at exactly 0
    bn.weight.register_hook(_masked(keep))  # type: ignore[no-untyped-call]


def _variance_collapse(module: DemoModule, data: DemoDataModule) -> None:
    conv = _features(module)[4]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected the demo's second conv at net.features.4, got {conv}")
    with torch.no_grad():
        conv.weight.mul_(1e-4)
    conv.weight.requires_grad_(False)


def _tf_momentum(module: DemoModule, data: DemoDataModule) -> None:
    for m in module.net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.99


def _dropout_before_bn(module: DemoModule, data: DemoDataModule) -> None:
    module.net = DemoNet(dropout=0.3)


def _nan_input(module: DemoModule, data: DemoDataModule) -> None:
    data.setup("fit")
    images = getattr(data.train_set, "images", None)
    if not isinstance(images, Tensor):
        raise TypeError("expected the demo's SyntheticImages training set")
    images[len(images) // 2] = math.nan


def _bias_before_bn(module: DemoModule, data: DemoDataModule) -> None:
    module.net = DemoNet(conv_bias=True)


def _unused_layer(module: DemoModule, data: DemoDataModule) -> None:
    module.net.spare_bn = nn.BatchNorm1d(10)  # defined, never called by DemoNet.forward


def _no_running_stats(module: DemoModule, data: DemoDataModule) -> None:
    old = _bn(module, 5)
    _features(module)[5] = nn.BatchNorm2d(old.num_features, track_running_stats=False)


def _features(module: DemoModule) -> nn.Sequential:
    features = module.net.features
    if not isinstance(features, nn.Sequential):
        raise TypeError(f"expected the demo's net.features to be nn.Sequential, got {features}")
    return features


def _bn(module: DemoModule, index: int) -> nn.BatchNorm2d:
    bn = _features(module)[index]
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"expected a BatchNorm2d at net.features.{index}, got {bn}")
    return bn


def _masked(mask: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        return grad * mask

    return hook


_APPLY: dict[str, Callable[[DemoModule, DemoDataModule], None]] = {
    "shifted_val": _shifted_val,
    "tiny_batches": _tiny_batches,
    "frozen_bn": _frozen_bn,
    "dead_channels": _dead_channels,
    "variance_collapse": _variance_collapse,
    "tf_momentum": _tf_momentum,
    "dropout_before_bn": _dropout_before_bn,
    "nan_input": _nan_input,
    "bias_before_bn": _bias_before_bn,
    "unused_layer": _unused_layer,
    "no_running_stats": _no_running_stats,
}

__all__ = ["EXPECTED", "PATHOLOGIES", "EvalOnlyBatchNorm2d", "apply_pathology"]
