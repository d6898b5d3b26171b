"""bnprobe without Lightning: BNTap in a hand-written loop, then the train/eval probe and
recalibration of the running statistics (PreciseBN).

    python examples/plain_pytorch.py
"""

import torch
import torch.nn.functional as F

from bnprobe import BNTap, check_mismatch, diagnose, recalibrate
from bnprobe.demo import DemoDataModule, DemoNet
from bnprobe.store import concat

torch.manual_seed(0)
data = DemoDataModule(num_train=1024, num_val=256, val_shift=2.0)  # validation data is shifted
data.setup()
model = DemoNet()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
frames = []

with BNTap(model) as tap:  # hooks registered once, removed on exit
    for epoch in range(2):
        model.train()
        for i, (x, y) in enumerate(data.train_dataloader()):
            step = epoch * len(data.train_dataloader()) + i
            measure = step % 5 == 0
            if measure:
                tap.start()  # the next forward of each BN layer is measured
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if measure:
                frames.append(tap.collect(step=step, epoch=epoch).rows)
        model.eval()
        tap.start(pool=True)  # stage val: pool every validation batch
        with torch.no_grad():
            for x, _ in data.val_dataloader():
                model(x)
        frames.append(tap.collect(step=step, epoch=epoch, stage="val").rows)

val_x, _ = next(iter(data.val_dataloader()))
frames.append(check_mismatch(model, val_x, step=step))  # stage probe
df = concat(frames)
for finding in diagnose(df):
    print(finding)

# The running statistics do not fit the shifted data eval sees: re-estimate them on it.
before_after = recalibrate(model, (x for x, _ in data.val_dataloader()))
print(before_after.pivot(index="layer", columns="metric", values="value").round(3))
print(check_mismatch(model, val_x)[["layer", "metric", "value"]])
