"""The demo: a small conv net with two BatchNorm layers, trained on synthetic images.

Nothing is downloaded. :class:`SyntheticImages` draws a deterministic, learnable 10-class data
set of 3x28x28 images: each class is a smooth random colour pattern, and each sample is its
class pattern with a random contrast and brightness plus pixel noise.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class DemoNet(nn.Module):
    """Conv-BN-ReLU twice (with 2x2 max-pooling), then two linear layers; 3x28x28 -> 10 logits.

    ``conv_bias`` and ``dropout`` (a Dropout2d right before each BN layer) and ``bn_momentum``
    exist so that the pathology zoo can induce known problems; the defaults are the healthy net.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        conv_bias: bool = False,
        dropout: float = 0.0,
        bn_momentum: float | None = 0.1,
    ) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            drop: list[nn.Module] = [nn.Dropout2d(dropout)] if dropout > 0 else []
            return [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=conv_bias),
                *drop,
                nn.BatchNorm2d(c_out, momentum=bn_momentum),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(3, 64), *block(64, 128))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 7 * 7, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.features(x))
        return out


class SyntheticImages(Dataset[tuple[Tensor, Tensor]]):
    """``size`` images of shape 3x28x28 in ``num_classes`` classes, the same for the same seed.

    ``shift`` and ``scale`` move the pixel distribution (``x * scale + shift``): a validation
    set drawn with them differs from the training set the way real deployment data often does.
    """

    def __init__(
        self,
        size: int,
        *,
        num_classes: int = 10,
        seed: int = 0,
        pattern_seed: int = 1234,
        noise: float = 0.6,
        shift: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        patterns = class_patterns(num_classes, pattern_seed)
        gen = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(num_classes, (size,), generator=gen)
        contrast = 1.0 + 0.25 * torch.randn(size, 1, 1, 1, generator=gen)
        brightness = 0.25 * torch.randn(size, 1, 1, 1, generator=gen)
        pixels = noise * torch.randn(size, 3, 28, 28, generator=gen)
        self.images = (patterns[self.targets] * contrast + brightness + pixels) * scale + shift

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


def class_patterns(num_classes: int = 10, seed: int = 1234) -> Tensor:
    """One smooth 3x28x28 pattern per class (upsampled 7x7 noise), unit variance."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 7, 7, generator=gen)
    fine = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    return fine / fine.std(dim=(1, 2, 3), keepdim=True)


class DemoDataModule(pl.LightningDataModule):
    """Synthetic train and validation images (:class:`SyntheticImages`), generated in memory."""

    def __init__(
        self,
        *,
        batch_size: int = 64,
        num_train: int = 3072,
        num_val: int = 512,
        val_shift: float = 0.0,
        val_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_train < 1 or num_val < 1:
            raise ValueError(
                "DemoDataModule needs batch_size, num_train and num_val >= 1; got "
                f"batch_size={batch_size}, num_train={num_train}, num_val={num_val}"
            )
        self.batch_size = batch_size
        self.num_train, self.num_val = num_train, num_val
        self.val_shift, self.val_scale = val_shift, val_scale
        self.seed = seed
        self.train_set: Dataset[tuple[Tensor, Tensor]] | None = None
        self.val_set: Dataset[tuple[Tensor, Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = SyntheticImages(self.num_train, seed=self.seed)
        if self.val_set is None:
            self.val_set = SyntheticImages(
                self.num_val, seed=self.seed + 1, shift=self.val_shift, scale=self.val_scale
            )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.train_set is not None, "call setup() first"
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.batch_size)


class DemoModule(pl.LightningModule):
    """:class:`DemoNet` trained with cross-entropy and Adam; logs loss and accuracy."""

    def __init__(self, net: nn.Module | None = None, *, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net if net is not None else DemoNet()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def chance_accuracy(num_classes: int = 10) -> float:
    """Accuracy of guessing: what a model that learned nothing scores."""
    return 1.0 / num_classes


__all__ = [
    "DemoDataModule",
    "DemoModule",
    "DemoNet",
    "SyntheticImages",
    "chance_accuracy",
    "class_patterns",
]
