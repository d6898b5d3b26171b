"""A nearly full disk, for tests/test_robust.py: ``python -m tests.disk_run DISK OUT RESERVE``
trains the same model without and with BNProbe, each logging through a TensorBoardLogger on the
small file system DISK (a tmpfs the test mounted), while the user's ``self.log`` writes the loss
every step; bnprobe's events go to their own file there and stop, with one warning, when a write
would leave under RESERVE bytes free
(bnprobe writes about 640 KB in all, in 64 KiB writes). Writes the outcome to OUT/result.json."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from bnprobe import BNProbe
from bnprobe.tensorboard import events
from tests.reference import Lit, loader, make_model

STEPS = 80


class Logged(Lit):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("user_loss", loss)
        return loss


def fit(disk: Path, name: str, probe: BNProbe | None) -> tuple[dict[str, torch.Tensor], str]:
    pl.seed_everything(3)
    lit = Logged(make_model("res2d"))
    logger = TensorBoardLogger(disk, name=name, version=0)
    pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        default_root_dir=disk,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=logger,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[probe] if probe else [],
    ).fit(lit, loader((3, 8, 8), n=16 * STEPS))
    return {k: v.clone() for k, v in lit.state_dict().items()}, logger.log_dir


def main() -> None:
    disk, out, reserve = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    events.DISK_RESERVE = reserve
    events.BUFFER_BYTES = 64 * 2**10  # to disk every few steps (about 8 KB a step here)
    plain, _ = fit(disk, "plain", None)
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed, log_dir = fit(disk, "probed", probe)
    user = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    user.Reload()
    files = sorted(p.name for p in Path(log_dir).glob("events.out.tfevents.*"))
    result: dict[str, Any] = {
        "warnings": [str(w.message) for w in caught if "bnprobe" in str(w.message).lower()],
        "same_weights": all(torch.equal(plain[k], probed[k]) for k in plain),
        "user_steps": [e.step for e in user.Scalars("user_loss")],
        "files": files,
        "log_dir": log_dir,
        "rows": len(probe.to_dataframe()),
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
