"""BNProbe under DDP: the demo net on several processes, then rank 0 prints what it found.

    python examples/ddp.py                                  # 2 CPU processes (gloo)
    python examples/ddp.py --accelerator gpu --devices 4    # 4 GPUs (nccl)
    python examples/ddp.py --sync-batchnorm                 # SyncBatchNorm (GPUs only)
    python examples/ddp.py --no-broadcast-buffers           # let the ranks' running stats drift

Multi-node: start the same command on every node with --num-nodes N and the usual
MASTER_ADDR, MASTER_PORT, NODE_RANK environment (or under torchrun / SLURM); see docs/scaling.md.
Lightning's "ddp" strategy re-runs this script for ranks 1..n-1, so everything that must happen
once sits under ``if trainer.is_global_zero``.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy

from bnprobe import BNProbe
from bnprobe.demo import DemoDataModule, DemoModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="per device")
    parser.add_argument("--sync-batchnorm", action="store_true")
    parser.add_argument("--no-broadcast-buffers", action="store_true")
    parser.add_argument("--root", default="runs/ddp")
    args = parser.parse_args()

    pl.seed_everything(0)
    probe = BNProbe(every_n_steps=5)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=DDPStrategy(broadcast_buffers=not args.no_broadcast_buffers),
        sync_batchnorm=args.sync_batchnorm,
        max_steps=args.max_steps,
        default_root_dir=args.root,
        log_every_n_steps=5,
        callbacks=[probe],
    )
    data = DemoDataModule(batch_size=args.batch_size, num_train=1024, num_val=128)
    trainer.fit(DemoModule(), data)

    if trainer.is_global_zero:  # rank 0 holds the rows of every rank
        df = probe.to_dataframe()
        train = df[df["stage"] == "train"]
        print(f"rows per rank: {train.groupby('rank').size().to_dict()}")
        div = train[train["metric"] == "rank_divergence"].groupby("layer")["value"].max()
        print("largest rank_divergence per layer:\n" + div.to_string())
        print(probe.report())


if __name__ == "__main__":
    main()
