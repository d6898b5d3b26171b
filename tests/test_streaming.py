"""Streaming diagnosis (bnprobe.diagnosis.digest): the bounded running state gives the findings of
the full table on every pathology, on healthy runs and on folders of runs; the recorder's
end-of-fit findings and ``bnprobe report`` come from it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import bnprobe
from bnprobe import cli, pathologies, store
from bnprobe.diagnosis import Finding, buckets, diagnose, format_report
from bnprobe.diagnosis.buckets import Block
from bnprobe.diagnosis.digest import Digest, diagnose_digests, digest_table
from bnprobe.diagnosis.report import stage_steps
from bnprobe.recorder import Recorder

TINY = {"head": 4, "tail": 8, "bucket_steps": 4, "buckets": 4}
"""Windows small enough that a 40-step run is summarized in the middle."""


def _steps(df: pd.DataFrame) -> list[store.Rows]:
    return store.Rows.from_frame(df)


def _fed(df: pd.DataFrame, **options: int) -> Digest:
    d = Digest(**options)
    for rows in _steps(df):  # as the recorder gets them: one block per measured step
        d.add(rows)
    return d


def _key(findings: list[Finding]) -> list[tuple[str, str, str, str | None]]:
    return [(str(f.kind), f.layer, str(f.severity), f.run) for f in findings]


def assert_within_bound(full: list[Finding], streamed: list[Finding], resolution: int) -> None:
    """Same kinds, layers, severities and runs, in the same order; first steps never earlier
    than the full table's and later by at most the digest's resolution."""
    assert _key(streamed) == _key(full)
    for a, b in zip(full, streamed, strict=True):
        if a.step is None:
            assert b.step is None
        else:
            assert b.step is not None
            assert a.step <= b.step <= a.step + resolution, (a, b)


def synthetic(steps: int, *, collapse_at: int, nan_at: int, seed: int = 0) -> pd.DataFrame:
    """A training table of three layers: ``a`` healthy and noisy, ``b`` whose input variance
    collapses at ``collapse_at`` and stays collapsed, ``c`` with one NaN batch mean at
    ``nan_at``."""
    rng = np.random.default_rng(seed)
    metrics = [
        "batch_mean", "batch_var", "running_mean", "running_var", "mean_shift_excess",
        "var_shift_excess", "var_small_frac", "gamma_mean", "gamma_std", "gamma_small_frac",
        "gamma_drift", "beta_drift", "forward_calls", "train_mode", "momentum", "eps",
        "batch_size", "samples_per_channel", "has_running_stats",
    ]  # fmt: skip
    frames = []
    for step in range(steps):
        layers, names, values = [], [], []
        for layer in ("a", "b", "c"):
            bv = 1.0 + 0.1 * rng.standard_normal()
            if layer == "b" and step >= collapse_at:
                bv = 1e-9
            row = {
                "batch_mean": float("nan") if (layer == "c" and step == nan_at) else 0.01,
                "batch_var": bv,
                "running_mean": 0.01 * rng.standard_normal(),
                "running_var": 1.0 + 0.05 * rng.standard_normal(),
                "mean_shift_excess": abs(0.1 * rng.standard_normal()),
                "var_shift_excess": abs(0.1 * rng.standard_normal()),
                "var_small_frac": 1.0 if bv < 1e-6 else 0.0,
                "gamma_mean": 1.0,
                "gamma_std": 0.1,
                "gamma_small_frac": 0.0,
                "gamma_drift": 0.01 * (step + 1),
                "beta_drift": 0.01 * (step + 1),
                "forward_calls": 1.0,
                "train_mode": 1.0,
                "momentum": 0.1,
                "eps": 1e-5,
                "batch_size": 32.0,
                "samples_per_channel": 2048.0 if step % 50 else 512.0,
                "has_running_stats": 1.0,
            }
            layers += [layer] * len(metrics)
            names += metrics
            values += [row[m] for m in metrics]
        frames.append(
            store.make_rows(
                step=step * 10, epoch=0, stage="train", rank=0, layers=layers, metrics=names,
                values=values,
            )
        )  # fmt: skip
    return store.concat(frames)


@pytest.fixture(scope="module")
def long_run() -> pd.DataFrame:
    return synthetic(1500, collapse_at=900, nan_at=700)


def test_a_run_within_the_windows_is_kept_whole_and_judged_identically() -> None:
    df = synthetic(150, collapse_at=120, nan_at=50)
    d = _fed(df)
    assert d.rows_kept == d.rows_seen == len(df)
    pd.testing.assert_frame_equal(d.table(), df)
    assert d.resolution == 0
    full = diagnose(df)
    assert {f.kind for f in full} >= {"variance_collapse", "nonfinite"}
    assert d.diagnose() == full
    whole = Digest()
    whole.add(df)  # a table in one piece (bnprobe report) is the same as step by step
    assert whole.diagnose() == full
    assert d.steps() == stage_steps(df)


def test_a_long_run_keeps_bounded_rows_with_the_same_findings(long_run: pd.DataFrame) -> None:
    full = diagnose(long_run)
    assert [(f.kind, f.layer) for f in full if f.severity != "info"] == [
        ("nonfinite", "c"),
        ("variance_collapse", "b"),
    ]
    d = _fed(long_run)
    assert 0 < d.resolution <= 1500
    assert d.rows_kept < len(long_run) / 2
    assert_within_bound(full, d.diagnose(), d.resolution * 10)
    nonfinite = next(f for f in d.diagnose() if f.kind == "nonfinite")
    assert nonfinite.step == 7000  # a first-seen step in the middle stays exact
    assert d.steps() == stage_steps(long_run)  # the summary's counts are exact


def test_the_kept_rows_do_not_grow_with_the_run() -> None:
    short, long = (
        _fed(synthetic(n, collapse_at=n - 50, nan_at=n // 2), **TINY) for n in (300, 1200)
    )
    assert long.rows_seen == 4 * short.rows_seen
    assert long.rows_kept <= 1.3 * short.rows_kept


def test_tiny_windows_on_a_long_run_stay_within_the_bound(long_run: pd.DataFrame) -> None:
    d = _fed(long_run, **TINY)
    assert d.rows_kept < len(long_run) / 10
    assert_within_bound(diagnose(long_run), d.diagnose(), d.resolution * 10)


def test_a_table_of_several_runs_is_judged_run_by_run(long_run: pd.DataFrame) -> None:
    other = synthetic(60, collapse_at=1000, nan_at=1000, seed=1)
    df = store.with_runs({"x/long": long_run, "y/healthy": other})
    full = diagnose(df)
    assert {f.run for f in full} == {"x/long"}
    exact = diagnose_digests(digest_table(df, head=2000))
    assert exact == full
    streamed = diagnose_digests(digest_table(df))
    assert_within_bound(full, streamed, 15000)


def test_the_recorder_judges_from_its_running_state() -> None:
    df = synthetic(120, collapse_at=100, nan_at=30)
    rec = Recorder()
    for rows in _steps(df):
        rec.record(SimpleNamespace(parts=[rows], channels=None))  # type: ignore[arg-type]
    whole = rec.to_dataframe()
    assert rec.findings() == diagnose(whole)
    assert rec.report() == format_report(whole, diagnose(whole))
    assert rec.steps() == stage_steps(whole)
    assert not rec.failures


def _write_store(folder: Path, df: pd.DataFrame, parts: int = 3) -> None:
    s = store.Store(folder)
    for chunk in np.array_split(np.arange(len(df)), parts):
        s.append(df.iloc[chunk])
        s.flush()


def _report(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert cli.main(["report", str(path), "--format", "json"]) == 0
    doc: dict[str, object] = json.loads(capsys.readouterr().out)
    return doc


def test_report_streams_a_store_and_prints_what_the_full_table_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = synthetic(150, collapse_at=100, nan_at=30)
    _write_store(tmp_path / "run" / store.STORE_NAME, df)
    loaded = bnprobe.load(tmp_path / "run")
    expected = json.loads(format_report(loaded, diagnose(loaded), fmt="json"))
    assert _report(tmp_path / "run", capsys) == expected
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == format_report(loaded, diagnose(loaded))


def test_report_of_a_folder_of_runs_and_of_a_long_run(
    tmp_path: Path, long_run: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_store(tmp_path / "a" / store.STORE_NAME, long_run, parts=5)
    _write_store(tmp_path / "b" / store.STORE_NAME, synthetic(40, collapse_at=99, nan_at=99))
    doc = _report(tmp_path, capsys)
    loaded = bnprobe.load(tmp_path)
    full = json.loads(format_report(loaded, diagnose(loaded), fmt="json"))
    assert doc["runs"] == full["runs"]  # latest values and exact step counts
    assert doc["counts"] == full["counts"]
    got = [(f["kind"], f["layer"], f["run"]) for f in doc["findings"]]  # type: ignore[index]
    assert got == [(f["kind"], f["layer"], f["run"]) for f in full["findings"]]
    for a, b in zip(full["findings"], doc["findings"], strict=True):  # type: ignore[arg-type]
        assert a["step"] <= b["step"]


def test_a_damaged_part_is_skipped_with_a_warning_as_load_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "run" / store.STORE_NAME
    _write_store(folder, synthetic(30, collapse_at=99, nan_at=99))
    first = sorted(folder.glob("part-*.parquet"))[0]
    first.write_bytes(b"not parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["report", str(tmp_path / "run")])
    assert code == cli.EXIT_DATA
    captured = capsys.readouterr()
    assert "skipped the unreadable part" in captured.err
    assert "No findings" in captured.out


def test_digest_options_are_checked() -> None:
    with pytest.raises(ValueError, match="tail must be an integer >= 1; got 0"):
        Digest(tail=0)
    with pytest.raises(ValueError, match="buckets must be an integer >= 2"):
        Digest(buckets=1)


# -- real runs (slow: they train) --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [None, *pathologies.PATHOLOGIES])
def test_every_pathology_streamed_as_the_full_table(name: str | None, tmp_path: Path) -> None:
    df = pathologies.fit(name, 40, root=tmp_path)
    full = diagnose(df)
    if name is not None:
        assert any(f.kind == pathologies.get(name).finding.kind for f in full)
    assert _fed(df).diagnose() == full  # 40 steps: kept whole, identical by construction
    tiny = _fed(df, **TINY)
    assert tiny.rows_kept < tiny.rows_seen
    assert_within_bound(full, tiny.diagnose(), tiny.resolution)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["ZeroInitResNet", "DepthwiseNet", "WrappedDropoutNet"])
def test_healthy_replicas_streamed_as_the_full_table(net: str, tmp_path: Path) -> None:
    from bnprobe.callback import BNProbe
    from tests import replicas as R

    probe = BNProbe(every_n_steps=1, save_dir=False, histograms=False, summary=False)
    R.fit(getattr(R, net)(), R.image_data(batches=10), 40, probe, root=tmp_path)
    df = probe.to_dataframe()
    full = diagnose(df)
    assert probe.findings() == full  # the recorder's running state
    tiny = _fed(df, **TINY)
    assert_within_bound(full, tiny.diagnose(), tiny.resolution)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_batches", "frozen_bn", "tf_momentum"])
def test_report_of_a_saved_run_whose_constants_are_stored_when_they_change(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store keeps a constant (batch size, mode, momentum) only when it changes; the
    streamed report fills in the value in force, as ``load`` does, and judges the same."""
    df = pathologies.fit(name, 12, root=tmp_path)
    folder = tmp_path / "run" / store.STORE_NAME
    _write_store(folder, df)
    stored = bnprobe.load(tmp_path / "run", constants="changes")
    assert len(stored) < len(df)  # constants were thinned on disk
    loaded = bnprobe.load(tmp_path / "run")
    full = json.loads(format_report(loaded, diagnose(loaded), fmt="json"))
    assert any(f["kind"] == pathologies.get(name).finding.kind for f in full["findings"])
    assert _report(tmp_path / "run", capsys) == full


def _step_blocks(rng: np.random.Generator, steps: int, ranks: int = 1) -> list[Block]:
    """Blocks of one step each, layer rows of 3 layers x 4 metrics per rank (codes)."""
    layer = np.repeat(np.arange(3, dtype=np.int32), 4)
    metric = np.tile(np.arange(4, 8, dtype=np.int32), 3)
    blocks = []
    for step in range(steps):
        n = len(layer) * ranks
        blocks.append(
            Block(
                np.zeros(n, dtype=np.int64),
                np.full(n, 10 * step, dtype=np.int64),
                np.zeros(n, dtype=np.int64),
                np.full(n, 8, dtype=np.int32),
                np.repeat(np.arange(ranks, dtype=np.int64), len(layer)),
                np.tile(layer, ranks),
                np.full(n, -1, dtype=np.int64),
                np.tile(metric, ranks),
                np.round(rng.standard_normal(n), 1),  # ties
            )
        )
    return blocks


def _same_rows(a: Block, b: Block) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_close_on_the_steps_matrix_picks_the_rows_of_the_general_path(ranks: int) -> None:
    """A bucket whose steps share one layout is chosen on a steps x keys matrix; the rows are
    those the general path picks, with NaN, infinities, -0.0 and ties, and where the layout
    differs (a step split across blocks, a missing row, per-channel rows) it falls back."""
    rng = np.random.default_rng(ranks)
    extreme = np.zeros(9, dtype=bool)
    extreme[[4, 6]] = True
    for case in range(8):
        blocks = _step_blocks(rng, 12, ranks)
        rows = buckets.concat(blocks)
        v = rows.value
        if case == 1:
            v[rng.integers(0, len(v), 6)] = np.nan
        if case == 2:
            v[rng.integers(0, len(v), 4)] = np.inf
            v[rng.integers(0, len(v), 4)] = -np.inf
        if case == 3:
            v[:] = np.where(rng.random(len(v)) < 0.5, 0.0, -0.0)
        if case == 4:
            v[: len(v) // 2] = np.nan
        if case == 5:
            v[:] = 1.0  # constant: first and last only
        blocks = [
            buckets.Block(*(c[i * len(blocks[0].seq) : (i + 1) * len(blocks[0].seq)] for c in rows))
            for i in range(len(blocks))
        ]
        if case == 6:  # a step split across two blocks (a batch boundary) still fits
            first = blocks[3]
            blocks[3:4] = [first.take(slice(0, 5)), first.take(slice(5, None))]
        expected = buckets.select(buckets.concat(blocks), extreme)
        assert buckets._layout_width(buckets.concat(blocks)) > 0
        _same_rows(buckets.select_steps(blocks, extreme), expected)
        assert 0 < expected.n < rows.n or case == 0
    # layouts that are not a matrix: the general path
    blocks = _step_blocks(rng, 6, ranks)
    blocks[2] = blocks[2].take(np.arange(1, blocks[2].n))  # a missing row
    assert buckets._layout_width(buckets.concat(blocks)) == 0
    _same_rows(
        buckets.select_steps(blocks, extreme), buckets.select(buckets.concat(blocks), extreme)
    )
    blocks = _step_blocks(rng, 6, ranks)
    blocks[4] = blocks[4]._replace(channel=np.zeros(blocks[4].n, dtype=np.int64))
    assert buckets._layout_width(buckets.concat(blocks)) == 0
    _same_rows(
        buckets.select_steps(blocks, extreme), buckets.select(buckets.concat(blocks), extreme)
    )


def test_a_store_a_table_and_steps_feed_a_digest_alike(
    tmp_path: Path, long_run: pd.DataFrame
) -> None:
    """``bnprobe report``'s path (parquet dictionaries as codes, a reader thread, batches that
    split steps) keeps the rows that the same stored rows as one table keep, and a table in one
    piece the rows that the recorder's steps keep, on a long run with NaNs."""
    from bnprobe.diagnosis.stream import digest_parts

    folder = tmp_path / "run" / store.STORE_NAME
    _write_store(folder, long_run, parts=4)
    streamed, bad = digest_parts(sorted(folder.glob("part-*.parquet")), batch_rows=1000)
    assert not bad
    stored = Digest()
    stored.add(bnprobe.load(tmp_path / "run", constants="changes"))
    assert 0 < streamed.rows_kept < streamed.rows_seen / 2
    pd.testing.assert_frame_equal(streamed.table(), stored.table())
    assert streamed.diagnose() == stored.diagnose()
    assert streamed.steps() == stored.steps()
    whole = Digest()
    whole.add(long_run)
    pd.testing.assert_frame_equal(whole.table(), _fed(long_run).table())


def test_the_constants_fill_skipped_where_stored_at_every_anchor_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A constant stored at every anchor (the recorder's feed) is not filled: the columns are
    those of the fill itself; a layer that stores it only when it changes is still filled."""
    from bnprobe.diagnosis import digest as digest_module

    d = Digest(**TINY)
    for step in range(30):
        layers = ["a.bn"] * 3 + ["b.bn"] * 2  # eps at every anchor: not filled
        metrics = ["batch_mean", "eps", "momentum", "batch_mean", "eps"]
        values = [0.1 * (step % 5), 1e-5, 0.1, 0.2 * (step % 3), 1e-3]
        if step % 7 == 0:  # b.bn stores its momentum only now and then
            layers, metrics, values = [*layers, "b.bn"], [*metrics, "momentum"], [*values, 0.01]
        d.add(store.Rows(step, 0, "train", 0, layers, metrics, values))
    fast = d.columns()
    monkeypatch.setattr(digest_module, "_aligned", lambda *args: False)
    slow = d.columns()
    for name in ("step", "stage", "rank", "layer", "channel", "metric", "value"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
    momentum_b = (fast.metric == fast.code("momentum")) & (fast.layer == fast.code("b.bn"))
    anchors_b = (fast.metric == fast.code("batch_mean")) & (fast.layer == fast.code("b.bn"))
    assert momentum_b.sum() == anchors_b.sum() > 10  # filled at every kept step of b.bn
