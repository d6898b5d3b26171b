"""Threshold calibration: train healthy runs and print, for every threshold of
bnprobe.diagnosis.Thresholds, the worst value those runs reach (the table in docs/diagnosis.md).

    python tools/calibrate_thresholds.py              # every healthy run (a few minutes on a CPU)
    python tools/calibrate_thresholds.py --list       # the runs
    python tools/calibrate_thresholds.py --only MLP   # the runs whose title contains MLP

The healthy runs: the demo at its ``bnprobe demo`` defaults and shorter, smaller variants; small
BatchNorm1d MLPs with Adam and SGD at several batch sizes; a small residual conv net. The worst
values are measured by bnprobe.diagnosis.worst_values, which calls the rules' own functions, so
the table compares exactly what the rules compare. A threshold is well placed when every healthy
worst value stays clear of it and the pathology zoo (bnprobe.pathologies, checked by
tests/test_pathologies.py) still crosses it.

A maintainer's tool: it lives outside the package and does not ship in the wheel.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable

import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bnprobe import BNProbe
from bnprobe import diagnosis as dg
from bnprobe.demo import DemoDataModule, DemoModule


def trainer(epochs: int, probe: BNProbe, root: str) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        accelerator="cpu",
    )


class MLP(pl.LightningModule):
    """Linear -> BatchNorm1d -> ReLU blocks and a linear classifier."""

    def __init__(self, depth: int = 2, hidden: int = 64, opt: str = "adam", lr: float = 1e-3):
        super().__init__()
        layers: list[nn.Module] = []
        width = 20
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 4))
        self.opt, self.lr = opt, lr

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def blobs(n: int, seed: int) -> TensorDataset:
    """4 Gaussian classes in 20 dimensions, with features far from zero mean."""
    centers = 2.0 * torch.randn(4, 20, generator=torch.Generator().manual_seed(1234)) + 3.0
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=gen)
    return TensorDataset(centers[y] + 1.5 * torch.randn(n, 20, generator=gen), y)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ResNet(nn.Module):
    """A stem conv, residual blocks (a 2x2 max-pool after the first), a linear head."""

    def __init__(self, c: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        )
        body: list[nn.Module] = [ResBlock(c), nn.MaxPool2d(2)]
        body += [ResBlock(c) for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*body)
        self.head = nn.Linear(c, 10)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))
        return out


def healthy_runs() -> dict[str, Callable[[str], pd.DataFrame]]:
    def demo(seed: int, **data: int) -> Callable[[str], pd.DataFrame]:
        def fit(root: str) -> pd.DataFrame:
            pl.seed_everything(seed, verbose=False)
            epochs = 3 if not data else 2
            probe = BNProbe(
                every_n_steps=5 if not data else 1, save_dir=False, histograms=False, summary=False
            )
            trainer(epochs, probe, root).fit(DemoModule(), DemoDataModule(seed=seed, **data))
            return probe.to_dataframe()

        return fit

    def mlp(batch: int, opt: str, lr: float, epochs: int) -> Callable[[str], pd.DataFrame]:
        def fit(root: str) -> pd.DataFrame:
            pl.seed_everything(0, verbose=False)
            gen = torch.Generator().manual_seed(0)
            train = DataLoader(blobs(1024, 0), batch_size=batch, shuffle=True, generator=gen)
            val = DataLoader(blobs(512, 100), batch_size=256)
            probe = BNProbe(every_n_steps=1, save_dir=False, histograms=False, summary=False)
            trainer(epochs, probe, root).fit(MLP(opt=opt, lr=lr), train, val)
            return probe.to_dataframe()

        return fit

    def resnet(blocks: int) -> Callable[[str], pd.DataFrame]:
        def fit(root: str) -> pd.DataFrame:
            pl.seed_everything(0, verbose=False)
            data = DemoDataModule(batch_size=32, num_train=1024, num_val=128)
            probe = BNProbe(every_n_steps=1, save_dir=False, histograms=False, summary=False)
            trainer(2, probe, root).fit(DemoModule(net=ResNet(blocks=blocks)), data)
            return probe.to_dataframe()

        return fit

    runs: dict[str, Callable[[str], pd.DataFrame]] = {
        "demo (bnprobe demo defaults)": demo(0),
        "demo, seed 1": demo(1),
        "demo, batch 16, 2 epochs of 32 steps": demo(0, batch_size=16, num_train=512, num_val=128),
        "demo, batch 32, 2 epochs of 30 steps": demo(0, batch_size=32, num_train=960, num_val=128),
        "residual conv net, 2 blocks, batch 32, 2 epochs of 32 steps": resnet(2),
        "residual conv net, 6 blocks, batch 32, 2 epochs of 32 steps": resnet(6),
    }
    for batch in (16, 32, 64):
        for opt, lr in (("adam", 1e-3), ("adam", 1e-2), ("sgd", 0.1)):
            runs[f"MLP BatchNorm1d, batch {batch}, {opt} lr {lr:g}, 3 epochs"] = mlp(
                batch, opt, lr, 3
            )
    return runs


def calibrate(runs: dict[str, Callable[[str], pd.DataFrame]], root: str = "bnprobe_zoo") -> None:
    """Train the runs, print the worst value of each rule input and any warning or error."""
    worst: dict[str, tuple[float, str]] = {}
    serious: list[str] = []
    for title, fit in runs.items():
        start = time.perf_counter()
        df = fit(root)
        values = dg.worst_values(df)
        bad = [f for f in dg.diagnose(df) if f.severity in ("warning", "error")]
        serious += [f"{title}: {f.severity} {f.kind} on {f.layer}" for f in bad]
        print(f"{title}: {time.perf_counter() - start:.0f} s, {len(bad)} warnings/errors")
        for name, value in values.items():
            if math.isnan(value):
                continue
            direction = dg.CALIBRATION[name][1]
            old = worst.get(name)
            if old is None or (value > old[0] if direction == "max" else value < old[0]):
                worst[name] = (value, title)
    print("\n| measured (warmed-up steps) | healthy worst | threshold | run |")
    print("|---|---|---|---|")
    for name, (constant, direction) in dg.CALIBRATION.items():
        limit = getattr(dg.DEFAULT_THRESHOLDS, constant)
        sign = "≥" if constant == "tf_momentum_min" else ">" if direction == "max" else "<"
        value, title = worst.get(name, (math.nan, "-"))
        shown = "-" if math.isnan(value) else f"{value:.3g}"
        print(
            f"| {name} ({direction}) | {shown} | fires {sign} `{constant}` = {limit:g} | {title} |"
        )
    print("\nwarnings/errors on healthy runs:", "; ".join(serious) or "none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the healthy runs and exit")
    parser.add_argument(
        "--only", metavar="TEXT", help="only the runs whose title contains TEXT (see --list)"
    )
    parser.add_argument(
        "--root", default="bnprobe_zoo", help="Lightning's default_root_dir (nothing is kept)"
    )
    args = parser.parse_args(argv)
    runs = healthy_runs()
    if args.only is not None:
        runs = {title: fit for title, fit in runs.items() if args.only in title}
        if not runs:
            parser.error(f"no healthy run's title contains {args.only!r}; see --list")
    if args.list:
        print("\n".join(runs))
        return 0
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    calibrate(runs, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
