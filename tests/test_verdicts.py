"""Verdicts on real fits of the replicas of real-world models (tests/replicas.py): the right kind on
the right layer with the right severity, and no false alarm on stock inits.

Each fit is tiny (a few seconds on a CPU) and shared by the tests of this module.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd
import pytest
import torch

import bnprobe
from bnprobe import BNProbe, check_mismatch, diagnose
from bnprobe.diagnosis import Finding, format_report
from tests import replicas as R

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def seeded() -> None:
    """The nets are built before ``R.fit`` seeds: seed their init too, so that a fit does not
    depend on which tests ran before it."""
    torch.manual_seed(0)


def probe() -> BNProbe:
    return BNProbe(every_n_steps=1, save_dir=False, histograms=False, summary=False)


def serious(findings: list[Finding]) -> list[str]:
    return [f"{f.severity} {f.kind} on {f.layer}" for f in findings if f.severity != "info"]


def of(findings: list[Finding], kind: str) -> dict[str, Finding]:
    return {f.layer: f for f in findings if f.kind == kind}


class Fitted:
    def __init__(self, fit: R.Fit, data: R.Data) -> None:
        self.fit, self.data = fit, data
        self.df: pd.DataFrame = fit.probe.to_dataframe()
        self.findings = diagnose(self.df)
        self.net: torch.nn.Module = fit.module.net


@pytest.fixture(scope="module")
def zero_init() -> Fitted:
    """A healthy zero-init ResNet (gamma = 0 in every block's last BN), 30 steps."""
    seeded()
    data = R.image_data(batches=10)
    return Fitted(R.fit(R.ZeroInitResNet(), data, 30, probe()), data)


@pytest.fixture(scope="module")
def depthwise() -> Fitted:
    """The stock MobileNetV3-like net (torchvision init, BN eps 1e-3, momentum 0.01), 40 steps:
    67% of the initial running statistics are left, its eval mode is broken."""
    seeded()
    data = R.image_data(batches=10)
    return Fitted(R.fit(R.DepthwiseNet(), data, 40, probe()), data)


@pytest.fixture(scope="module")
def shifted() -> Fitted:
    """Validation set shifted by 4 standard deviations and scaled by 3; validation after 20
    training steps (12% of the initial statistics left at momentum 0.1)."""
    seeded()
    data = R.image_data(batches=20, val_shift=4.0, val_scale=3.0)
    return Fitted(R.fit(R.ZeroInitResNet(zero_init=False), data, 20, probe()), data)


@pytest.fixture(scope="module")
def wrapped() -> Fitted:
    seeded()
    data = R.image_data(batches=5)
    return Fitted(R.fit(R.WrappedDropoutNet(), data, 5, probe()), data)


# -- no false alarm on a stock init ----------------------------------------------------------------


def test_zero_init_resnet_is_quiet_and_gamma_drift_finite(zero_init: Fitted) -> None:
    df, found = zero_init.df, zero_init.findings
    zero_layers = ["net.layer1.0.bn2", "net.layer1.1.bn2"]
    first = df[(df["stage"] == "train") & (df["metric"] == "gamma_mean") & (df["step"] == 0)]
    assert set(first.loc[first["value"] == 0.0, "layer"]) == set(zero_layers)  # really zero-init
    assert of(found, "dead_channels") == {}
    assert serious(found) == []
    drift = df[(df["metric"] == "gamma_drift") & df["layer"].isin(zero_layers)]["value"]
    assert len(drift) and bool(drift.map(math.isfinite).all()), drift.tolist()
    text = format_report(df, found)
    assert not re.search(r"\b(nan|inf)\b", text, flags=re.I), text


# -- a broken eval mode is not excused as warm-up ---------------------------------------------


def test_momentum_001_depthwise_net_with_broken_eval_mode_warns(depthwise: Fitted) -> None:
    # the eval mode really is broken: accuracy at chance with running statistics
    eval_acc = R.eval_accuracy(depthwise.net, depthwise.data)
    batch_acc = R.eval_accuracy(depthwise.net, depthwise.data, batch_stats=True)
    assert batch_acc - eval_acc > 0.4, (eval_acc, batch_acc)
    gap = of(depthwise.findings, "train_eval_gap")
    f = gap["<model>"]
    assert f.severity == "warning"
    assert "still warming up" in f.message and "momentum 0.01" in f.message
    assert "bnprobe.recalibrate(" in f.advice and "higher momentum" in f.advice
    assert float(f.evidence["pred_agreement"]) < 0.8


def test_stock_depthwise_init_is_not_variance_collapse(depthwise: Fitted) -> None:
    found = depthwise.findings
    assert of(found, "variance_collapse") == {}
    small = of(found, "small_input_variance")
    assert small, [str(f) for f in found]
    assert all(f.severity == "info" for f in small.values())
    # the depthwise convs' BN layers (block.1.1) are the ones named
    assert {la.rsplit(".block.", 1)[-1] for la in small} == {"1.1"}
    # the running statistics that lag (67% of their initial values left) are the only complaint
    assert {f.kind for f in found if f.severity != "info"} <= {
        "stale_running_stats",
        "train_eval_gap",
    }


def test_standalone_check_on_the_trained_depthwise_net_warns(depthwise: Fitted) -> None:
    x, _ = depthwise.data.probe_batch
    rows = check_mismatch(depthwise.net, x)
    found = diagnose(rows)
    assert of(found, "train_eval_gap")["<model>"].severity == "warning"


def test_shifted_validation_set_20_steps_in_warns(shifted: Fitted) -> None:
    found = shifted.findings
    assert of(found, "train_eval_gap")["<model>"].severity == "warning"
    stale = of(found, "stale_running_stats")
    assert "net.bn1" in stale, [str(f) for f in found]
    f = stale["net.bn1"]
    assert (f.severity, f.step, f.evidence["stage"]) == ("warning", 20, "val")
    assert float(f.evidence["mean_shift_excess"]) > 2.0


# -- producers wrapped in a container ---------------------------------------------------------


def test_wrapped_dropout_and_bias_are_found_on_the_right_layer(wrapped: Fitted) -> None:
    found = wrapped.findings
    assert list(of(found, "dropout_before_bn")) == ["net.bn1"]
    assert of(found, "dropout_before_bn")["net.bn1"].severity == "warning"
    assert list(of(found, "bias_before_bn")) == ["net.bn2"]
    assert of(found, "bias_before_bn")["net.bn2"].severity == "info"


# -- invalid running statistics --------------------------------------------------------------------


def test_negative_running_variance_is_an_error_on_its_layer_standalone(zero_init: Fitted) -> None:
    net: Any = zero_init.net
    saved = net.layer1[0].bn1.running_var.clone()
    try:
        with torch.no_grad():
            net.layer1[0].bn1.running_var[3] = -0.5
        rows = check_mismatch(net, zero_init.data.probe_batch[0])
    finally:
        with torch.no_grad():
            net.layer1[0].bn1.running_var.copy_(saved)
    found = diagnose(rows)
    errors = {f.layer: f for f in found if f.severity == "error"}
    assert list(errors) == ["layer1.0.bn1"], [str(f) for f in found]
    assert errors["layer1.0.bn1"].kind == "nonfinite"
    assert "nan%" not in format_report(rows, found)


def test_diagnose_stays_the_function(zero_init: Fitted) -> None:
    assert bnprobe.diagnose is diagnose and callable(bnprobe.diagnose)


# -- a channel that dies mid-run; frozen BN fine-tuning ----------------------------------------


@pytest.fixture(scope="module")
def raw255() -> Fitted:
    """0..255 inputs; ReLU channel 0 before ``bn1`` dies at step 10 (batch variance exactly 0)."""
    data = R.raw255_data(batches=10)
    x = next(iter(data.train))[0]
    for seed in range(20):  # an init without a ReLU channel that is dead from the start
        torch.manual_seed(seed)
        net = R.Raw255Net(die_at=10)
        with torch.no_grad():
            alive = torch.relu(net.conv1(x)).amax(dim=(0, 2, 3)) > 0
        if bool(alive.all()):
            break
    return Fitted(R.fit(net, data, 30, probe(), momentum=0.0), data)


def test_a_channel_that_dies_mid_run_is_a_variance_collapse_from_then_on(raw255: Fitted) -> None:
    collapse = of(raw255.findings, "variance_collapse")
    assert list(collapse) == ["net.bn1"], [str(f) for f in raw255.findings]
    f = collapse["net.bn1"]
    assert (f.severity, f.step) == ("warning", 10)
    assert "more than at the start" in f.message
    assert of(raw255.findings, "nonfinite") == {}  # exact 0 variance is no NaN
    text = format_report(raw255.df, raw255.findings)
    assert not re.search(r"\b(nan|inf)\b", text, flags=re.I), text


@pytest.fixture(scope="module")
def frozen() -> Fitted:
    seeded()
    data = R.image_data(batches=10)
    net = R.FrozenBNFinetune()
    net.pretrain([x for x, _ in data.train])
    return Fitted(R.fit(net, data, 20, probe()), data)


def test_frozen_bn_fine_tuning_names_each_frozen_layer_and_nothing_else(frozen: Fitted) -> None:
    bns = [n for n, m in frozen.net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    found = frozen.findings
    assert sorted(of(found, "frozen_bn")) == sorted(f"net.{n}" for n in bns)
    assert all(f.severity == "warning" for f in of(found, "frozen_bn").values())
    assert {f.kind for f in found if f.severity != "info"} == {"frozen_bn"}


# -- what recalibration would buy ------------------------------------------------------------------


def test_a_gap_that_recalibration_closes_is_reported_with_its_size() -> None:
    """A ResNet whose BN momentum is 0.02: after 30 steps 55% of the initial statistics are
    left, eval accuracy lags the batch-statistics accuracy, and re-estimated statistics would
    change a share of the predictions that the finding quotes."""
    seeded()
    data = R.image_data(batches=10)
    net = R.ZeroInitResNet(zero_init=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.02
    fitted = Fitted(R.fit(net, data, 30, probe()), data)
    f = of(fitted.findings, "train_eval_gap")["<model>"]
    change = float(f.evidence["recal_pred_change"])
    assert f.severity == "warning" and change > 0.04
    assert f"Recalibrating would change {change:.0%} of the eval-mode predictions" in f.message
    assert R.eval_accuracy(fitted.net, data, batch_stats=True) > R.eval_accuracy(fitted.net, data)
