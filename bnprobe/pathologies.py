"""The pathology zoo: one registry of BatchNorm problems induced on the demo, and what bnprobe
reports for each.

Owns :data:`PATHOLOGIES`, the one list used by ``bnprobe demo --pathology NAME`` (and
``--list``), by examples/pathologies.py and by tests/test_pathologies.py. Each entry
(:class:`Pathology`) has a name, a one-line description, the code that induces it on a fresh
:class:`~bnprobe.demo.DemoModule` and :class:`~bnprobe.demo.DemoDataModule` (``induce``), how many
training steps it needs to show, and every finding (kind, severity, layers) that a real run of
:func:`fit` reports; the first is the one the pathology is about::

    module, data = DemoModule(), DemoDataModule()
    apply_pathology("tf_momentum", module, data)
    trainer.fit(module, data)          # with BNProbe attached: probe.findings() names the problem

    df = fit("tf_momentum")            # or all of it: the run the tests check, as a table

May import the demo, the callback (to train) and the diagnosis types. Nothing in the core (tap,
store, recorder, TensorBoard, diagnosis) imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from bnprobe.demo import DemoDataModule, DemoModule, DemoNet
from bnprobe.diagnosis import Kind, Severity

if TYPE_CHECKING:
    import pandas as pd

Induce = Callable[[DemoModule, DemoDataModule], None]

FIRST_BN = "net.features.1"
SECOND_BN = "net.features.5"
MODEL = "<model>"
"""The whole-model pseudo-layer of findings about the model's output (``store.MODEL``)."""

BATCH = 16
"""Images per training batch in :func:`fit`."""
SHORT_STEPS = 6
"""Training steps of :func:`fit` for the structural problems (frozen_bn needs 3 logged steps)."""
WARM_STEPS = 30
"""Training steps of :func:`fit` where the running statistics must first warm up:
(1 - 0.1) ** 30 = 4% of the initial statistics are left."""


@dataclass(frozen=True)
class Expected:
    """One finding a pathology's run reports: its kind and severity, on exactly these layers."""

    kind: Kind
    severity: Severity
    layers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind} ({self.severity}) on {', '.join(self.layers)}"


@dataclass(frozen=True)
class Pathology:
    """One BatchNorm problem induced on the demo.

    ``induce(module, data)`` changes a fresh demo module and data module in place, before
    ``trainer.fit``. ``steps`` is how many training steps :func:`fit` trains for it to show.
    ``expected`` is every finding of severity info or worse that :func:`fit` gives, the one the
    pathology is about first (:attr:`finding`); the others are its consequences (a frozen layer's
    statistics go stale, a shifted validation set moves the model's outputs).
    """

    name: str
    description: str
    induce: Induce
    expected: tuple[Expected, ...]
    steps: int = SHORT_STEPS

    @property
    def finding(self) -> Expected:
        """The finding this pathology is about."""
        return self.expected[0]


# -- how each one is induced ---------------------------------------------------------------------


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


# -- the registry --------------------------------------------------------------------------------

_INFO, _WARNING, _ERROR = Severity.INFO, Severity.WARNING, Severity.ERROR
_BOTH = (FIRST_BN, SECOND_BN)

_ENTRIES = (
    Pathology(
        "shifted_val",
        "validation images shifted by +2 and scaled by 3: the running statistics do not fit "
        "the data eval sees",
        _shifted_val,
        (
            Expected(Kind.STALE_RUNNING_STATS, _WARNING, _BOTH),
            # where the shifted inputs enter, and the model's outputs
            Expected(Kind.TRAIN_EVAL_GAP, _WARNING, (MODEL, FIRST_BN)),
        ),
        steps=WARM_STEPS,
    ),
    Pathology(
        "tiny_batches",
        "training batches of 2 images (the training set shrinks so that an epoch keeps its "
        "number of steps)",
        _tiny_batches,
        (Expected(Kind.SMALL_BATCH, _WARNING, _BOTH),),
    ),
    Pathology(
        "frozen_bn",
        "the second BN layer is kept in eval mode while the model trains",
        _frozen_bn,
        (
            Expected(Kind.FROZEN_BN, _WARNING, (SECOND_BN,)),
            Expected(Kind.STALE_RUNNING_STATS, _WARNING, (SECOND_BN,)),  # its stats never move
        ),
    ),
    Pathology(
        "dead_channels",
        "half the channels of the first BN layer get gamma = 0 and stay there",
        _dead_channels,
        (Expected(Kind.DEAD_CHANNELS, _WARNING, (FIRST_BN,)),),
    ),
    Pathology(
        "variance_collapse",
        "the conv before the second BN layer is scaled by 1e-4 and frozen: its outputs have "
        "almost no variance",
        _variance_collapse,
        (
            Expected(Kind.VARIANCE_COLLAPSE, _WARNING, (SECOND_BN,)),
            Expected(Kind.TRAIN_EVAL_GAP, _WARNING, (MODEL,)),  # noise blown up differently
        ),
    ),
    Pathology(
        "tf_momentum",
        "momentum=0.99 on every BN layer (TensorFlow's convention, wrong in PyTorch)",
        _tf_momentum,
        (Expected(Kind.SUSPICIOUS_MOMENTUM, _WARNING, _BOTH),),
    ),
    Pathology(
        "dropout_before_bn",
        "Dropout2d(p=0.3) between each conv and its BN layer",
        _dropout_before_bn,
        # the BN layers sit one index later in the net with dropout
        (Expected(Kind.DROPOUT_BEFORE_BN, _WARNING, ("net.features.2", "net.features.7")),),
    ),
    Pathology(
        "nan_input",
        "one training image is NaN: the batch that holds it poisons the running stats",
        _nan_input,
        # NaN reaches both layers; the first is where it enters (the finding's origin_layer)
        (Expected(Kind.NONFINITE, _ERROR, _BOTH),),
    ),
    Pathology(
        "bias_before_bn",
        "the convs before the BN layers have a bias, which BN cancels",
        _bias_before_bn,
        (Expected(Kind.BIAS_BEFORE_BN, _INFO, _BOTH),),
    ),
    Pathology(
        "unused_layer",
        "a spare BatchNorm1d layer that forward() never calls",
        _unused_layer,
        (Expected(Kind.UNUSED_LAYER, _WARNING, ("net.spare_bn",)),),
    ),
    Pathology(
        "no_running_stats",
        "the second BN layer is built with track_running_stats=False",
        _no_running_stats,
        (Expected(Kind.NO_RUNNING_STATS, _INFO, (SECOND_BN,)),),
    ),
)

PATHOLOGIES: Mapping[str, Pathology] = MappingProxyType({p.name: p for p in _ENTRIES})
"""Every pathology by name, in the order above."""


def get(name: str) -> Pathology:
    """The pathology ``name``; ``ValueError`` naming the valid ones for any other name."""
    try:
        return PATHOLOGIES[name]
    except KeyError:
        valid = ", ".join(sorted(PATHOLOGIES))
        raise ValueError(f"unknown pathology {name!r}; choose one of: {valid}") from None


def apply_pathology(name: str, module: DemoModule, datamodule: DemoDataModule) -> None:
    """Induce the pathology ``name`` on a fresh demo module and data module, in place.

    Call it before ``trainer.fit``. Raises ``ValueError`` for an unknown name (the message
    lists the valid ones) and ``TypeError`` when the module is not a demo module with a
    :class:`~bnprobe.demo.DemoNet`.
    """
    pathology = get(name)
    if not isinstance(module, DemoModule) or not isinstance(module.net, DemoNet):
        raise TypeError(
            "apply_pathology needs a bnprobe.demo.DemoModule whose net is a DemoNet; "
            f"got {type(module).__name__} with net {type(getattr(module, 'net', None)).__name__}"
        )
    if not isinstance(datamodule, DemoDataModule):
        raise TypeError(
            f"apply_pathology needs a bnprobe.demo.DemoDataModule; got {type(datamodule).__name__}"
        )
    pathology.induce(module, datamodule)


def fit(name: str | None, steps: int | None = None, root: str | Path = ".") -> pd.DataFrame:
    """Train the demo with the pathology ``name`` (None: healthy) and return bnprobe's table.

    One epoch of ``steps`` training steps (default: the pathology's own, :attr:`Pathology.steps`;
    :data:`WARM_STEPS` for the healthy demo) of :data:`BATCH` images, every step measured, then
    one validation epoch of 64 images and the train/eval probe; seeded, so the same call gives
    the same table. Nothing is written (``root`` is Lightning's ``default_root_dir``). This is
    the run whose findings ``expected`` lists.
    """
    from bnprobe.callback import BNProbe

    if steps is None:
        steps = get(name).steps if name is not None else WARM_STEPS
    pl.seed_everything(0, verbose=False)
    module = DemoModule()
    data = DemoDataModule(batch_size=BATCH, num_train=steps * BATCH, num_val=64)
    if name is not None:
        apply_pathology(name, module, data)
    probe = BNProbe(every_n_steps=1, save_dir=False, histograms=False, summary=False)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return probe.to_dataframe()


__all__ = [
    "BATCH",
    "PATHOLOGIES",
    "SHORT_STEPS",
    "WARM_STEPS",
    "EvalOnlyBatchNorm2d",
    "Expected",
    "Pathology",
    "apply_pathology",
    "fit",
    "get",
]
