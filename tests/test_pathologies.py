"""The pathology zoo on real (short) demo runs: each problem is reported as the right kind on the
right layer, and the healthy demo reports no warning or error."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from bnprobe import diagnosis as dg
from bnprobe.demo import DemoDataModule, DemoModule
from bnprobe.diagnosis import Finding, Thresholds, diagnose, worst_values
from bnprobe.pathologies import (
    PATHOLOGIES,
    SHORT_STEPS,
    WARM_STEPS,
    EvalOnlyBatchNorm2d,
    apply_pathology,
    fit,
)

Runner = Callable[[str | None, int], pd.DataFrame]

_CACHE: dict[tuple[str | None, int], pd.DataFrame] = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    """bnprobe.pathologies.fit() with results kept for the module: each configuration trains
    once."""

    def get(name: str | None, steps: int) -> pd.DataFrame:
        key = (name, steps)
        if key not in _CACHE:
            _CACHE[key] = fit(name, steps, root=tmp_path_factory.mktemp("fit"))
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


@pytest.mark.parametrize("name", list(PATHOLOGIES))
def test_each_pathology_is_reported_on_the_right_layer(run: Runner, name: str) -> None:
    """Every finding the registry expects, on exactly its layers with its severity, and no
    other finding of any severity."""
    entry = PATHOLOGIES[name]
    findings = diagnose(run(name, entry.steps))
    everything = [str(f) for f in findings]
    for expected in entry.expected:
        found = [f for f in findings if f.kind == expected.kind]
        assert sorted(f.layer for f in found) == sorted(expected.layers), everything
        for f in found:
            assert f.severity == expected.severity, everything
            assert f.message and (f.layer in f.message or f.layer == "<model>")
            assert f.advice.endswith(f"See {dg.DOCS_URL}#{f.kind}.")
    assert {f.kind for f in findings} == {e.kind for e in entry.expected}, everything
    # the kind each pathology is about: an error for NaN, info for the harmless structure
    kind = entry.finding.kind
    severity = "error" if kind == "nonfinite" else "info" if kind in _INFO else "warning"
    assert entry.finding.severity == severity


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
    assert len(PATHOLOGIES) == 11 and all(p.expected for p in PATHOLOGIES.values())
    assert all(name == p.name for name, p in PATHOLOGIES.items())


def test_eval_only_batchnorm_stays_in_eval_mode() -> None:
    bn = EvalOnlyBatchNorm2d(3)
    model = nn.Sequential(bn).train()
    assert not bn.training and model.training
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 2, 2) + 5.0)
    assert torch.equal(bn.running_mean, before)


def test_the_calibration_tool_lists_its_healthy_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """tools/calibrate_thresholds.py (not shipped) stays runnable: its runs and its --only."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "calibrate_thresholds.py"
    spec = importlib.util.spec_from_file_location("calibrate_thresholds", path)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--list", "--only", "MLP"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 9 and all(line.startswith("MLP BatchNorm1d") for line in listed)
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--only", "no such run"])
    assert exit_.value.code == 2


def test_the_zoo_table_in_the_docs_matches_the_registry() -> None:
    """docs/diagnosis.md's table: one row per pathology, its main finding's kind and layers."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "diagnosis.md").read_text()
    section = text[text.index("### The pathology zoo") :]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        name, _, finding, layers = (cell.strip() for cell in row.strip("|").split("|"))
        table[name.strip("`")] = (finding, layers)
    assert list(table) == list(PATHOLOGIES)
    for name, (finding, layers) in table.items():
        entry = PATHOLOGIES[name].finding
        assert finding.split()[0] == f"`{entry.kind}`", name
        if layers == "both BN layers":
            assert entry.layers == ("net.features.1", "net.features.5"), name
        else:
            assert tuple(re.findall(r"`([^`]+)`", layers)) == entry.layers, name
        if entry.severity != "warning":
            assert f"({entry.severity}" in finding, name
