"""Stages val and probe inside Trainer.fit: pooled validation moments and the train/eval probe."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from bnprobe import BNProbe
from tests.reference import Lit, loader, make_model, reference_metrics, trainer


class _CaptureVal(pl.Callback):
    """Keeps the validation inputs of one BN layer (real validation only) to check pooling."""

    def __init__(self, bn: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.running: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on = False
        bn.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if self._on:
            self.inputs.append(args[0].detach().clone())
            self.running = (module.running_mean.clone(), module.running_var.clone())

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._on = not trainer.sanity_checking
        self.inputs = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._on = False


def test_val_stage_pools_every_validation_batch(tmp_path) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model("res2d"))
    capture = _CaptureVal(lit.net.bn1)
    probe = BNProbe(every_n_steps=1, save_dir=False)
    val = loader((3, 8, 8), n=40, batch_size=16, seed=3)  # batches of 16, 16, 8
    trainer(tmp_path, callbacks=[capture, probe], max_epochs=1, num_sanity_val_steps=2).fit(
        lit, loader((3, 8, 8)), val
    )
    df = probe.to_dataframe()
    rows = df[(df["stage"] == "val") & (df["layer"] == "net.bn1")]
    assert list(rows["step"].unique()) == [4]  # after the epoch's 4 steps; sanity check not kept
    got = rows.set_index("metric")["value"]
    assert capture.running is not None
    want = reference_metrics(torch.cat(capture.inputs), *capture.running, eps=1e-5)
    for metric, value in want.items():
        assert got[metric] == pytest.approx(value, rel=2e-4, abs=1e-7), metric
    assert "gamma_mean" not in got.index  # affine metrics are stage train only


def _val_shift(tmp_path, shift: float) -> float:
    pl.seed_everything(0)
    probe = BNProbe(every_n_steps=4, save_dir=False)
    val = loader((6,), n=64, seed=5)
    x, y = val.dataset.tensors
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x + shift, y), batch_size=16)
    trainer(tmp_path, callbacks=[probe], max_epochs=2).fit(
        Lit(make_model("mlp1d")), loader((6,)), val
    )
    df = probe.to_dataframe()
    last = df[(df["stage"] == "val") & (df["metric"] == "mean_shift")]
    return float(last["value"].iloc[-1])


def test_shifted_validation_data_shows_a_large_val_mean_shift(tmp_path) -> None:
    same = _val_shift(tmp_path / "same", 0.0)
    shifted = _val_shift(tmp_path / "shifted", 3.0)
    assert same < 1.0
    assert shifted > 3 * same and shifted > 1.0


def test_probe_runs_after_validation_and_records_nothing_in_the_tap(tmp_path) -> None:
    pl.seed_everything(0)
    lit = Lit(make_model("res2d"))
    probe = BNProbe(every_n_steps=1, save_dir=False)
    trainer(tmp_path, callbacks=[probe], max_epochs=2).fit(
        lit, loader((3, 8, 8)), loader((3, 8, 8), seed=1)
    )
    df = probe.to_dataframe()
    gaps = df[df["stage"] == "probe"]
    assert sorted(gaps["step"].unique()) == [4, 8]
    assert set(gaps[gaps["layer"] == "<model>"]["metric"]) == {
        "logits_gap", "pred_agreement", "recal_pred_change", "recal_logits_shift"
    }  # fmt: skip
    assert set(gaps[gaps["layer"] != "<model>"]["metric"]) == {
        "output_gap", "local_gap", "num_batches_tracked", "warmup_residual", "running_invalid"
    }  # fmt: skip
    # one train record per step and layer: the probe's forwards were not measured as training
    train_calls = df[(df["stage"] == "train") & (df["metric"] == "forward_calls")]
    assert (train_calls["value"] == 1).all() and len(train_calls) == 8 * 2


def test_explicit_probe_batch_is_used(tmp_path) -> None:
    pl.seed_everything(0)
    x = torch.randn(12, 6) * 10 + 20  # far from the training data: a large gap
    probe = BNProbe(every_n_steps=4, probe_batch=x, save_dir=False)
    trainer(tmp_path, callbacks=[probe], max_epochs=1).fit(
        Lit(make_model("mlp1d")), loader((6,)), loader((6,), seed=1)
    )
    df = probe.to_dataframe()
    gap = df[(df["stage"] == "probe") & (df["metric"] == "local_gap")]["value"]
    assert len(gap) == 1 and gap.iloc[0] > 0.5
