"""A folder of runs, as users have them: every run read and judged on its own, damaged files
reported with the documented exit code, never a traceback (real fits, real event files, real
parquet, the real command line in a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

import bnprobe
from bnprobe import BNProbe
from bnprobe.cli import EXIT_DATA, EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, main
from bnprobe.demo import DemoDataModule, DemoModule
from bnprobe.pathologies import apply_pathology
from bnprobe.store import STORE_NAME, StoreError

RUNS = {"healthy": None, "nan_input": "nan_input", "tf_momentum": "tf_momentum"}
"""Run folder name -> pathology: no finding, errors (NaN), warnings (momentum)."""


def bnprobe_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m bnprobe ARGS`` as a user runs it (a new interpreter: ~10 s of imports)."""
    return subprocess.run(
        [sys.executable, "-m", "bnprobe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """``bnprobe ARGS`` in this process (``bnprobe.cli.main``): the same exit code, stdout and
    stderr as the subprocess, without its imports; an exception would fail the test."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["bnprobe", *args], code, out, err)

    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/<name>/version_0`` for each of RUNS: a TensorBoard logger and the default store."""
    root = tmp_path_factory.mktemp("runs")
    for name, pathology in RUNS.items():
        pl.seed_everything(0)
        module, data = DemoModule(), DemoDataModule(num_train=256, num_val=64, batch_size=32)
        if pathology:
            apply_pathology(pathology, module, data)
        pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            callbacks=[BNProbe(every_n_steps=2, summary=False)],
            logger=TensorBoardLogger(root, name=name),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(module, data)
    return root


NAMES = [f"{name}/version_0" for name in RUNS]


def _one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- the readers ---------------------------------------------------------------------------------
def test_load_and_read_tensorboard_return_every_run_under_the_same_names(runs: Path) -> None:
    stored = bnprobe.load(runs)
    events = bnprobe.read_tensorboard(runs)
    assert list(stored.columns)[-1] == "run" and list(events.columns)[-1] == "run"
    assert sorted(stored["run"].unique()) == sorted(events["run"].unique()) == sorted(NAMES)
    for name in NAMES:  # nothing merged: each run holds exactly what its own folder holds
        alone = bnprobe.load(runs / name)
        mine = stored[stored["run"] == name].drop(columns="run").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)
        from_tb = events[events["run"] == name]
        assert len(from_tb) == int((alone["channel"].isna() & (alone["rank"] == 0)).sum())
    assert len(stored) == sum(len(bnprobe.load(runs / n)) for n in NAMES)


def test_diagnose_judges_each_run_on_its_own(runs: Path) -> None:
    findings = bnprobe.diagnose(bnprobe.load(runs))
    by_run: dict[str, set[str]] = {}
    for f in findings:
        if f.severity in ("warning", "error"):
            by_run.setdefault(str(f.run), set()).add(f.severity)
    assert by_run == {"nan_input/version_0": {"error"}, "tf_momentum/version_0": {"warning"}}


# -- report and export of a folder of runs -------------------------------------------------------
def test_report_fails_when_any_run_fails_and_can_pick_one(
    runs: Path, tmp_path: Path, cli: Any
) -> None:
    gate = bnprobe_cli("report", str(runs), "--fail-on", "error", cwd=tmp_path)
    assert gate.returncode == EXIT_FINDINGS, gate.stderr
    for name in NAMES:
        assert name in gate.stdout
    assert cli("report", str(runs), cwd=tmp_path).returncode == EXIT_OK
    healthy = cli(
        "report", str(runs), "--run", "healthy/version_0", "--fail-on", "warning", cwd=tmp_path
    )
    assert healthy.returncode == EXIT_OK, healthy.stdout + healthy.stderr
    assert "nan_input" not in healthy.stdout
    warned = cli(
        "report", str(runs), "--run", "tf_momentum/version_0", "--fail-on", "error", cwd=tmp_path
    )
    assert warned.returncode == EXIT_OK  # warnings only: below the error level
    line = _one_line_error(cli("report", str(runs), "--run", "nope", cwd=tmp_path), EXIT_USAGE)
    assert "no run 'nope'" in line and "'healthy/version_0'" in line


def test_export_of_a_folder_keeps_the_runs_apart(runs: Path, tmp_path: Path, cli: Any) -> None:
    out = tmp_path / "all.parquet"
    done = cli("export", str(runs), "-o", str(out), cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    assert "of 3 runs" in done.stdout
    exported = pd.read_parquet(out)
    pd.testing.assert_frame_equal(exported, bnprobe.load(runs), check_dtype=False)
    assert sorted(bnprobe.load(out)["run"].unique()) == sorted(NAMES)  # and reads back so


def test_runs_with_only_event_files_join_the_stored_ones(
    runs: Path, tmp_path: Path, cli: Any
) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(runs, folder)
    shutil.rmtree(folder / "healthy" / "version_0" / STORE_NAME)  # save_dir=False, say
    done = cli("export", str(folder), "-o", str(tmp_path / "t.csv"), cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    exported = pd.read_csv(tmp_path / "t.csv")
    assert sorted(exported["run"].unique()) == sorted(NAMES)
    from_events = bnprobe.read_tensorboard(folder / "healthy" / "version_0")
    assert int((exported["run"] == "healthy/version_0").sum()) == len(from_events)


# -- damaged data and files that are not runs ----------------------------------------------------
def _parts(run: Path) -> list[Path]:
    return sorted((run / STORE_NAME).glob("part-*.parquet"))


def test_a_damaged_part_is_skipped_with_one_warning(runs: Path, tmp_path: Path, cli: Any) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(runs, folder)
    run = folder / "healthy" / "version_0"
    (part,) = _parts(run)
    whole = bnprobe.load(run)
    copy = part.with_name(part.name.replace("-000000", "-000001"))
    shutil.copy(part, copy)  # the same rows twice: the second copy is then damaged
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    empty = folder / "nan_input" / "version_0" / STORE_NAME / "part-r0000-0-0-000009.parquet"
    empty.write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped the unreadable part") as record:
        df = bnprobe.load(folder)
    warned = sorted(str(w.message) for w in record)
    assert len(warned) == 2 and str(copy) in warned[1] + warned[0] and str(empty) in "".join(warned)
    pd.testing.assert_frame_equal(
        df[df["run"] == "healthy/version_0"].drop(columns="run").reset_index(drop=True), whole
    )
    done = cli("report", str(folder), cwd=tmp_path)
    assert done.returncode == EXIT_DATA and "Traceback" not in done.stderr
    assert done.stderr.count("skipped the unreadable part") == 2
    assert len(done.stderr.strip().splitlines()) == 2  # one line each
    assert "healthy/version_0" in done.stdout  # the rest is reported
    gate = cli("report", str(folder), "--fail-on", "error", cwd=tmp_path)
    assert gate.returncode == EXIT_FINDINGS  # the NaN run still fails the gate


def test_a_store_with_every_part_damaged_is_a_data_error(
    tmp_path: Path, runs: Path, cli: Any
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs / "healthy" / "version_0" / STORE_NAME, run / STORE_NAME)
    (part,) = _parts(run)
    part.write_bytes(part.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(StoreError, match="unreadable"):
        bnprobe.load(run)
    for target in (run, part):  # the run folder, and the truncated part passed as RUN
        line = _one_line_error(bnprobe_cli("report", str(target), cwd=tmp_path), EXIT_DATA)
        assert str(part) in line or "could not be read" in line
    part.write_bytes(b"")
    line = _one_line_error(cli("report", str(part), cwd=tmp_path), EXIT_DATA)
    assert str(part) in line


def test_an_event_file_or_a_csv_as_run_says_what_run_should_be(
    runs: Path, tmp_path: Path, cli: Any
) -> None:
    events = sorted((runs / "healthy" / "version_0").glob("events.out.tfevents.*"))
    assert len(events) == 2  # Lightning's and bnprobe's own (``*.bnprobe``)
    event = events[-1]
    csv = tmp_path / "table.csv"
    assert bnprobe_cli("export", str(runs), "-o", str(csv), cwd=tmp_path).returncode == EXIT_OK
    for path, kind in ((event, "a TensorBoard event file"), (csv, "a CSV file")):
        for command in ("report", "export"):
            extra = ["-o", str(tmp_path / "x.parquet")] if command == "export" else []
            done = cli(command, str(path), *extra, cwd=tmp_path)
            line = _one_line_error(done, EXIT_USAGE)
            assert kind in line and "RUN is a run folder" in line, line
    with pytest.raises(ValueError, match="is a CSV file, not a bnprobe store"):
        bnprobe.load(csv)


def test_a_closed_pipe_ends_quietly(runs: Path, tmp_path: Path) -> None:
    """``bnprobe report RUN | head -1``: the reader goes away before the report is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnprobe", "report", str(runs), "--format", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has even imported bnprobe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_OK
    assert err == ""


def test_old_stores_in_a_bnprobe_folder_stay_readable(runs: Path, tmp_path: Path, cli: Any) -> None:
    old = tmp_path / "old" / "version_0"
    shutil.copytree(runs / "healthy" / "version_0" / STORE_NAME, old / "bnprobe")
    new = tmp_path / "old" / "version_1"
    shutil.copytree(runs / "tf_momentum" / "version_0" / STORE_NAME, new / STORE_NAME)
    df = bnprobe.load(tmp_path / "old")
    assert sorted(df["run"].unique()) == ["version_0", "version_1"]
    pd.testing.assert_frame_equal(bnprobe.load(old), bnprobe.load(runs / "healthy" / "version_0"))
    done = cli("report", str(old), cwd=tmp_path)
    assert done.returncode == EXIT_OK and "net.features.1" in done.stdout


def test_the_nan_run_draws_its_figures_without_warnings(runs: Path) -> None:
    import warnings

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnprobe import figures
    from bnprobe import tensorboard as tb

    run = runs / "nan_input" / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    assert "bnprobe/probe/figure/gaps" in acc.Tags()["images"]
    df = bnprobe.load(run)
    df = df[df["metric"].isin(tb.FIGURE_METRICS)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = figures.gap_bars(df)
        tb.render(fig)
        for stage in ("train", "val"):
            tb.render(figures.shift_heatmap(df, stage))
    ax = fig.axes[0]
    probe = df[(df["stage"] == "probe") & (df["layer"] != "<model>")]
    latest = probe[probe["step"] == probe["step"].max()]
    nonfinite = int((~np.isfinite(latest["value"].to_numpy(dtype=float))).sum())
    assert nonfinite > 0  # the NaN run has NaN or inf gaps ...
    assert len(ax.texts) == nonfinite  # ... and each is written where its bar would be
    assert "logits_gap" in ax.get_title()


def test_a_run_whose_store_cannot_be_read_is_read_from_its_event_files(
    runs: Path, tmp_path: Path, cli: Any
) -> None:
    folder = tmp_path / "folder"
    shutil.copytree(runs / "healthy", folder / "healthy")
    (part,) = _parts(folder / "healthy" / "version_0")
    part.write_bytes(b"")
    done = cli("export", str(folder), "-o", str(tmp_path / "t.csv"))
    assert done.returncode == EXIT_DATA  # the report is there, but not from every file
    assert "skipped the unreadable part" in done.stderr and str(part) in done.stderr
    exported = pd.read_csv(tmp_path / "t.csv")
    assert len(exported) == len(bnprobe.read_tensorboard(folder)) > 0
