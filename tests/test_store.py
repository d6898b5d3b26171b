"""The parquet store: schema, atomic part files, dedupe on resume, and rows surviving SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bnprobe.store import COLUMNS, Store, concat, dedupe, load, make_rows


def _rows(step: int, value: float) -> pd.DataFrame:
    return make_rows(
        step=step, epoch=0, stage="train", rank=0,
        layers=["bn", "bn"], metrics=["mean_shift", "kl"], values=[value, value / 2],
    )  # fmt: skip


def test_flush_writes_complete_parts_and_load_reads_them(tmp_path) -> None:
    store = Store(tmp_path)
    store.append(_rows(0, 1.0))
    first = store.flush()
    store.append(_rows(1, 2.0))
    store.flush()
    assert store.flush() is None  # nothing pending
    assert first is not None and first.name.startswith("part-r0000-")
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    df = load(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert df["value"].tolist() == [1.0, 0.5, 2.0, 1.0]
    pd.testing.assert_frame_equal(df, store.to_dataframe())


def test_load_finds_the_store_below_a_run_folder(tmp_path) -> None:
    store = Store(tmp_path / "version_0" / "bnprobe")
    store.append(_rows(0, 1.0))
    store.flush()
    assert len(load(tmp_path)) == 2


def test_a_half_written_file_is_invisible(tmp_path) -> None:
    store = Store(tmp_path)
    store.append(_rows(0, 1.0))
    store.flush()
    (tmp_path / ".part-r0000-x-000001.parquet.tmp").write_bytes(b"PAR1 truncated")
    assert len(load(tmp_path)) == 2


def test_resumed_run_rewriting_steps_does_not_duplicate_rows(tmp_path) -> None:
    old = Store(tmp_path)
    old.append(_rows(0, 1.0))
    old.append(_rows(1, 2.0))
    old.flush()
    new = Store(tmp_path)  # a resumed run measures step 1 again
    new.append(_rows(1, 3.0))
    new.flush()
    df = load(tmp_path)
    assert len(df) == 4
    assert df[df["step"] == 1]["value"].tolist() == [3.0, 1.5]


def test_dedupe_keeps_channels_apart() -> None:
    df = make_rows(
        step=0, epoch=0, stage="train", rank=0, layers=["bn"] * 3,
        metrics=["gamma"] * 3, values=[1.0, 2.0, 3.0], channels=[0, 1, None],
    )  # fmt: skip
    assert len(dedupe(df)) == 3


def test_missing_store_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no part-\*\.parquet files"):
        load(tmp_path)


def test_every_flushed_row_survives_sigkill(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_run", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    store = tmp_path / "store"
    try:
        deadline = time.monotonic() + 120
        while len(list(store.glob("part-*.parquet"))) < 5:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "training never flushed 5 parts"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    parts = sorted(store.glob("part-*.parquet"))
    per_part = [len(pd.read_parquet(p)) for p in parts]  # every part file is complete
    stored = load(store, constants="changes")  # the rows as written
    assert len(stored) == sum(per_part) and len(parts) >= 5
    df = load(store)
    steps = sorted(df["step"].unique())
    assert steps == list(range(len(steps)))  # a gapless prefix of the steps
    per_step = df.groupby("step").size()  # with the constants filled in: the same rows a step
    assert per_step.iloc[1:].nunique() == 1 and len(df) > len(stored)


def test_many_small_appends_stay_in_a_few_compact_buffers(tmp_path) -> None:
    """Rows wait in a few doubling buffers; once saved, memory holds only the unsaved ones (a
    store without a folder holds every row)."""
    store, memory = Store(tmp_path), Store(None)
    frames = []
    for step in range(3000):
        df = make_rows(
            step=step, epoch=step // 100, stage="train", rank=0, layers=["a", "b", "b"],
            metrics=["kl", "gamma", "gamma"], values=[step, 1.0, 2.0], channels=[None, 0, 1],
        )  # fmt: skip
        frames.append(df)
        store.append(df)
        memory.append(df)
        if step == 1500:
            assert store._rows.n == 1501 * 3
            store.flush()
            assert store._rows.n == 0 and store.pending_rows == 0
    store.flush()
    want = concat(frames)  # the schema: object strings, Int64 channel
    pd.testing.assert_frame_equal(store.to_dataframe(), want)
    pd.testing.assert_frame_equal(memory.to_dataframe(), want)
    pd.testing.assert_frame_equal(load(tmp_path), want)
    capacity = len(store._rows._na)  # doubling buffers: never more than twice the unsaved rows
    assert capacity <= 2 * 1501 * 3
    assert memory._rows.n == 9000 and len(memory._rows._na) <= 2 * 9000


def test_columns_and_tables_go_in_alike_and_select_takes_some_metrics() -> None:
    """Rows appended as plain columns (what the tap hands over) or as a table read back the
    same; select() gives exactly the rows of its metrics, in order."""
    import numpy as np

    from bnprobe.store import Rows

    columns = Rows(3, 1, "train", 0, ["a", "a", "b"], ["kl", "mean_shift", "kl"], [0.5, 1.5, 2.5])
    per_channel = Rows(3, 1, "train", 0, ["a", "a"], ["kl", "kl"], [0.1, 0.9], np.array([0, 1]))
    as_columns, as_tables = Store(None), Store(None)
    for rows in (columns, per_channel, _rows(4, 7.0)):
        as_columns.append(rows)
        as_tables.append(rows.frame() if isinstance(rows, Rows) else rows)
    df = as_columns.to_dataframe()
    pd.testing.assert_frame_equal(df, as_tables.to_dataframe())
    assert df["channel"].tolist() == [pd.NA, pd.NA, pd.NA, 0, 1, pd.NA, pd.NA]
    chosen = as_columns.select(["mean_shift"])
    pd.testing.assert_frame_equal(chosen, df[df.metric == "mean_shift"].reset_index(drop=True))
    assert chosen["step"].tolist() == [3, 4] and Store(None).select(["kl"]).empty
