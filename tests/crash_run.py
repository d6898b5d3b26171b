"""Trains until killed, flushing the store at every measured step (used by test_store.py)."""

import sys
import time

import pytorch_lightning as pl

import bnprobe.callback
from bnprobe import BNProbe
from tests.reference import Lit, loader, make_model

bnprobe.callback.FLUSH_EVERY_S = 0.0  # flush at every measured step


class Slow(Lit):
    def training_step(self, batch, batch_idx):
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=10_000,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=sys.argv[1],
        callbacks=[BNProbe(every_n_steps=1, save_dir=sys.argv[1] + "/store")],
    )
    trainer.fit(Slow(make_model("mlp1d")), loader((6,)))
