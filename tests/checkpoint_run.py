"""Trains with a checkpoint every 6 steps and no time-based save; ``kill`` SIGKILLs itself after
step 13 (used by test_store.py), ``resume`` resumes from the last checkpoint up to step 20."""

import os
import signal
import sys

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

import bnprobe.callback
from bnprobe import BNProbe
from tests.reference import Lit, loader, make_model

bnprobe.callback.FLUSH_EVERY_S = 1e9  # only epoch ends, checkpoints and the end of fit save


class KillAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step > self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    root, mode = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=root + "/ckpt", every_n_train_steps=6, save_top_k=-1)
    callbacks: list[pl.Callback] = [BNProbe(every_n_steps=1, save_dir=root + "/store"), ckpt]
    if mode == "kill":
        callbacks.append(KillAfter(13))
    trainer = pl.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    last = None
    if mode == "resume":
        last = max((os.path.join(root, "ckpt", f) for f in os.listdir(root + "/ckpt")),
                   key=os.path.getmtime)  # fmt: skip
    trainer.fit(Lit(make_model("mlp1d")), loader((6,), n=800), ckpt_path=last)
