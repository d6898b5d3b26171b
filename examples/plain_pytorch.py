"""bnprobe without Lightning: ``bnprobe.watch`` in a hand-written loop writes the same TensorBoard
dashboards and parquet store as ``BNProbe`` in a Trainer; then the report, and recalibration of
the running statistics (PreciseBN).

    python examples/plain_pytorch.py [RUN_DIR]    # then: tensorboard --logdir RUN_DIR
"""

import sys

import torch
import torch.nn.functional as F

import bnprobe
from bnprobe import recalibrate
from bnprobe.demo import DemoDataModule, DemoNet

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/plain_pytorch"
torch.manual_seed(0)
data = DemoDataModule(num_train=1024, num_val=256, val_shift=2.0)  # validation data is shifted
data.setup()
model = DemoNet()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

step = 0
# hooks registered once and removed on exit; event files and <run_dir>/bnprobe_store written
with bnprobe.watch(model, run_dir, every_n_steps=5) as probe:
    for epoch in range(2):
        model.train()
        for x, y in data.train_dataloader():
            with probe.step(step, epoch):  # measures steps 0, 5, 10, ...
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            step += 1
        # stage val (pooled), stage probe (train/eval gap), figures, a store part file
        probe.end_epoch(step, epoch, data.val_dataloader())

print(probe.summary())
df = bnprobe.load(run_dir)  # what the store holds: the same rows as probe.to_dataframe()
print(f"{len(df)} rows saved in {run_dir}; tensorboard --logdir {run_dir}")

# The running statistics do not fit the shifted data eval sees: re-estimate them on it.
before_after = recalibrate(model, (x for x, _ in data.val_dataloader()))
print(before_after.pivot(index="layer", columns="metric", values="value").round(3))
