"""An independent float64 reference for the stage-train metrics, and small models to test on.

The reference captures each BN layer's input and its running buffers before the forward with its
own pre-hooks, and computes every metric from the SPEC formulas directly (no bnprobe code).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset


def reference_metrics(
    x: Tensor,
    mu_r: Tensor | None,
    var_r: Tensor | None,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    gamma0: Tensor | None = None,
    beta0: Tensor | None = None,
    *,
    nbt: int | None = None,
    initial: tuple[Tensor, Tensor, int] | None = None,
    momentum: float | None = 0.1,
) -> dict[str, float]:
    """Every metric from its definition, in float64 torch. ``nbt``: num_batches_tracked before
    this batch; ``initial``: the warm-up reference (mean_0, var_0, n0)."""
    x = x.double()
    dims = [0, *range(2, x.dim())]
    mu = x.mean(dims)
    var = x.var(dims, unbiased=False)
    finite = mu.isfinite() & var.isfinite()
    out = {
        "batch_mean": mu.mean().item(),
        "batch_var": var.mean().item(),
        "samples_per_channel": float(x.numel() // x.shape[1]),
        "var_small_frac": (var < 10 * eps).double().mean().item(),
    }
    if mu_r is not None and var_r is not None:
        mu_r, var_r = mu_r.double(), var_r.double()
        d = (mu - mu_r) / (var_r + eps).sqrt()
        v = ((var + eps) / (var_r + eps)).log()
        s_b, s_r = (var + eps).sqrt(), (var_r + eps).sqrt()
        kl = (s_r / s_b).log() + (s_b**2 + (mu - mu_r) ** 2) / (2 * s_r**2) - 0.5
        r = 0.0
        if nbt is not None and initial is not None:
            steps = max(nbt - initial[2], 0)
            r = (1 - momentum) ** steps if momentum is not None else float(steps == 0)
            out.update(num_batches_tracked=float(nbt), warmup_residual=r)
        finite &= d.isfinite() & v.isfinite() & kl.isfinite()
        if initial is not None:  # the excess shifts need the warm-up reference
            if 1 - r >= 1e-6:
                m0, v0 = initial[0].double(), initial[1].double()
                mu_s = (mu_r - r * m0) / (1 - r)
                var_s = ((var_r - r * v0) / (1 - r)).clamp(min=0)
                dx = (mu - mu_s) / (var_s + eps).sqrt()
                vx = ((var + eps) / (var_s + eps)).log()
            else:
                dx = vx = torch.zeros_like(mu)
            finite &= dx.isfinite() & vx.isfinite()
            out.update(
                mean_shift_excess=dx.abs().mean().item(),
                mean_shift_excess_max=dx.abs().max().item(),
                var_shift_excess=vx.abs().mean().item(),
                var_shift_excess_max=vx.abs().max().item(),
            )
        out["running_invalid"] = float((~(mu_r.isfinite() & var_r.isfinite()) | (var_r < 0)).sum())
        out.update(
            running_mean=mu_r.mean().item(),
            running_var=var_r.mean().item(),
            mean_shift=d.abs().mean().item(),
            mean_shift_max=d.abs().max().item(),
            var_shift=v.abs().mean().item(),
            var_shift_max=v.abs().max().item(),
            kl=kl.mean().item(),
            kl_max=kl.max().item(),
            outlier_frac=((d.abs() > 5) | (v.abs() > 2 * math.log(3))).double().mean().item(),
        )
    if gamma is not None and beta is not None and gamma0 is not None and beta0 is not None:
        g, b, g0, b0 = (t.double() for t in (gamma, beta, gamma0, beta0))
        out.update(
            gamma_mean=g.mean().item(),
            gamma_std=g.std().item() if g.numel() > 1 else 0.0,
            beta_mean=b.mean().item(),
            beta_std=b.std().item() if b.numel() > 1 else 0.0,
            gamma_drift=((g - g0).norm() / (g0.norm() if g0.norm() > 0 else len(g) ** 0.5)).item(),
            beta_drift=((b - b0).norm() / math.sqrt(b.numel())).item(),
            gamma_small_frac=(g.abs() < 0.01 * g.abs().max()).double().mean().item(),
        )
    out["nonfinite"] = float((~finite).sum())
    return out


class Reference:
    """Records reference metrics of each BN layer's first forward while ``active``."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        self.g0 = {
            n: (m.weight.detach().clone(), m.bias.detach().clone())
            for n, m in self.bns.items()
            if m.affine
        }
        # the warm-up reference, known for sure only for a layer seen before any update (the
        # tap may have seen a layer earlier than a reference made late)
        self.initial = {
            n: (m.running_mean.clone(), m.running_var.clone(), 0)
            for n, m in self.bns.items()
            if m.running_mean is not None
            and m.num_batches_tracked is not None
            and int(m.num_batches_tracked) == 0
        }
        self.active = False
        self.seen: set[str] = set()
        self.metrics: dict[str, dict[str, float]] = {}
        self.channels: dict[str, dict[str, Tensor]] = {}
        """Per layer: float64 per-channel ``batch_mean``, ``batch_var`` of the last measured
        forward."""
        self.handles = [m.register_forward_pre_hook(self._make(n)) for n, m in self.bns.items()]

    def _make(self, name: str) -> Any:
        def hook(module: _BatchNorm, args: tuple[Tensor, ...]) -> None:
            if not self.active or name in self.seen:
                return
            self.seen.add(name)
            x = args[0].detach().double()
            dims = [0, *range(2, x.dim())]
            self.channels[name] = {
                "batch_mean": x.mean(dims),
                "batch_var": x.var(dims, unbiased=False),
            }
            has = module.running_mean is not None and module.running_var is not None
            g0b0 = self.g0.get(name, (None, None))
            nbt = module.num_batches_tracked
            extra: dict[str, Any] = {"momentum": module.momentum}
            if has and nbt is not None and name in self.initial:
                extra.update(nbt=int(nbt), initial=self.initial[name])
            self.metrics[name] = reference_metrics(
                args[0].detach(),
                module.running_mean.clone() if has else None,  # type: ignore[union-attr]
                module.running_var.clone() if has else None,  # type: ignore[union-attr]
                module.eps,
                module.weight.detach() if module.affine else None,
                module.bias.detach() if module.affine else None,
                *g0b0,
                **extra,
            )

        return hook

    def start(self) -> None:
        self.active, self.seen, self.metrics, self.channels = True, set(), {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Residual2d(nn.Module):
    """Conv-BN blocks with in-place ReLU and an in-place residual add after the BN."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.stem(x)), inplace=True)
        out = self.bn1(self.conv(x))
        out += x  # in place, after the BN forward hook ran
        out = F.relu(out, inplace=True)
        return self.head(out.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def mlp1d(affine: bool = True, track: bool = True, momentum: float | None = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16, affine=affine, track_running_stats=track, momentum=momentum),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


class Seq1d(nn.Module):
    """BatchNorm1d over (N, C, L) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).mean(dim=2))  # type: ignore[no-any-return]


class Vol3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(6, affine=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3, 4)))  # type: ignore[no-any-return]


INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp1d": (6,),
    "seq1d": (3, 10),
    "res2d": (3, 8, 8),
    "vol3d": (2, 4, 4, 4),
}


def make_model(kind: str) -> nn.Module:
    return {"mlp1d": mlp1d, "seq1d": Seq1d, "res2d": Residual2d, "vol3d": Vol3d}[kind]()


class Lit(pl.LightningModule):
    """Wraps a 4-class classifier with SGD; data is random with a learnable offset."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(shape: tuple[int, ...], n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=gen)
    x = torch.randn(n, *shape, generator=gen) * 2.0 + 0.5
    x = x + y.view(-1, *([1] * len(shape))).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
    )
    opts.update(kwargs)
    return pl.Trainer(**opts)


class MetricsLogger(Logger):
    """A real Lightning logger that only has ``log_metrics`` to say (a subclass writes it): what
    a remote tracking service's logger is to the probe. Its name is its class's."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass
