"""One DDP rank of tests/test_ddp.py: ``python -m tests.ddp_fail_run OUT`` with torchrun's
variables set (tests/launch.py). Runs one short fit per failure, each injected on rank 1 only,
in a process group whose timeout is 20 s (a rank left waiting in a collective fails the run
fast instead of after Lightning's 30 minutes), and writes what rank 0 warned and recorded.

The failures are real exceptions inside the probe's own code paths on rank 1: a tap whose
``collect``/``keep`` (building the rows) or ``start`` raises, a gather whose payload encoding
raises, and a probe batch the model cannot read (the train/eval probe fails).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn

from bnprobe import BNProbe
from bnprobe.distributed import RankGather
from bnprobe.tap import BNTap, Snapshot
from tests.reference import Lit, loader

RANK = int(os.environ.get("LOCAL_RANK", "0"))  # 0 when the test imports STEPS
CAUSE = "injected on rank 1"
STEPS = 4  # 64 samples / 16 per batch, one epoch
PG_TIMEOUT = timedelta(seconds=20)


class CollectFails(BNTap):
    def collect(self, *, step: int, epoch: int = 0, rank: int = 0, stage: str = "train") -> Any:
        if RANK == 1 and stage == "train":
            raise RuntimeError(f"collect {CAUSE}")
        return super().collect(step=step, epoch=epoch, rank=rank, stage=stage)

    def keep(self, *, step: int, epoch: int = 0, rank: int = 0) -> Any:  # blocks of steps
        if RANK == 1:
            raise RuntimeError(f"collect {CAUSE}")
        return super().keep(step=step, epoch=epoch, rank=rank)


class StartFails(BNTap):
    def start(self, *, trace: bool = False, pool: bool = False) -> None:
        if RANK == 1 and not pool:
            raise RuntimeError(f"start {CAUSE}")
        super().start(trace=trace, pool=pool)


class EncodeFails(RankGather):
    def encode(self, snapshot: Snapshot) -> Any:
        if RANK == 1:
            raise ValueError(f"encode {CAUSE}")
        return super().encode(snapshot)


class ProbeOf(BNProbe):
    """BNProbe with another tap or gather class (the same probe otherwise)."""

    def __init__(self, tap: type[BNTap] = BNTap, gather: type[RankGather] = RankGather, **kw: Any):
        super().__init__(**kw)
        self._tap_class = tap
        self._gather_class = gather


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))  # type: ignore[no-any-return]


def fit(out: Path, name: str, **options: Any) -> None:
    pl.seed_everything(0)
    lit = Lit(Net())
    probe = ProbeOf(every_n_steps=1, save_dir=False, summary=False, histograms=False, **options)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(timeout=PG_TIMEOUT),
        max_epochs=1,
        default_root_dir=out / name,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[probe],
    )
    data = loader((6,), n=16 * STEPS, batch_size=16, seed=10 + RANK)
    val = loader((6,), n=32, batch_size=16, seed=20 + RANK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, data, val)
    folder = out / name / f"rank{RANK}"
    folder.mkdir(parents=True, exist_ok=True)
    said = [str(w.message) for w in caught if "BNProbe" in str(w.message)]
    (folder / "warnings.json").write_text(json.dumps(said))
    if RANK == 0:
        probe.to_dataframe().to_parquet(folder / "table.parquet")
    (folder / "done").write_text(str(trainer.global_step))


def main() -> None:
    out = Path(sys.argv[1])
    fit(out, "collect", tap=CollectFails)
    fit(out, "start", tap=StartFails)
    fit(out, "encode", gather=EncodeFails)
    # rank 1's probe batch has 5 features for a 6-feature model: the train/eval probe raises
    bad = (torch.randn(8, 5 if RANK == 1 else 6), torch.zeros(8, dtype=torch.long))
    fit(out, "probe", probe_batch=bad)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
