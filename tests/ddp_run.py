"""One DDP rank of tests/test_ddp.py: ``python -m tests.ddp_run OUT`` with LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (as torchrun sets them), so Lightning joins the process group
instead of launching processes itself. Runs several short fits in the same process group and
writes what each rank saw under OUT (the test compares the ranks' files with rank 0's table).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe import BNProbe
from bnprobe.distributed import RankGather
from tests.reference import Lit, Reference, loader

RANK = int(os.environ["LOCAL_RANK"])


class FailsOnRankOne(nn.BatchNorm1d):
    """Takes a dict on rank 1 only: the probe fails on that layer there, not on rank 0."""

    def forward(self, x: Any) -> Tensor:
        return super().forward(x["x"] if isinstance(x, dict) else x)


class Net(nn.Module):
    def __init__(self, odd: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.odd = FailsOnRankOne(16) if odd else nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.fc(x)))
        h = self.odd({"x": h} if RANK == 1 and isinstance(self.odd, FailsOnRankOne) else h)
        return self.head(h)  # type: ignore[no-any-return]


class RecordRunning(pl.Callback):
    """This rank's own reference: metrics of the measured batches and mu_R, var_R before them."""

    def __init__(self, lit: nn.Module, metrics: bool = True) -> None:
        self.ref = Reference(lit) if metrics else None
        self.bns = {n: m for n, m in lit.named_modules() if isinstance(m, _BatchNorm)}
        self.metrics: dict[int, Any] = {}
        self.running: dict[int, Any] = {}
        self._before: dict[str, Any] = {}
        self._seen: set[str] = set()
        for name, m in self.bns.items():
            m.register_forward_pre_hook(self._make(name))

    def _make(self, name: str) -> Any:
        def hook(module: _BatchNorm, args: Any) -> None:
            if name not in self._seen:
                self._seen.add(name)
                assert module.running_mean is not None and module.running_var is not None
                self._before[name] = (
                    module.running_mean.double().tolist(),
                    module.running_var.double().tolist(),
                )

        return hook

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.ref is not None:
            self.ref.start()
        self._seen, self._before = set(), {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, b: Any, i: int) -> None:
        step = trainer.global_step - 1
        self.metrics[step] = self.ref.metrics if self.ref is not None else {}
        self.running[step] = self._before


def fit(out: Path, name: str, *, broadcast_buffers: bool = True, odd: bool = False) -> None:
    pl.seed_everything(0)
    lit = Lit(Net(odd=odd))
    record = RecordRunning(lit, metrics=not odd)
    probe = BNProbe(every_n_steps=1, save_dir=out / name / "store", summary=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=broadcast_buffers),
        max_epochs=1,
        default_root_dir=out / name,
        logger=TensorBoardLogger(out / name, name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[record, probe],
    )
    # Each rank draws its own data; with broadcast_buffers=False rank 1's inputs are shifted.
    shift = 3.0 * RANK if not broadcast_buffers else 0.0
    # The diverging run is long enough for the rank_divergence rule (warm-up, rolling median).
    data = loader((6,), n=16 * (40 if not broadcast_buffers else 3), batch_size=16, seed=10 + RANK)
    data.dataset.tensors = (data.dataset.tensors[0] + shift, data.dataset.tensors[1])
    trainer.fit(lit, data)
    folder = save_rank(out / name, record, probe)
    weights = {k: v.tolist() for k, v in lit.state_dict().items() if v.dtype.is_floating_point}
    (folder / "weights.json").write_text(json.dumps(weights))
    if probe.tap is not None:
        (folder / "failures.json").write_text(json.dumps(probe.tap.failures))


def save_rank(run: Path, record: RecordRunning, probe: BNProbe) -> Path:
    """This rank's folder of ``run``: what its reference recorder saw (``reference.json``) and,
    on rank 0, the probe's table (``table.parquet``)."""
    folder = run / f"rank{RANK}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reference.json").write_text(
        json.dumps({"metrics": record.metrics, "running": record.running})
    )
    if RANK == 0:
        probe.to_dataframe().to_parquet(folder / "table.parquet")
    return folder


class StoreAtCheckpoint(pl.Callback):
    """Rank 0: the (rank, step) pairs of stage train in the probe's store at each checkpoint
    (placed after the probe, which flushes before a checkpoint)."""

    def __init__(self, probe: BNProbe) -> None:
        self.probe = probe
        self.seen: dict[int, list[list[int]]] = {}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
        if RANK == 0:
            df = self.probe.to_dataframe(stages=["train"])
            pairs = df[["rank", "step"]].drop_duplicates().sort_values(["rank", "step"])
            self.seen[int(trainer.global_step)] = pairs.to_numpy().tolist()


class CountedGather(RankGather):
    """The gather, noting how many steps each :meth:`add` hands it (a block of the tap's, or
    one step)."""

    added: ClassVar[list[int]] = []

    def add(self, snapshot: Any, *, step: Any, epoch: Any, error: str | None = None) -> None:
        CountedGather.added.append(1 if isinstance(step, int) else len(step))
        super().add(snapshot, step=step, epoch=epoch, error=error)


class CountedProbe(BNProbe):
    _gather_class = CountedGather


def fit_batched(out: Path, name: str = "batched") -> None:
    """Two epochs of 7 steps, 3 gathered steps per exchange, a checkpoint every 5 steps: the
    other rank's rows of a batch cut short by an epoch end, a checkpoint or the end of fit
    arrive all the same."""
    pl.seed_everything(0)
    lit = Lit(Net())
    record = RecordRunning(lit)
    probe = CountedProbe(
        every_n_steps=1, save_dir=out / name / "store", summary=False, gather_batch=3
    )
    seen = StoreAtCheckpoint(probe)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        default_root_dir=out / name,
        logger=TensorBoardLogger(out / name, name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[
            record,
            probe,
            seen,
            pl.callbacks.ModelCheckpoint(
                dirpath=out / name / "ckpt", every_n_train_steps=5, save_top_k=-1
            ),
        ],
    )
    trainer.fit(lit, loader((6,), n=16 * 7, batch_size=16, seed=10 + RANK))
    folder = save_rank(out / name, record, probe)
    (folder / "added.json").write_text(json.dumps(CountedGather.added))
    if RANK == 0:
        (folder / "checkpoints.json").write_text(json.dumps(seen.seen))


def main() -> None:
    out = Path(sys.argv[1])
    fit(out, "broadcast")
    fit(out, "diverge", broadcast_buffers=False)
    fit(out, "odd", odd=True)
    fit_batched(out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
