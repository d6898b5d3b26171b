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


# -- bounded memory, constants, filters, compaction (issue 16) -------------------------------------
def _tap_rows(steps: int = 12) -> list:
    """The Rows a real tap hands the store over ``steps`` training steps of a residual conv net
    with per-channel rows, one layer's momentum changed at step 4 and one layer put in eval mode
    at steps 6-7, and a pooled validation pass every 5 steps."""
    import torch

    from bnprobe.tap import BNTap

    torch.manual_seed(0)
    model = make_model("res2d")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    with BNTap(model, per_channel=True) as tap:
        for step in range(steps):
            if step == 4:
                bns[0].momentum = 0.3
            bns[-1].train(step not in (6, 7))
            x = torch.randn(8 if step % 5 != 4 else 3, *INPUT_SHAPES["res2d"])
            tap.start(trace=step == 0)
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            out += tap.collect(step=step, epoch=step // 5).parts
            if step % 5 == 4:
                model.eval()
                tap.start(pool=True)
                with torch.no_grad():
                    model(torch.randn(8, *INPUT_SHAPES["res2d"]))
                out += tap.collect(step=step, epoch=step // 5, stage="val").parts
                model.train()
    return out


from tests.reference import INPUT_SHAPES, make_model  # noqa: E402


def test_constants_are_stored_when_they_change_and_read_back_at_every_step(tmp_path) -> None:
    from bnprobe.store import CONSTANT_METRICS

    rows = _tap_rows()
    want = concat(r.frame() for r in rows)  # what the tap made
    saved, memory = Store(tmp_path), Store(None)
    for i, part in enumerate(rows):
        saved.append(part)
        memory.append(part)
        if i % 7 == 3:
            saved.flush()
    saved.flush()
    pd.testing.assert_frame_equal(saved.to_dataframe(), want)
    pd.testing.assert_frame_equal(memory.to_dataframe(), want)
    pd.testing.assert_frame_equal(load(tmp_path), want)

    stored = load(tmp_path, constants="changes")
    assert len(stored) < len(want)
    constant = stored[stored["metric"].isin(CONSTANT_METRICS["train"]) & (stored.stage == "train")]
    eps = constant[constant["metric"] == "eps"]
    assert eps["step"].tolist() == [0] * eps["layer"].nunique()  # once per layer
    first = want[(want.metric == "momentum") & (want.stage == "train")]["layer"].iloc[0]
    momentum = constant[(constant.metric == "momentum") & (constant.layer == first)]
    assert momentum["step"].tolist() == [0, 4] and momentum["value"].tolist() == [0.1, 0.3]
    batch = constant[(constant.metric == "batch_size")]["step"].unique().tolist()
    assert batch == [0, 4, 5, 9, 10]  # the short batches of steps 4 and 9 and back
    mode = constant[constant.metric == "train_mode"]
    assert sorted(mode.groupby("layer").size().tolist())[-1] == 3  # eval at 6, train at 8
    val = stored[(stored.stage == "val") & (stored.metric == "samples_per_channel")]
    assert val["step"].unique().tolist() == [4]


def test_filters_give_what_pandas_filtering_gives(tmp_path) -> None:
    rows = _tap_rows()
    store = Store(tmp_path)
    for i, part in enumerate(rows):
        store.append(part)
        if i % 5 == 0:
            store.flush()
    store.flush()
    full = load(tmp_path)
    layer = full["layer"].iloc[0]
    cases = [
        dict(metrics="eps"),
        dict(metrics=["momentum", "kl"], layers=layer, steps=(6, None)),
        dict(stages="val", steps=(None, 4)),
        dict(stages=["train"], metrics=["batch_size", "gamma"], steps=(5, 9)),
        dict(layers=[layer], steps=(3, 3)),
    ]
    for case in cases:
        want = full
        for column, key in (("stage", "stages"), ("layer", "layers"), ("metric", "metrics")):
            if key in case:
                names = case[key]
                want = want[want[column].isin([names] if isinstance(names, str) else names)]
        first, last = case.get("steps", (None, None))
        if first is not None:
            want = want[want["step"] >= first]
        if last is not None:
            want = want[want["step"] <= last]
        want = want.reset_index(drop=True)
        assert len(want), case
        pd.testing.assert_frame_equal(load(tmp_path, **case), want)
        pd.testing.assert_frame_equal(store.to_dataframe(**case), want)
    assert load(tmp_path, metrics="no_such_metric").empty
    with pytest.raises(ValueError, match=r"steps must be \(first, last\)"):
        load(tmp_path, steps=5)
    with pytest.raises(ValueError, match="metrics must be a name or a list of names"):
        load(tmp_path, metrics=3)


def test_compaction_keeps_a_few_parts_and_every_row(tmp_path) -> None:
    import shutil

    from bnprobe.store import FAN_IN, remove_stale

    store = Store(tmp_path)
    frames = []
    for step in range(200):
        df = _rows(step, float(step))
        frames.append(df)
        store.append(df)
        store.flush()  # one part per step: 200 flushes
        assert len(list(tmp_path.glob("part-*.parquet"))) < 3 * FAN_IN
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert parts == sorted(store.part_files) and not list(tmp_path.glob(".*"))
    assert len(parts) == 200 // 64 + (200 % 64) // 8 + 200 % 8  # 3 of 64 + 1 of 8 + 0
    want = concat(frames)
    pd.testing.assert_frame_equal(load(tmp_path), want)
    pd.testing.assert_frame_equal(store.to_dataframe(), want)
    # a compaction killed after the rename left an input behind: read once, then removed
    left = tmp_path / parts[0].name.replace("-000000-000063", "-000010")
    shutil.copy(parts[0], left)
    pd.testing.assert_frame_equal(load(tmp_path), want)
    assert remove_stale(tmp_path) == [left] and not left.exists()


def test_stale_temporary_parts_are_removed_when_a_run_resumes(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(done.stdout)
    alive = os.getppid()  # a process that is still there (it may be writing)
    stale = tmp_path / f".part-r0000-{time.time_ns():020d}-{dead}-000003.parquet.tmp"
    busy = tmp_path / f".part-r0000-{time.time_ns():020d}-{alive}-000000.parquet.tmp"
    for path in (stale, busy):
        path.write_bytes(b"PAR1 half")
    old = Store(tmp_path)
    old.append(_rows(0, 1.0))
    resumed = Store(tmp_path)
    resumed.append(_rows(1, 2.0))
    resumed.flush()
    assert not stale.exists() and busy.exists()
    assert load(tmp_path)["step"].tolist() == [1, 1]


def test_stores_of_earlier_versions_stay_readable(tmp_path) -> None:
    """A ``bnprobe/`` folder with a part written by pandas (plain strings, every constant at
    every step) reads as it did, filters included."""
    rows = _tap_rows(6)
    want = concat(r.frame() for r in rows)
    legacy = tmp_path / "version_0" / "bnprobe"
    legacy.mkdir(parents=True)
    want.to_parquet(legacy / "part-r0000-00000000000000000001-1-000000.parquet", index=False)
    pd.testing.assert_frame_equal(load(tmp_path), want)
    eps = want[(want.metric == "eps") & (want.step >= 2)].reset_index(drop=True)
    pd.testing.assert_frame_equal(load(tmp_path, metrics="eps", steps=(2, None)), eps)


def test_a_step_range_over_many_parts(tmp_path) -> None:
    store = Store(tmp_path)
    for step in range(20):
        store.append(_rows(step, float(step)))
        store.flush()
    got = load(tmp_path, metrics="kl", steps=(17, 18))
    assert got["step"].tolist() == [17, 18] and got["value"].tolist() == [8.5, 9.0]


def test_a_run_resumed_after_a_kill_has_every_step_once(tmp_path) -> None:
    """SIGKILL two steps after a checkpoint (no save since the start but the checkpoints), resume
    from it: every measured step is in the store, once; the re-measured steps are the resumed
    run's."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "tests.checkpoint_run", str(tmp_path)]
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([*cmd, "kill"], cwd=root, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = load(tmp_path / "store")
    assert sorted(before["step"].unique()) == list(range(12))  # saved by the step-12 checkpoint
    resumed = subprocess.run([*cmd, "resume"], cwd=root, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    df = load(tmp_path / "store")
    train = df[(df["stage"] == "train") & (df["metric"] == "batch_mean")]
    per_step = train.groupby("step")["layer"].agg(["size", "nunique"])
    assert per_step.index.tolist() == list(range(20))
    assert (per_step["size"] == per_step["nunique"]).all()
    assert per_step["size"].nunique() == 1


def test_constant_plans_follow_names_changed_in_place_but_reuse_frozen_ones() -> None:
    """The store's constant filter caches where the constants sit per list of names; frozen
    names (tuples, read-only arrays) are recognised by identity, anything else is compared, so
    names rewritten in place between two steps are not read with a stale plan."""
    import numpy as np

    from bnprobe.store import Rows
    from bnprobe.store.constants import Changes
    from bnprobe.store.table import same_names

    frozen = np.array(["a", "a"], dtype=object)
    frozen.setflags(write=False)
    assert same_names(frozen, frozen) and same_names(("a", "b"), ["a", "b"])
    writable = np.array(["eps", "batch_mean"], dtype=object)
    assert same_names(writable, writable.copy())
    assert not same_names(writable, np.array(["eps", "momentum"], dtype=object))

    changes = Changes()
    layers = np.array(["bn", "bn"], dtype=object)
    metrics = np.array(["batch_mean", "eps"], dtype=object)
    first = changes.keep(Rows(0, 0, "train", 0, layers, metrics, [0.0, 1e-5]))
    assert first is None  # a constant's first value is kept
    again = changes.keep(Rows(1, 0, "train", 0, layers, metrics, [0.0, 1e-5]))
    assert again is not None and again.tolist() == [True, False]  # unchanged: dropped
    metrics[:] = ["eps", "batch_mean"]  # the same array object, other names
    swapped = changes.keep(Rows(2, 0, "train", 0, layers, metrics, [1e-5, 0.0]))
    assert swapped is not None and swapped.tolist() == [False, True]


def test_names_are_read_back_whatever_column_object_carries_them(tmp_path) -> None:
    """The store keeps stage, layer and metric as codes, remembering the codes of a names
    column that cannot change (a read-only array, as the tap hands out every step): a writable
    column rewritten in place between two appends, a frozen one appended twice, and a block of
    several steps all read back with their own names, from memory and from the part file, whose
    dictionaries hold only the names its rows use."""
    import numpy as np
    import pyarrow.parquet as pq

    from bnprobe.store import Rows

    store = Store(tmp_path / "store")
    writable = np.array(["bn1", "bn2"], dtype=object)
    metrics = np.array(["batch_mean", "kl"], dtype=object)
    metrics.setflags(write=False)
    store.append(Rows(0, 0, "train", 0, writable, metrics, np.array([1.0, 2.0])))
    writable[:] = ["bn3", "bn4"]  # the same object, other names
    store.append(Rows(1, 0, "train", 0, writable, metrics, np.array([3.0, 4.0])))
    store.append(Rows(2, 0, "val", 0, ("bn1", "bn1"), metrics, np.array([5.0, 6.0])))
    block = Rows.stack(
        [Rows(s, 1, "train", 0, ("bn2", "bn2"), ("mean_shift", "kl"), [s, -s]) for s in (3, 4)]
    )
    store.append(block)
    expected = [
        (0, "train", "bn1", "batch_mean", 1.0), (0, "train", "bn2", "kl", 2.0),
        (1, "train", "bn3", "batch_mean", 3.0), (1, "train", "bn4", "kl", 4.0),
        (2, "val", "bn1", "batch_mean", 5.0), (2, "val", "bn1", "kl", 6.0),
        (3, "train", "bn2", "mean_shift", 3.0), (3, "train", "bn2", "kl", -3.0),
        (4, "train", "bn2", "mean_shift", 4.0), (4, "train", "bn2", "kl", -4.0),
    ]  # fmt: skip
    columns = ["step", "stage", "layer", "metric", "value"]

    def read(df: pd.DataFrame) -> list[tuple[object, ...]]:
        return [tuple(row) for row in df[columns].itertuples(index=False)]

    assert read(store.to_dataframe()) == expected  # from the buffers
    store.flush()
    store.append(Rows(5, 1, "train", 0, ("bn4",), ("kl",), np.array([7.0])))
    store.flush()
    assert read(store.to_dataframe()) == [*expected, (5, "train", "bn4", "kl", 7.0)]
    last = pq.read_table(store.part_files[-1])
    assert last.column("layer").chunk(0).dictionary.to_pylist() == ["bn4"]
    assert last.column("metric").chunk(0).dictionary.to_pylist() == ["kl"]


def test_a_frozen_memo_knows_only_columns_that_cannot_change() -> None:
    """FrozenMemo (the store's and the digest's codes of a names column) keeps what was worked
    out for a tuple or a read-only array, by identity only, a bounded number of them; a
    writable column is never known, however often it is put."""
    import numpy as np

    from bnprobe.store.table import FrozenMemo

    memo = FrozenMemo(size=2)
    writable = np.array(["a", "b"], dtype=object)
    memo.put(writable, "codes")
    assert memo.get(writable) is None
    frozen = writable.copy()
    frozen.setflags(write=False)
    names = ("a", "b")
    memo.put(frozen, 1)
    memo.put(names, 2)
    assert memo.get(frozen) == 1 and memo.get(names) == 2
    twin = frozen.copy()
    twin.setflags(write=False)
    assert memo.get(twin) is None and memo.get(tuple(["a", "b"])) is None  # not by value
    third = ("c",)
    memo.put(third, 3)  # over the size: the oldest is forgotten
    assert memo.get(frozen) is None and memo.get(names) == 2 and memo.get(third) == 3
