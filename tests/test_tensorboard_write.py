"""bnprobe.tensorboard.write (one scalar writer, one histogram writer) and bnprobe's own event
file (bnprobe.tensorboard.events): the same points as add_scalar/add_histogram, the same bytes as
protobuf, every record's CRC TensorBoard's, read back with TensorBoard's own reader."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from bnprobe import tensorboard as tb
from bnprobe.tensorboard import events


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


def test_checksum_equals_tensorboards_on_every_length() -> None:
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as reference

    rng = np.random.default_rng(7)
    lengths = [*range(0, 300), 1023, 1024, 1025, 32**3 + 77]
    lengths += rng.integers(1, 300_000, size=6).tolist()
    for n in lengths:
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        assert events.masked_crc32c(data) == reference.masked_crc32c(data), n


def _records(path: Path) -> list[bytes]:
    """The data of every TFRecord of an event file, each CRC checked with TensorBoard's own
    ``masked_crc32c``; the file must end at a record's end."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    blob, at, out = path.read_bytes(), 0, []
    while at < len(blob):
        header = blob[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", blob[at + 8 : at + 12])[0] == masked_crc32c(header)
        data = blob[at + 12 : at + 12 + length]
        assert len(data) == length
        footer = blob[at + 12 + length : at + 16 + length]
        assert struct.unpack("<I", footer)[0] == masked_crc32c(data)
        out.append(data)
        at += 16 + length
    assert at == len(blob)
    return out


def test_event_bytes_are_what_protobuf_serializes() -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag="a", simple_value=1.5)])
    data = summary.SerializeToString()
    for step in (0, 1, 127, 128, 2**31, 2**62, -1, -(2**40)):
        for wall in (0.0, -0.0, 1.25, 1.7e9):
            want = Event(step=step, wall_time=wall, summary=summary).SerializeToString()
            assert events.event_bytes(step, wall, data) == want, (step, wall)


def test_own_event_file_reads_back_with_tensorboards_reader(tmp_path: Path) -> None:
    """Scalars, histograms, the layout and an image through bnprobe's EventWriter: one
    ``*.bnprobe`` event file, every record's CRC TensorBoard's own, EventAccumulator reads the
    same points as from a SummaryWriter."""
    from tensorboard.compat.proto.event_pb2 import Event

    rng = np.random.default_rng(1)
    big = {f"bnprobe/train/kl/layer{i}.bn": i / 7 for i in range(900)}  # a ~40 KB event
    channels = {f"layer{i}.bn": {"gamma": rng.standard_normal(16)} for i in range(3)}
    for folder in ("own", "torch"):
        writer: object = (
            tb.EventWriter(tmp_path / folder)
            if folder == "own"
            else SummaryWriter(str(tmp_path / folder))
        )
        for step in range(3):
            tb.write_scalars(writer, {k: v + step for k, v in big.items()}, step)
            tb.write_histograms(writer, "train", step, channels)
        tb.write_layout(writer, ("train",))
        writer.add_image(
            "bnprobe/train/figure/x", np.zeros((4, 5, 3), np.uint8), 2, dataformats="HWC"
        )  # type: ignore[attr-defined]
        writer.close()  # type: ignore[attr-defined]
    (own,) = (tmp_path / "own").iterdir()
    assert own.name.startswith("events.out.tfevents.") and own.name.endswith(".bnprobe")
    first, *rest = [Event.FromString(r) for r in _records(own)]
    assert first.file_version == "brain.Event:2" and len(rest) == 8
    accs = {name: _read(tmp_path / name) for name in ("own", "torch")}
    assert accs["own"].Tags()["scalars"] == accs["torch"].Tags()["scalars"]
    assert len(accs["own"].Tags()["scalars"]) == 900
    for tag in ("bnprobe/train/kl/layer899.bn", "bnprobe/train/kl/layer0.bn"):
        points = [(e.step, e.value) for e in accs["own"].Scalars(tag)]
        assert points == [(e.step, e.value) for e in accs["torch"].Scalars(tag)]
        assert [s for s, _ in points] == [0, 1, 2]
    hist = "bnprobe/train/hist/gamma/layer2.bn"
    assert [e.histogram_value for e in accs["own"].Histograms(hist)] == [
        e.histogram_value for e in accs["torch"].Histograms(hist)
    ]
    assert accs["own"].Tags()["images"] == ["bnprobe/train/figure/x"]


def test_histogram_bytes_are_what_protobuf_serializes() -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    rng = np.random.default_rng(5)
    vectors = {
        f"bnprobe/train/hist/{n}/blocks.{i}.bn": rng.standard_normal(int(rng.integers(1, 300)))
        for i in range(200)
        for n in tb.HIST_NAMES
    }
    vectors |= {
        "zeros": np.zeros(64),  # min, max, sum, sum_squares zero: left out
        "signed_zeros": np.array([-0.0, 0.0]),  # -0.0 is written (nonzero bits)
        "mixed": np.array([1.0, np.inf, np.nan, 3.0, -2.0]),
        "nothing_finite": np.full(5, np.nan),  # skipped
        "x" * 200: np.array([1e300, -1e300]),  # a two-byte tag length
        "ünïcode": np.array([2.0]),
    }
    for bins in (30, 3, 200):
        protos = tb.histogram_protos(vectors, bins)
        want = Summary(value=[Summary.Value(tag=t, histo=h) for t, h in protos.items()])
        tags, data = tb.histogram_bytes(vectors, bins)
        assert tags == list(protos) and "nothing_finite" not in tags
        assert data == want.SerializeToString()
    assert tb.histogram_bytes({}) == ([], b"")


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


def _reference_histogram(
    vec: np.ndarray, bins: int
) -> tuple[list[float], list[float], list[float]]:
    """One vector's histogram, computed alone (the algorithm write_histograms states): its
    ``min, max, num, sum, sum_squares`` (sums in order), limits and counts."""
    x = vec[np.isfinite(vec)]
    lo, hi = float(x.min()), float(x.max())
    left, right = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    width = (right - left) / bins
    with np.errstate(all="ignore"):
        index = np.clip(np.floor((x - left) / width).astype(np.int64), 0, bins - 1)
    counts = [0.0, *np.bincount(index, minlength=bins).astype(float).tolist()]
    with np.errstate(invalid="ignore", over="ignore"):
        limits = left + width * np.arange(bins + 1)
    limits[-1] = right
    with np.errstate(over="ignore"):
        fields = [lo, hi, float(x.size), np.cumsum(x)[-1], np.cumsum(x * x)[-1]]
    return fields, limits.tolist(), counts


def _tricky_columns() -> Any:
    """A ChannelColumns of six layers: one channel, constant, NaN and inf, a huge range,
    no running statistics, no affine parameters, zeros, a vector with no finite value."""
    from bnprobe.tap.rows import ChannelColumns

    rng = np.random.default_rng(7)
    sizes = np.array([1, 4, 5, 3, 6, 2], dtype=np.int64)
    total = int(sizes.sum())
    columns = {name: rng.standard_normal(total) for name in ("gamma", "beta", "d", "v")}
    gamma, beta, d, v = (columns[n] for n in ("gamma", "beta", "d", "v"))
    gamma[1:5] = 1.0  # layer b: a constant vector
    d[5:10] = [np.nan, 2.0, np.inf, -np.inf, -1.0]  # layer c: NaN and inf left out
    v[5:10] = np.nan  # layer c: no finite value, skipped
    beta[10:13] = [1e300, -1e300, 0.5]  # layer d: a huge range (sum of squares inf)
    d[13:19] = v[13:19] = np.nan  # layer e: no running statistics (present False)
    beta[19:21] = 0.0  # layer f: zeros (min, max, sum, sum_squares left out)
    gamma[19:21] = [-0.0, 0.0]
    names = ("a", "b", "c", "d", "e", "<model>")
    yes = np.ones(6, dtype=bool)
    running = np.array([1, 1, 1, 1, 0, 1], dtype=bool)
    affine = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    present = {"gamma": affine, "beta": yes, "d": running, "v": running}
    return ChannelColumns(names, sizes, columns, present)


def test_histograms_from_columns_equal_those_of_each_vector_alone(tmp_path: Path) -> None:
    """The tap's ChannelColumns is binned all at once: the same tags, order and bytes as the
    same vectors given as a dict, every histogram equal to the vector's own (exact), and
    TensorBoard's reader reads the same values from bnprobe's event file."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from bnprobe.tensorboard import write

    channels = _tricky_columns()
    as_dict = {layer: dict(per) for layer, per in channels.items()}
    assert list(as_dict["e"]) == ["gamma", "beta"] and list(as_dict["<model>"]) == [
        "beta",
        "d",
        "v",
    ]
    np.testing.assert_array_equal(as_dict["d"]["beta"], [1e300, -1e300, 0.5])
    for bins in (30, 3):
        tags, pieces = write._column_histograms(channels, "train", tb.HIST_NAMES, "bnprobe", bins)
        vectors = {
            tb.hist_tag("train", name, layer): per[name]
            for layer, per in as_dict.items()
            for name in tb.HIST_NAMES
            if name in per
        }
        want_tags, want = tb.histogram_bytes(vectors, bins)
        assert tags == want_tags and b"".join(pieces) == want
        assert tb.hist_tag("train", "v", "c") not in tags and len(tags) == len(vectors) - 1
        for value in Summary.FromString(want).value:
            fields, limits, counts = _reference_histogram(vectors[value.tag], bins)
            h = value.histo
            assert [h.min, h.max, h.num, h.sum, h.sum_squares] == fields, value.tag
            assert list(h.bucket_limit) == limits and list(h.bucket) == counts, value.tag
    writer = tb.EventWriter(tmp_path / "own")
    assert tb.write_histograms(writer, "train", 3, channels) == tags
    writer.close()
    acc = _read(tmp_path / "own")
    assert sorted(acc.Tags()["histograms"]) == sorted(tags)
    protos = tb.histogram_protos(vectors)
    for tag in tags:
        (event,) = acc.Histograms(tag)
        got, h = event.histogram_value, protos[tag]
        assert event.step == 3 and (got.min, got.max, got.num) == (h.min, h.max, h.num)
        assert (got.sum, got.sum_squares) == (h.sum, h.sum_squares)
        assert list(got.bucket_limit) == list(h.bucket_limit)
        assert list(got.bucket) == list(h.bucket)


def test_event_writer_buffer_keeps_every_record_whatever_their_sizes(tmp_path: Path) -> None:
    """Records smaller and larger than the reused buffer, many flushes: every event in order."""
    from tensorboard.compat.proto.event_pb2 import Event

    rng = np.random.default_rng(2)
    mb = events.BUFFER_BYTES // 10  # values of about 10 bytes each
    counts = [1, 3 * mb, 20, mb - 1, 2, 2 * mb, *rng.integers(1, 40_000, size=12).tolist()]
    payloads = [
        tb.summary_bytes(tuple(f"t{i}" for i in range(n)), rng.standard_normal(n)) for n in counts
    ]
    assert max(map(len, payloads)) > 2 * events.BUFFER_BYTES
    with tb.EventWriter(tmp_path) as writer:
        for step, data in enumerate(payloads):
            if step % 2:
                writer.write_summary(data, step, wall_time=1.5)
            else:  # in pieces
                writer.write_summary([data[:3], memoryview(data)[3:]], step, wall_time=1.5)
    (path,) = tmp_path.iterdir()
    first, *rest = [Event.FromString(r) for r in _records(path)]
    assert first.file_version == "brain.Event:2"
    assert [e.step for e in rest] == list(range(len(payloads)))
    assert [e.summary.SerializeToString() for e in rest] == payloads
