"""The numbers of bnprobe on the real-world replicas (tests/replicas.py) against float64.

Each replica trains with a real ``Trainer``, the probe measuring every step and the independent
reference of tests/reference.py computing every metric from its definition on the same batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from bnprobe import BNProbe, check_mismatch
from tests import replicas as R
from tests.reference import Reference

VARIANCE_METRICS = (
    "batch_var",
    "running_var",
    "var_shift",
    "var_shift_max",
    "kl",
    "kl_max",
    "var_shift_excess",
    "var_shift_excess_max",
)
RTOL = 2e-3


class _RefCallback(pl.Callback):
    """Runs the independent reference on exactly the batches the probe measures."""

    def __init__(self) -> None:
        self.ref: Reference | None = None
        self.by_step: dict[int, dict[str, dict[str, float]]] = {}
        self.channels: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ref = Reference(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        assert self.ref is not None
        self.ref.start()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, out: Any, b: Any, i: int) -> None:
        assert self.ref is not None
        self.by_step[trainer.global_step - 1] = self.ref.metrics
        self.channels[trainer.global_step - 1] = self.ref.channels
        self.ref.active = False


Measured = tuple[pd.DataFrame, _RefCallback, nn.Module]


def _run(make: Callable[[], nn.Module], data: R.Data, steps: int, tmp_path: Any, **kw: Any
         ) -> Measured:  # fmt: skip
    ref = _RefCallback()
    probe = BNProbe(every_n_steps=1, per_channel=True, save_dir=False, summary=False)
    net = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        R.fit(net, data, steps, probe, root=tmp_path, callbacks=[ref], **kw)
    return probe.to_dataframe(), ref, net


def _compare(df: pd.DataFrame, ref: _RefCallback) -> int:
    """Every train metric of every step, and every channel's batch moments, against the
    reference; returns how many values were checked."""
    by_step = ref.by_step
    train = df[(df["stage"] == "train") & df["channel"].isna()]
    got = train.set_index(["step", "layer", "metric"])["value"]
    assert np.isfinite(train["value"].to_numpy()).all(), train[~np.isfinite(train["value"])]
    checked = 0
    for step, layers in by_step.items():
        for layer, metrics in layers.items():
            for metric, want in metrics.items():
                have = got[step, layer, metric]
                assert math.isfinite(want), (step, layer, metric)
                assert have == pytest.approx(want, rel=RTOL, abs=1e-9), (step, layer, metric)
                checked += 1
    per = df[(df["stage"] == "train") & df["channel"].notna()]
    var = per[per["metric"].isin(["batch_var", "running_var"])]["value"]
    assert (var >= 0).all() and np.isfinite(per["value"]).all()
    chan = per.set_index(["step", "layer", "metric"]).sort_values("channel")["value"]
    for step, layers in ref.channels.items():
        for layer, moments in layers.items():
            for metric, want in moments.items():
                have = chan[step, layer, metric].to_numpy()
                w = want.numpy()
                assert have == pytest.approx(w, rel=RTOL, abs=1e-9), (step, layer, metric)
                checked += len(w)
    return checked


@pytest.mark.parametrize("momentum", [0.01, 0.1])
def test_depthwise_numbers_match_float64(tmp_path, momentum) -> None:
    """torchvision init: depthwise BN inputs of variance ~1e-3 against eps 1e-3. At momentum 0.1
    the update would give their moments with ~1e-3 relative error: the tap measures directly."""
    df, ref, _ = _run(lambda: R.DepthwiseNet(hidden=576, momentum=momentum),
                        R.image_data(size=8), 12, tmp_path)  # fmt: skip
    assert _compare(df, ref) > 12 * 7 * 25
    dw = df[(df["layer"] == "net.blocks.1.block.1.1") & (df["metric"] == "batch_var")]
    assert dw["value"].max() < 0.05  # the pattern is there: variance comparable to eps


def test_dying_channel_on_raw_pixels_matches_float64(tmp_path) -> None:
    """0..255 inputs; channel 0 of bn1 dies at step 4: its batch variance is then exactly 0
    while its running variance is in the hundreds. Nothing is NaN, var_shift and kl finite."""
    df, ref, _ = _run(lambda: R.Raw255Net(die_at=4), R.raw255_data(), 12, tmp_path,
                            momentum=0.0, lr=0.01)  # fmt: skip
    _compare(df, ref)
    train = df[df["stage"] == "train"]
    ch = train[(train["layer"] == "net.bn1") & (train["channel"] == 0)].pivot(
        index="step", columns="metric", values="value"
    )
    assert (ch.loc[4:, "batch_var"] == 0).all()
    assert (ch.loc[4:6, "running_var"] > 100).all()
    assert np.isfinite(ch[["var_shift", "kl"]]).all().all()
    assert (ch.loc[4:, "var_shift"] > 15).all()  # log(var_R / eps): the real, huge, shift


def test_zero_init_resnet_gamma_drift_is_finite(tmp_path) -> None:
    df, ref, net = _run(R.ZeroInitResNet, R.image_data(), 8, tmp_path)
    _compare(df, ref)
    train = df[df["stage"] == "train"]
    drift = train[(train["layer"] == "net.layer1.0.bn2") & (train["metric"] == "gamma_drift")]
    drift = drift[drift["channel"].isna()].set_index("step")["value"]
    assert drift[0] == 0.0 and drift[7] > 0.0
    gamma = net.layer1[0].bn2.weight.detach().double()
    assert drift[7] == pytest.approx(float(gamma.norm() / math.sqrt(gamma.numel())), rel=0.5)


@pytest.mark.parametrize("make", [R.FusedNet, R.WrappedDropoutNet])
def test_fused_and_wrapped_numbers_match_float64(tmp_path, make) -> None:
    df, ref, _ = _run(make, R.image_data(), 6, tmp_path)
    assert _compare(df, ref) > 6 * 2 * 25


def test_frozen_bn_finetune_numbers_and_warmup(tmp_path) -> None:
    """Frozen (eval-mode) BN layers: moments computed directly; num_batches_tracked stays what
    the "pretrained" buffers say and the warm-up residual is taken from the first measurement."""
    data = R.image_data()

    def make() -> nn.Module:
        net = R.FrozenBNFinetune()
        net.pretrain([x for x, _ in data.train])
        return net

    df, ref, _ = _run(make, data, 6, tmp_path)
    _compare(df, ref)
    rows = df[(df["layer"] == "net.backbone.1") & df["channel"].isna() & (df["stage"] == "train")]
    nbt = rows[rows["metric"] == "num_batches_tracked"]["value"]
    assert (nbt == 8).all()  # 8 pretraining batches, no update since
    assert (rows[rows["metric"] == "warmup_residual"]["value"] == 1.0).all()  # nothing learned


def test_warmup_and_excess_on_momentum_001(tmp_path) -> None:
    """At momentum 0.01 the running statistics are mostly their initial (0, 1) after 12 steps:
    r = 0.99**n, and the excess shift (against warm-up-corrected statistics) is far below the
    raw one on the depthwise layers."""
    df, _, _ = _run(lambda: R.DepthwiseNet(momentum=0.01), R.image_data(), 12, tmp_path)
    agg = df[(df["stage"] == "train") & df["channel"].isna()]
    layer_name = "net.blocks.1.block.1.1"
    layer = agg[agg["layer"] == layer_name].pivot(index="step", columns="metric", values="value")
    assert layer["num_batches_tracked"].tolist() == list(range(12))
    assert layer["warmup_residual"].to_numpy() == pytest.approx(0.99 ** np.arange(12))
    late = layer.loc[6:]
    assert (late["var_shift_excess"] < 0.25 * late["var_shift"]).all()
    val = df[(df["stage"] == "val") & df["channel"].isna() & (df["layer"] == layer_name)]
    val = val.set_index("metric")["value"]  # after epoch 1: 8 updates
    assert val["num_batches_tracked"] == 8
    assert val["warmup_residual"] == pytest.approx(0.99**8)


def test_check_mismatch_rows_carry_update_count_and_leave_state_bit_identical(tmp_path) -> None:
    data = R.image_data()
    net = R.DepthwiseNet(momentum=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        R.fit(net, data, 12, None, root=tmp_path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    rows = check_mismatch(net, data.probe_batch)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(before[k].dtype == after[k].dtype for k in before)
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    got = rows.set_index(["layer", "metric"])["value"]
    assert got["blocks.1.block.1.1", "num_batches_tracked"] == 12
    assert got["blocks.1.block.1.1", "warmup_residual"] == pytest.approx(0.99**12)
    assert got["blocks.1.block.1.1", "running_invalid"] == 0
    assert (rows["step"] == 12).all()  # no step given: the model's own update count
    # re-estimating the running statistics on the probe batch would change predictions:
    # eval mode is broken (68% of the initial variance 1 still in the running variance)
    assert got["<model>", "recal_logits_shift"] > 0.1
    assert 0 < got["<model>", "recal_pred_change"] <= 1
    assert got["<model>", "recal_pred_change"] == pytest.approx(
        1 - got["<model>", "pred_agreement"], abs=0.1
    )
    assert rows.equals(check_mismatch(net, data.probe_batch))  # same state, same numbers


@pytest.mark.parametrize(
    "make",
    [R.ZeroInitResNet, R.DepthwiseNet, R.FusedNet, R.WrappedDropoutNet, R.Raw255Net,
     R.FrozenBNFinetune],
)  # fmt: skip
def test_check_mismatch_on_every_replica_is_finite_and_leaves_it_bit_identical(make) -> None:
    torch.manual_seed(0)
    net = make()
    raw = make is R.Raw255Net
    data = R.raw255_data() if raw else R.image_data()
    net.train()
    with torch.no_grad():
        for x, _ in data.train:  # 8 training-mode forwards: running statistics of the data
            net(x)
    if isinstance(net, R.Raw255Net):
        net.on_step(10)  # channel 0 of conv1 dies: bn1's input is 0 there, running var is not
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    rows = check_mismatch(net, data.probe_batch, recal_batches=[next(iter(data.val or []))])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == flags
    assert np.isfinite(rows["value"]).all()
    got = rows.set_index(["layer", "metric"])["value"]
    first = next(n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert got[first, "local_gap"] == pytest.approx(got[first, "output_gap"], rel=1e-5)
    assert (rows[rows["metric"] == "running_invalid"]["value"] == 0).all()
