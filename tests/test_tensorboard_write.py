"""bnprobe.tensorboard.write (one scalar writer, one histogram writer) and the opt-in C checksum:
the same points as add_scalar/add_histogram, read back with TensorBoard's own reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from bnprobe import tensorboard as tb
from bnprobe.tensorboard import checksum


def _read(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_scalars_in_one_event_read_back_as_separate_points(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    for step in (0, 50):
        tb.write_scalars(writer, {"a/x": 1.5 + step, "a/y": -2.0, "b": step / 3}, step)
    writer.close()
    acc = _read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"a/x", "a/y", "b"}
    assert [(e.step, e.value) for e in acc.Scalars("a/x")] == [(0, 1.5), (50, 51.5)]
    assert [e.value for e in acc.Scalars("b")] == pytest.approx([0.0, 50 / 3])


def test_histogram_counts_equal_numpy_histogram() -> None:
    rng = np.random.default_rng(0)
    vectors = {f"v{i}": rng.standard_normal(int(rng.integers(1, 130))) for i in range(40)}
    vectors["constant"] = np.zeros(64)
    vectors["mixed"] = np.array([1.0, np.inf, np.nan, 3.0, -2.0])
    vectors["nothing_finite"] = np.full(5, np.nan)
    protos = tb.histogram_protos(vectors)
    assert "nothing_finite" not in protos
    for tag, vec in vectors.items():
        finite = vec[np.isfinite(vec)]
        if finite.size == 0:
            continue
        counts, edges = np.histogram(finite, bins=tb.HIST_BINS)
        h = protos[tag]
        assert list(h.bucket) == [0, *counts.tolist()]
        np.testing.assert_allclose(h.bucket_limit, edges, rtol=1e-12)
        assert h.num == finite.size and h.min == finite.min() and h.max == finite.max()
        assert math.isclose(h.sum, finite.sum(), abs_tol=1e-12)
        assert math.isclose(h.sum_squares, finite @ finite, rel_tol=1e-12)


def test_add_histograms_writes_the_callback_tags_in_one_event(tmp_path: Path) -> None:
    channels = {
        "stem.bn": {"gamma": np.ones(8), "beta": np.arange(8.0), "d": np.linspace(-1, 1, 8)},
        "<model>": {"v": np.array([0.5, np.nan])},
    }
    writer = SummaryWriter(str(tmp_path))
    tags = tb.write_histograms(writer, "train", 7, channels)
    writer.close()
    acc = _read(tmp_path)
    expected = {
        tb.hist_tag("train", "gamma", "stem.bn"),
        tb.hist_tag("train", "beta", "stem.bn"),
        tb.hist_tag("train", "d", "stem.bn"),
        tb.hist_tag("train", "v", "<model>"),
    }
    assert set(tags) == expected == set(acc.Tags()["histograms"])
    (event,) = acc.Histograms(tb.hist_tag("train", "beta", "stem.bn"))
    assert event.step == 7 and event.histogram_value.num == 8
    assert event.histogram_value.sum == pytest.approx(28.0)


def test_snapshot_metrics_from_plain_lists_equal_those_from_the_rows() -> None:
    import torch
    from torch import nn

    from bnprobe.tap import BNTap

    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    with BNTap(model, per_channel=True) as tap:
        tap.start(trace=True)
        model(torch.randn(8, 3))
        snap = tap.collect(step=4, epoch=2)
    assert snap.aggregates is not None
    fast = tb.snapshot_metrics(snap)
    assert fast == tb.scalar_metrics(snap.rows)
    assert fast[4]["bnprobe/train/epoch"] == 2.0 and len(fast[4]) > 40


def test_c_checksum_equals_tensorboards_on_every_length() -> None:
    pytest.importorskip("google_crc32c")
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as reference

    rng = np.random.default_rng(7)
    lengths = [*range(0, 300), 1023, 1024, 1025, 32**3 + 77]
    lengths += rng.integers(1, 300_000, size=6).tolist()
    for n in lengths:
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        assert checksum.masked_crc32c(data) == reference.masked_crc32c(data), n


def test_fast_checksums_write_files_tensorboards_reader_verifies_and_are_undone(
    tmp_path: Path,
) -> None:
    pytest.importorskip("google_crc32c")
    from tensorboard.summary.writer import record_writer

    original = record_writer.masked_crc32c
    with checksum.fast_checksums() as fast:
        assert fast and record_writer.masked_crc32c is checksum.masked_crc32c
        writer = SummaryWriter(str(tmp_path))
        big = {f"bnprobe/train/kl/layer{i}.bn": i / 7 for i in range(900)}  # a ~40 KB event
        for step in range(3):
            tb.write_scalars(writer, {k: v + step for k, v in big.items()}, step)
        writer.close()
    assert record_writer.masked_crc32c is original
    acc = _read(tmp_path)  # the reader checks every record's CRC with TensorBoard's own code
    assert len(acc.Tags()["scalars"]) == 900
    points = acc.Scalars("bnprobe/train/kl/layer899.bn")
    assert [e.step for e in points] == [0, 1, 2]
    assert [e.value for e in points] == pytest.approx([899 / 7 + s for s in range(3)])


def test_summary_bytes_are_the_message_protobuf_builds() -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    rng = np.random.default_rng(3)
    tags = [f"bnprobe/train/kl/blocks.{i}.bn1" for i in range(300)]
    tags += ["x" * 127, "y" * 128, "z" * 20_000, "bnprobe/train/kl/ünïcode", ""]  # varint sizes
    values = rng.standard_normal(len(tags)) * 10.0 ** rng.integers(-40, 40, len(tags))
    values[:8] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e39, -1e39, 1e-46]  # beyond float32 too
    for step_values in (values, values[::-1].copy()):  # the cached template, new values
        metrics = dict(zip(tags, step_values.tolist(), strict=True))
        expected = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in metrics.items()])
        ours = tb.summary_bytes(tuple(metrics), metrics.values())
        assert Summary.FromString(ours) == expected
        nonempty = {t: v for t, v in metrics.items() if t}
        assert (
            tb.summary_bytes(tuple(nonempty), nonempty.values())
            == Summary(
                value=[Summary.Value(tag=t, simple_value=v) for t, v in nonempty.items()]
            ).SerializeToString()
        )


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_write_snapshot_writes_the_snapshot_metrics(tmp_path: Path, prefix: str) -> None:
    """One event straight from the snapshot holds exactly snapshot_metrics' points, under the
    root of Lightning's ``<prefix>-`` (what its log_metrics gives a CSVLogger's keys)."""
    import torch
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from torch import nn

    from bnprobe.tap import BNTap

    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    tb_logger = TensorBoardLogger(tmp_path, name="tb", version=0, prefix=prefix)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0, prefix=prefix)
    expected: dict[str, list[tuple[int, float]]] = {}
    with BNTap(model) as tap:
        for step in (3, 8):
            tap.start()
            model(torch.randn(8, 3) * step)
            snap = tap.collect(step=step, epoch=1)
            tb.write_snapshot(tb_logger.experiment, snap, root=tb.tag_root(prefix))
            for at, metrics in tb.snapshot_metrics(snap).items():
                csv_logger.log_metrics(metrics, at)
            for tag, value in tb.snapshot_metrics(snap)[step].items():
                key = f"{prefix}-{tag}" if prefix else tag
                expected.setdefault(key, []).append((step, float(np.float32(value))))
    tb_logger.finalize("success")
    csv_logger.finalize("success")
    acc = _read(Path(tb_logger.log_dir))
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == points or all(
            s == t and (v == w or (math.isnan(v) and math.isnan(w)))
            for (s, v), (t, w) in zip(got, points, strict=True)
        )
    import pandas as pd

    csv = pd.read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    assert set(csv.columns) == {"step", *expected}
