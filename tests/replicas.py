"""Plain-torch replicas of real-world BatchNorm patterns, small enough to train in seconds on CPU.

Each replica copies the pattern that matters from the real model (init, BN hyper-parameters,
module structure), not its size. torchvision and timm cannot be imported here, so the patterns
are rebuilt:

- :class:`ZeroInitResNet`: torchvision ``zero_init_residual=True`` / timm ``zero_init_last``:
  the last BN of every residual block starts with gamma = 0.
- :class:`DepthwiseNet`: MobileNetV2/V3-style inverted residual blocks (1x1 expand, depthwise
  3x3, 1x1 project) with torchvision's init (``kaiming_normal_(mode="fan_out")`` on every conv,
  the depthwise ones included, whose fan_out is C·9, so their outputs have variance ~2/C of their
  inputs) and BN ``eps=1e-3, momentum=0.01``.
- :class:`BatchNormAct2d` (timm's fused BN + activation, a ``BatchNorm2d`` subclass) and
  :class:`FusedNet` whose first BN layer is one.
- :class:`WrappedDropoutNet`: ``Sequential(conv, Dropout(0.3))`` feeding a BN, and a biased
  conv inside a ``Sequential`` feeding another BN.
- :class:`Raw255Net` with :func:`raw255_data`: un-normalized 0..255 inputs; conv -> ReLU -> BN, and
  one ReLU channel that dies at a given step (its BN input is then exactly 0, batch variance 0,
  while the running variance is in the hundreds and decays).
- :class:`FrozenBNFinetune`: a "pretrained" backbone whose BN layers stay in eval mode while a
  head trains (``train()`` is overridden, as detectron2/mmdet-style fine-tuning does).

:class:`ReplicaModule` wraps any of them as a 4-class classifier; :func:`fit` runs a tiny real
``Trainer`` in a temporary folder and returns what it made.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

CLASSES = 4


# -- init helpers ---------------------------------------------------------------------------------
def torchvision_init(model: nn.Module) -> None:
    """torchvision's ResNet/MobileNet init: kaiming_normal_(fan_out) convs, BN (1, 0), linear
    N(0, 0.01). ``fan_out`` of a depthwise conv (weight C x 1 x 3 x 3) is C·9."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# -- zero-init residual ResNet --------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock without downsampling: conv-BN-ReLU-conv-BN, + identity, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x
        return F.relu(out, inplace=True)


class ZeroInitResNet(nn.Module):
    """Stem + two BasicBlocks; every block's ``bn2`` starts with gamma = 0 (``zero_init``)."""

    def __init__(self, c: int = 16, blocks: int = 2, zero_init: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(*(BasicBlock(c) for _ in range(blocks)))
        self.fc = nn.Linear(c, CLASSES)
        torchvision_init(self)
        if zero_init:
            for block in self.layer1:
                assert isinstance(block, BasicBlock)
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer1(x)
        return self.fc(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


# -- depthwise inverted residual net --------------------------------------------------------------
def conv_bn(
    c_in: int, c_out: int, k: int, *, groups: int = 1, act: bool = True, stride: int = 1
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with MobileNetV3's BN (eps 1e-3, momentum 0.01)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int) -> None:
        super().__init__()
        self.use_res = c_in == c_out
        self.block = nn.Sequential(
            conv_bn(c_in, hidden, 1),  # expand
            conv_bn(hidden, hidden, 3, groups=hidden),  # depthwise
            conv_bn(hidden, c_out, 1, act=False),  # project
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.block(x)
        return out + x if self.use_res else out


class DepthwiseNet(nn.Module):
    """Stem (stride 2) + two inverted residual blocks + pooled linear head, torchvision init.

    The depthwise BN inputs have variance ~2/hidden of their inputs' second moment (a few 1e-3
    against eps 1e-3), as in stock MobileNetV3/EfficientNet. With momentum 0.01, 40 updates
    leave (0.99)^40 = 67% of the initial running variance 1 in place: eval mode is broken.
    """

    def __init__(self, hidden: int = 192, momentum: float | None = 0.01) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, hidden // 2, 16), InvertedResidual(16, hidden, 24)
        )
        self.classifier = nn.Linear(24, CLASSES)
        torchvision_init(self)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


# -- fused BN + activation (timm BatchNormAct2d) --------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused BN + activation: a ``BatchNorm2d`` whose forward also applies ``act``."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))  # type: ignore[no-any-return]


class FusedNet(nn.Module):
    """conv -> BatchNormAct2d (the first BN layer: both probe passes see the same input) ->
    conv -> BatchNormAct2d -> pooled linear head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(c)
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


# -- producers wrapped in containers --------------------------------------------------------------
class WrappedDropoutNet(nn.Module):
    """``Sequential(conv, Dropout(0.3))`` feeds ``bn1``; ``Sequential(biased conv)`` feeds
    ``bn2``. The Sequential's output IS its last child's output tensor."""

    def __init__(self, c: int = 16, p: float = 0.3) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.Dropout(p))
        self.bn1 = nn.BatchNorm2d(c)
        self.block2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=True))
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.block1(x)))
        x = F.relu(self.bn2(self.block2(x)))
        return self.fc(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


# -- 0..255 inputs, a dying channel ---------------------------------------------------------------
class Raw255Net(nn.Module):
    """Un-normalized 0..255 images; conv (biased) -> ReLU -> BN, then conv -> BN -> head.

    :meth:`on_step` kills ReLU channel ``dead_channel`` of ``conv1`` at training step ``die_at``
    (weights 0, bias -1e4: as a large update does); with a momentum-free optimizer it stays dead,
    so ``bn1``'s batch variance of that channel is exactly 0 from then on while its running
    variance (thousands at first, 0.9 less each step) is still in the hundreds.
    """

    def __init__(self, c: int = 8, die_at: int | None = 10, dead_channel: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, CLASSES)
        self.die_at, self.dead_channel = die_at, dead_channel
        torchvision_init(self)

    def on_step(self, step: int) -> None:
        if self.die_at is not None and step == self.die_at:
            with torch.no_grad():
                self.conv1.weight[self.dead_channel].zero_()
                self.conv1.bias[self.dead_channel] = -1e4  # type: ignore[index]

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(F.relu(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


# -- fine-tuning with frozen BN -------------------------------------------------------------------
class FrozenBNFinetune(nn.Module):
    """A backbone (conv-BN-ReLU x2) whose BN layers stay in eval mode with frozen affine
    parameters, and a linear head that trains. :meth:`pretrain` gives the backbone BN layers
    population statistics of some data first (as a pretrained checkpoint would).

    ``train_convs=False`` (the healthy set-up) freezes the backbone convs too; with True they
    train under frozen BN statistics, which go stale.
    """

    def __init__(self, c: int = 16, train_convs: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(c, CLASSES)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d) or not train_convs:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenBNFinetune:
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    @torch.no_grad()
    def pretrain(self, batches: Sequence[Tensor]) -> None:
        """Set the backbone BN buffers to the population statistics of ``batches``."""
        bns = [m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum, m.training = None, True  # cumulative average
        for x in batches:
            self.backbone(x)
        for m in bns:
            m.momentum, m.training = 0.1, False

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Data:
    train: DataLoader[Any]
    val: DataLoader[Any] | None
    probe_batch: tuple[Tensor, Tensor]
    """The first validation batch (or first training batch without validation data)."""


def _patterns(seed: int = 1234, size: int = 16) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(CLASSES, 3, 4, 4, generator=gen)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine / fine.std(dim=(1, 2, 3), keepdim=True)


def images(
    n: int, *, seed: int = 0, size: int = 16, noise: float = 0.7, shift: float = 0.0,
    scale: float = 1.0,
) -> TensorDataset:  # fmt: skip
    """``n`` learnable 3 x size x size images of 4 classes (class pattern + noise), then
    ``x * scale + shift``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=gen)
    x = _patterns(size=size)[y] + noise * torch.randn(n, 3, size, size, generator=gen)
    return TensorDataset(x * scale + shift, y)


def image_data(
    *, batch_size: int = 32, batches: int = 8, val_batches: int = 2, size: int = 16,
    val_shift: float = 0.0, val_scale: float = 1.0, seed: int = 0,
) -> Data:  # fmt: skip
    """Train and validation loaders of :func:`images`; the validation set may be moved."""
    train = images(batch_size * batches, seed=seed, size=size)
    val = images(batch_size * val_batches, seed=seed + 1, size=size, shift=val_shift,
                 scale=val_scale)  # fmt: skip
    val_loader = DataLoader(val, batch_size=batch_size) if val_batches else None
    first = val[:batch_size] if val_batches else train[:batch_size]
    return Data(DataLoader(train, batch_size=batch_size), val_loader, first)


def raw255_data(*, batch_size: int = 32, batches: int = 8, seed: int = 0) -> Data:
    """:func:`image_data` mapped to un-normalized 0..255 pixel values (rounded, as uint8)."""

    def to255(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        return TensorDataset((x * 48 + 128).round().clamp(0, 255), y)

    base = image_data(batch_size=batch_size, batches=batches, seed=seed)
    train = to255(base.train.dataset)  # type: ignore[arg-type]
    assert base.val is not None
    val = to255(base.val.dataset)  # type: ignore[arg-type]
    return Data(
        DataLoader(train, batch_size=batch_size),
        DataLoader(val, batch_size=batch_size),
        val[:batch_size],
    )


# -- Lightning ------------------------------------------------------------------------------------
class ReplicaModule(pl.LightningModule):
    """A 4-class classifier around ``net``: SGD (``momentum``), cross-entropy, ``val_acc``.
    Calls ``net.on_step(global_step)`` before each training batch when the net has one."""

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum = lr, momentum

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        on_step = getattr(self.net, "on_step", None)
        if on_step is not None:
            on_step(self.global_step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


@dataclass
class Fit:
    trainer: pl.Trainer
    module: ReplicaModule
    probe: Any
    root: Path


def fit(
    net: nn.Module | ReplicaModule,
    data: Data,
    steps: int,
    probe: Any = None,
    *,
    root: str | Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> Fit:
    """Train ``net`` for ``steps`` optimizer steps with a real CPU ``Trainer`` (no logger, no
    checkpoints, validation at every epoch end when ``data.val`` is set), ``probe`` attached."""
    pl.seed_everything(seed, verbose=False)
    module = net if isinstance(net, ReplicaModule) else ReplicaModule(net, lr, momentum)
    if root is None:  # nothing of the run is kept: train in a folder removed afterwards
        with tempfile.TemporaryDirectory(prefix="bnprobe-replica-") as scratch:
            return fit(net, data, steps, probe, root=scratch, callbacks=callbacks, lr=lr,
                       momentum=momentum, seed=seed, **trainer_kwargs)  # fmt: skip
    folder = Path(root)
    opts: dict[str, Any] = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        default_root_dir=folder,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    opts.update(trainer_kwargs)
    cbs = [*callbacks, *([probe] if probe is not None else [])]
    trainer = pl.Trainer(callbacks=cbs, **opts)
    trainer.fit(module, data.train, data.val)
    return Fit(trainer, module, probe, folder)


def eval_accuracy(net: nn.Module, data: Data, *, batch_stats: bool = False) -> float:
    """Accuracy over ``data.val`` in eval mode (``batch_stats``: BN layers use batch statistics
    instead, without touching the running buffers)."""
    assert data.val is not None
    was = net.training
    net.eval()
    saved = []
    if batch_stats:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                saved.append((m, m.track_running_stats, m.running_mean, m.running_var))
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
    try:
        right = total = 0
        with torch.no_grad():
            for x, y in data.val:
                right += int((net(x).argmax(1) == y).sum())
                total += len(y)
        return right / total
    finally:
        for m, track, mean, var in saved:
            m.track_running_stats, m.running_mean, m.running_var = track, mean, var
        net.train(was)
