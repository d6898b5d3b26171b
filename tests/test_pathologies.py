"""The pathology zoo on real (short) demo runs: each problem is reported as the right kind on the
right layer, and the healthy demo reports no warning or error."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from bnprobe import diagnosis as dg
from bnprobe.callback import BNProbe
from bnprobe.demo import DemoDataModule, DemoModule
from bnprobe.diagnosis import Finding, Thresholds, diagnose, worst_values
from bnprobe.pathologies import EXPECTED, PATHOLOGIES, EvalOnlyBatchNorm2d, apply_pathology

Runner = Callable[[str | None, int], pd.DataFrame]

BATCH = 16
WARM_STEPS = 30  # (1 - 0.1) ** 30 = 4% of the initial running statistics left: warmed up
SHORT_STEPS = 6  # enough for the structural problems (frozen_bn needs 3 logged steps)


def fit(tmp_path: Path, name: str | None, steps: int) -> pd.DataFrame:
    """One epoch of the demo with BNProbe measuring every step, then one validation epoch."""
    pl.seed_everything(0, verbose=False)
    module = DemoModule()
    data = DemoDataModule(batch_size=BATCH, num_train=steps * BATCH, num_val=64)
    if name is not None:
        apply_pathology(name, module, data)
    probe = BNProbe(every_n_steps=1, save_dir=False, histograms=False, summary=False)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return probe.to_dataframe()


_CACHE: dict[tuple[str | None, int], pd.DataFrame] = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    """fit() with results kept for the module: each configuration trains once."""

    def get(name: str | None, steps: int) -> pd.DataFrame:
        key = (name, steps)
        if key not in _CACHE:
            _CACHE[key] = fit(tmp_path_factory.mktemp("fit"), name, steps)
        return _CACHE[key].copy()

    return get


def serious(findings: list[Finding]) -> list[str]:
    return [f"{f.severity} {f.kind} on {f.layer}" for f in findings if f.severity != "info"]


def test_healthy_demo_has_no_warning_or_error_with_margin(run: Runner) -> None:
    df = run(None, WARM_STEPS)
    found = diagnose(df)
    assert serious(found) == []
    assert {f.kind for f in found} <= {"bias_before_bn"}  # the demo's convs have bias=False
    # the run went through warm-up: the first train step shows a large shift, the last does not
    train = df[(df["stage"] == "train") & (df["metric"] == "var_shift") & df["channel"].isna()]
    assert train[train["step"] == 0]["value"].max() > 1.0
    assert train[train["step"] == WARM_STEPS - 1]["value"].max() < 0.5
    # and what the rules compare stays well inside each threshold (the calibration margin)
    worst = worst_values(df)
    for name, (constant, direction) in dg.CALIBRATION.items():
        limit, value = getattr(Thresholds(), constant), worst[name]
        if math.isnan(value):
            continue
        if direction == "max":
            assert value < 0.75 * limit or (limit == 0.0 and value == 0.0), (name, value, limit)
        else:
            assert value > 1.25 * limit, (name, value, limit)
    assert not math.isnan(worst["val_mean_shift"]) and not math.isnan(worst["local_gap"])


def test_healthy_demo_still_warming_up_has_no_warning(run: Runner) -> None:
    df = run(None, SHORT_STEPS)
    assert serious(diagnose(df)) == []


@pytest.mark.parametrize("name", sorted(PATHOLOGIES))
def test_each_pathology_is_reported_on_the_right_layer(run: Runner, name: str) -> None:
    kind, layers = EXPECTED[name]
    df = run(name, WARM_STEPS if name == "shifted_val" else SHORT_STEPS)
    if name == "tiny_batches" and "batch_size" not in set(df["metric"]):
        pytest.skip(
            "the demo's conv layers see 2x28x28 values per channel: small_batch needs "
            "the tap's batch_size metric"
        )
    found = [f for f in diagnose(df) if f.kind == kind]
    assert sorted(f.layer for f in found) == sorted(layers), [str(f) for f in diagnose(df)]
    for f in found:
        assert f.message and f.layer in f.message
        assert f.advice.endswith(f"See {dg.DOCS_URL}#{kind}.")
        expected = "error" if kind == "nonfinite" else "info" if kind in _INFO else "warning"
        assert f.severity == expected


_INFO = {"bias_before_bn", "no_running_stats"}


def test_shifted_validation_data_also_shows_in_the_train_eval_probe(run: Runner) -> None:
    found = diagnose(run("shifted_val", WARM_STEPS))
    gap = {f.layer: f for f in found if f.kind == "train_eval_gap"}
    assert "net.features.1" in gap and gap["net.features.1"].severity == "warning"
    stale = next(f for f in found if f.kind == "stale_running_stats")
    assert stale.evidence["stage"] == "val"
    assert float(stale.evidence["var_shift"]) > 1.0  # val images scaled by 3: variance x 9


def test_nan_input_names_the_first_layer_as_origin(run: Runner) -> None:
    found = [f for f in diagnose(run("nan_input", SHORT_STEPS)) if f.severity == "error"]
    assert found and all(f.kind == "nonfinite" for f in found)
    assert found[0].layer == "net.features.1"
    assert {f.evidence["origin_layer"] for f in found} == {"net.features.1"}


def test_apply_pathology_rejects_unknown_names_and_other_modules() -> None:
    with pytest.raises(ValueError, match="unknown pathology 'nope'; choose one of: bias_before_bn"):
        apply_pathology("nope", DemoModule(), DemoDataModule())
    with pytest.raises(TypeError, match="DemoModule whose net is a DemoNet"):
        apply_pathology("tf_momentum", DemoModule(net=nn.Linear(2, 2)), DemoDataModule())
    assert set(PATHOLOGIES) == set(EXPECTED)


def test_eval_only_batchnorm_stays_in_eval_mode() -> None:
    bn = EvalOnlyBatchNorm2d(3)
    model = nn.Sequential(bn).train()
    assert not bn.training and model.training
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 2, 2) + 5.0)
    assert torch.equal(bn.running_mean, before)
