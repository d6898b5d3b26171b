"""Quick start: train the demo net with BNProbe, then read the results in pandas.

python examples/quickstart.py
tensorboard --logdir bnprobe_quickstart
"""

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from bnprobe import BNProbe
from bnprobe.demo import DemoDataModule, DemoModule

pl.seed_everything(0)
probe = BNProbe(every_n_steps=10)  # default: the trainer's log_every_n_steps
trainer = pl.Trainer(
    max_epochs=2,
    callbacks=[probe],
    logger=TensorBoardLogger("bnprobe_quickstart"),
    enable_model_summary=False,
)
trainer.fit(DemoModule(), DemoDataModule())

df = probe.to_dataframe()  # tidy: step, epoch, stage, rank, layer, channel, metric, value
print(df.head())
shift = df[(df.stage == "train") & (df.metric == "mean_shift")]
print(shift.pivot(index="step", columns="layer", values="value").tail())
print(probe.report())
