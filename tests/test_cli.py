"""The command line, run as a user runs it: `python -m bnprobe ...` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bnprobe import load
from bnprobe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def bnprobe_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnprobe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """``bnprobe ARGS`` in this process (``bnprobe.cli.main``): the exit code, stdout and stderr
    that the subprocess gives, without a new interpreter's ~10 s of imports."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["bnprobe", *args], code, out, err)

    return run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("demo")
    done = bnprobe_cli(
        "demo", "--epochs", "1", "--num-train", "512", "--num-val", "128", "--out", str(out),
        cwd=out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out / "demo" / "version_0", done


def test_demo_prints_where_the_logs_are_and_a_report(demo_run) -> None:
    run, done = demo_run
    assert f"tensorboard --logdir {run.parent.parent}" in done.stdout
    assert str(run) in done.stdout
    assert "net.features.1" in done.stdout and "net.features.5" in done.stdout
    df = load(run)
    assert set(df["stage"]) == {"train", "val", "probe"}
    assert list(run.glob("events.out.tfevents.*"))


def test_report_text_json_and_fail_on(demo_run, tmp_path, cli) -> None:
    run, _ = demo_run
    text = cli("report", str(run), cwd=tmp_path)
    assert text.returncode == 0 and "net.features.5" in text.stdout
    as_json = cli("report", str(run), "--format", "json", cwd=tmp_path)
    doc = json.loads(as_json.stdout)
    assert isinstance(doc, dict) and "findings" in doc
    serious = [f for f in doc["findings"] if f["severity"] in ("warning", "error")]
    gate = cli("report", str(run), "--fail-on", "warning", cwd=tmp_path)
    assert gate.returncode == (1 if serious else 0)


def test_export_parquet_and_csv_match_the_store(demo_run, tmp_path, cli) -> None:
    run, _ = demo_run
    store = load(run)
    for name in ("table.parquet", "table.csv"):
        done = cli("export", str(run), "-o", str(tmp_path / name), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"wrote {len(store)} rows" in done.stdout
    pd.testing.assert_frame_equal(load(tmp_path / "table.parquet"), store)  # schema kept
    csv = pd.read_csv(tmp_path / "table.csv")
    assert list(csv.columns) == list(store.columns) and len(csv) == len(store)
    assert csv["value"].to_numpy() == pytest.approx(store["value"].to_numpy(), nan_ok=True)


def test_export_from_event_files_when_there_is_no_store(demo_run, tmp_path, cli) -> None:
    run, _ = demo_run
    events_only = tmp_path / "events_only"
    events_only.mkdir()
    for f in run.glob("events.out.tfevents.*"):
        (events_only / f.name).write_bytes(f.read_bytes())
    done = cli("export", str(events_only), "-o", str(tmp_path / "t.csv"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exported = pd.read_csv(tmp_path / "t.csv")
    store = load(run)
    assert len(exported) == int(store["channel"].isna().sum())


@pytest.mark.parametrize("command", ["report", "export"])
def test_missing_or_empty_run_is_a_one_line_error(tmp_path, command, cli) -> None:
    extra = ["-o", str(tmp_path / "x.csv")] if command == "export" else []
    for run in (tmp_path / "nope", tmp_path):
        done = cli(command, str(run), *extra, cwd=tmp_path)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert str(run) in done.stderr


def test_export_refuses_an_unknown_extension(demo_run, tmp_path, cli) -> None:
    run, _ = demo_run
    done = cli("export", str(run), "-o", str(tmp_path / "t.xlsx"), cwd=tmp_path)
    assert done.returncode == 2 and ".parquet or .csv" in done.stderr


def test_demo_lists_pathologies_and_refuses_an_unknown_one(tmp_path, cli) -> None:
    listed = cli("demo", "--list", cwd=tmp_path)
    assert listed.returncode == 0 and "shifted_val" in listed.stdout
    bad = cli("demo", "--pathology", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "unknown pathology 'nope'" in bad.stderr and "shifted_val" in bad.stderr


def test_demo_lists_every_registered_pathology_with_its_finding(tmp_path, cli) -> None:
    from bnprobe.pathologies import PATHOLOGIES

    listed = cli("demo", "--list", cwd=tmp_path).stdout.splitlines()
    assert len(listed) == 2 * len(PATHOLOGIES)
    for (name, entry), first, second in zip(
        PATHOLOGIES.items(), listed[::2], listed[1::2], strict=True
    ):
        assert first.split(maxsplit=1) == [name, entry.description]
        assert second.strip() == f"expect: {entry.finding}"


def test_demo_with_a_pathology_reports_its_finding(tmp_path, cli) -> None:
    done = cli(
        "demo", "--pathology", "frozen_bn", "--epochs", "1", "--num-train", "128",
        "--num-val", "32", "--batch-size", "16", "--every-n-steps", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "look for:     frozen_bn (warning) on net.features.5" in done.stdout
    report = done.stdout.split("look for:", 1)[1]
    assert "frozen_bn" in report.split("\n", 1)[1]  # the report itself names it
    assert load(tmp_path / "frozen_bn" / "version_0")["layer"].eq("net.features.5").any()
