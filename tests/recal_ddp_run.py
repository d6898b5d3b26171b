"""One rank of tests/test_recalibrate.py's DDP checks: ``python -m tests.recal_ddp_run OUT``.

Two gloo ranks hold non-IID shards (different means and sizes). Each recalibrates the same model
and saves its state; then rank 1's forward fails on its second batch, and each rank writes what
``recalibrate`` raised, which must be the same error on both ranks instead of a hang.
"""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from torch import Tensor, nn

from bnprobe.mismatch import recalibrate


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3))


def shard(rank: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    sizes = (7, 12, 3) if rank == 0 else (16, 5)
    offset = 2.0 if rank == 0 else -1.0
    return [torch.randn(n, 4, generator=g) * (1 + rank) + offset for n in sizes]


class FailsOnRankOne(nn.Module):
    def __init__(self, inner: nn.Module, rank: int) -> None:
        super().__init__()
        self.inner, self.rank, self.calls = inner, rank, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.rank == 1 and self.calls == 2:
            raise RuntimeError("boom on rank 1")
        return self.inner(x)  # type: ignore[no-any-return]


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    model = make_model()
    recalibrate(model, shard(rank), progress=False)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")

    failing = FailsOnRankOne(make_model(), rank)
    try:
        recalibrate(failing, shard(rank), progress=False)
        text = "no error"
    except Exception:
        text = traceback.format_exc()
    (out / f"failure{rank}.txt").write_text(text)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
