"""Rows of several steps in one block (``Rows.step`` an array, what rank 0 makes of a batch of
another rank's steps): every sink treats it exactly as the same steps given one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bnprobe.diagnosis.digest import Digest
from bnprobe.recorder import Recorder
from bnprobe.store import Rows, Store, load
from bnprobe.tap import Snapshot
from bnprobe.tensorboard import EventWriter, snapshot_metrics
from tests.test_store import _tap_rows


def _shared(parts: list[Rows]) -> list[Rows]:
    """``parts`` with each run of steps that name their rows alike sharing one pair of name
    columns (as the tap and the gather hand them out: the same objects every step)."""
    out: list[Rows] = []
    for p in parts:
        prev = next((q for q in reversed(out) if q.channels is None), None)
        if (
            prev is not None
            and list(prev.layers) == list(p.layers)
            and list(prev.metrics) == list(p.metrics)
        ):
            p = p._replace(layers=prev.layers, metrics=prev.metrics)
        else:
            p = p._replace(layers=tuple(p.layers), metrics=tuple(p.metrics))
        out.append(p)
    return out


def _blocks(parts: list[Rows], shared: bool) -> list[Rows]:
    """The train layer rows of the steps as multi-step blocks (runs of steps named alike when
    ``shared``: the fast path; else every step in one block: step by step), the other rows
    (per-channel rows as one block too, validation) as they came, after them."""
    train = [p for p in parts if p.channels is None and p.stage == "train"]
    channels = [p for p in parts if p.channels is not None and p.stage == "train"]
    rest = [p for p in parts if p.stage != "train"]
    blocks: list[Rows] = []
    if shared:
        train = _shared(train)
        run: list[Rows] = []
        for p in train:
            if run and p.layers is not run[0].layers:
                blocks.append(Rows.stack(run))
                run = []
            run.append(p)
        blocks.append(Rows.stack(run))
        assert any(b.tiling() is not None for b in blocks)
    else:
        blocks.append(Rows.stack(train))
        assert blocks[0].tiling() is None
    return [*blocks, Rows.stack(channels), *rest]


@pytest.fixture(scope="module")
def tap_rows() -> list[Rows]:
    return _tap_rows()


@pytest.mark.parametrize("shared", [True, False])
def test_a_block_of_steps_stores_what_its_steps_store_one_by_one(
    tmp_path: Path, tap_rows: list[Rows], shared: bool
) -> None:
    blocks = _blocks(tap_rows, shared)
    assert sum(len(b.metrics) for b in blocks) == sum(len(p.metrics) for p in tap_rows)
    one, many = Store(tmp_path / "one"), Store(tmp_path / "many")
    for block in blocks:
        many.append(block)
        for part in block.split():
            assert not part.multi
            one.append(part)
    pending = many.to_dataframe()
    pd.testing.assert_frame_equal(pending, one.to_dataframe(), check_exact=True)
    one.flush()
    many.flush()
    for constants in ("every_step", "changes"):
        a = load(tmp_path / "one", constants=constants)
        b = load(tmp_path / "many", constants=constants)
        pd.testing.assert_frame_equal(b, a, check_exact=True)
    stored = load(tmp_path / "many", constants="changes")
    assert len(stored) < len(pending)  # constants were dropped inside the blocks, step by step
    momentum = stored[(stored.metric == "momentum") & (stored.stage == "train")]
    assert 4 in momentum["step"].tolist()  # the change at step 4, found inside a block
    pd.testing.assert_frame_equal(many.to_dataframe(), pending, check_exact=True)


@pytest.mark.parametrize("shared", [True, False])
def test_a_digest_fed_blocks_of_steps_is_the_digest_fed_step_by_step(
    tap_rows: list[Rows], shared: bool
) -> None:
    """Small head, tail and buckets, so that the blocks' steps cross into buckets and merges."""
    blocks = _blocks(tap_rows, shared)
    opts = {"head": 2, "tail": 3, "bucket_steps": 2, "buckets": 2}
    one, many = Digest(**opts), Digest(**opts)
    for block in blocks:
        many.add(block)
        for part in block.split():
            one.add(part)
    assert many.rows_seen == one.rows_seen == sum(len(p.metrics) for p in tap_rows)
    assert many.steps() == one.steps() and one.steps()["train"]["count"] == 12
    pd.testing.assert_frame_equal(many.table(), one.table(), check_exact=True)
    assert [str(f) for f in many.diagnose()] == [str(f) for f in one.diagnose()]
    assert one.resolution > 0  # the middle was summarized


def _recorded(folder: Path, parts: list[Rows], log: list[Any]) -> Recorder:
    class Logger:
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            log.append((step, dict(metrics)))

    writer = EventWriter(folder)
    rec = Recorder(Store(folder / "store"), writers=[writer], loggers=[Logger()], histograms=False)
    rec.record(Snapshot(parts))
    rec.close()
    writer.close()
    return rec


def test_a_recorded_block_writes_the_events_and_logs_of_its_steps(
    tmp_path: Path, tap_rows: list[Rows]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    blocks = _blocks(tap_rows, shared=True)
    singles = [p for b in blocks for p in b.split()]
    logs: dict[str, list[Any]] = {"one": [], "many": []}
    recs = {
        "one": _recorded(tmp_path / "one", singles, logs["one"]),
        "many": _recorded(tmp_path / "many", blocks, logs["many"]),
    }
    assert logs["many"] == logs["one"] and len(logs["one"]) == 12  # one call per step
    assert snapshot_metrics(Snapshot(blocks)) == snapshot_metrics(Snapshot(singles))
    events = {}
    for name in recs:
        acc = EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        events[name] = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}
    assert events["many"] == events["one"]
    assert any(len(v) == 12 for v in events["one"].values())  # a point per step
    pd.testing.assert_frame_equal(
        recs["many"].to_dataframe(), recs["one"].to_dataframe(), check_exact=True
    )
    assert recs["many"].steps() == recs["one"].steps()


def test_rows_of_several_steps_split_back_and_build_their_table() -> None:
    names = ("bn", "bn")
    metrics = ("batch_mean", "eps")
    parts = [Rows(s, s // 2, "train", 1, names, metrics, [float(s), 1e-5]) for s in (3, 4, 7)]
    block = Rows.stack(parts)
    assert block.multi and block.step.tolist() == [3, 3, 4, 4, 7, 7]
    assert block.tiling() == (2, names, metrics) and block.runs() == [(0, 2), (2, 4), (4, 6)]
    back = block.split()
    assert [(p.step, p.epoch, p.layers, list(p.values)) for p in back] == [
        (p.step, p.epoch, p.layers, list(p.values)) for p in parts
    ]
    pd.testing.assert_frame_equal(
        block.frame(), pd.concat([p.frame() for p in parts], ignore_index=True)
    )
    # Names shared by identity only: equal copies are not a tiling (but split alike).
    copies = Rows.stack([p._replace(layers=list(names)) for p in parts])
    assert copies.tiling() is None and [p.step for p in copies.split()] == [3, 4, 7]
    with pytest.raises(ValueError, match="one stage and rank"):
        Rows.stack([parts[0], parts[1]._replace(rank=0)])
    assert np.asarray(block.step).dtype == np.int64


def test_rank_zero_reads_a_batch_of_another_rank_as_one_block() -> None:
    """What one exchange of 5 steps brings rank 0 (the vectors packed as ``RankGather._send``
    packs them): one block of rank 1's rows and one of rank_divergence, whose steps are the rows
    the vectors hold, step by step."""
    import torch
    from torch import nn

    from bnprobe.distributed import gather as g
    from bnprobe.tap import BNTap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6))
    ranks = g.RankGather({"1": 1e-5, "3": 1e-5}, batch=5)
    sent = []
    with BNTap(model, keep_channels=True) as tap:
        for step in range(5):
            tap.start()
            model(torch.randn(8, 6))
            layout, vector = ranks.encode(tap.collect(step=10 + step, epoch=step // 3))
            sent.append((10 + step, step // 3, vector))
    ranks._known[layout.key] = layout
    ranks._cap, ranks.batch_steps = layout.size, 5
    slots = ranks.note_bytes // 8
    width = g.STEP_HEADER + layout.size
    table = np.zeros((2, g.HEADER + slots + 5 * width))
    for r in range(2):
        table[r, : g.HEADER].view(np.int64)[:] = [5, 0, 0, 0]
        body = table[r, g.HEADER + slots :].reshape(5, width)
        for j, (step, epoch, vector) in enumerate(sent):
            body[j, : g.STEP_HEADER].view(np.int64)[:] = [
                step,
                epoch,
                g._OK,
                len(vector),
                layout.key,
            ]
            body[j, g.STEP_HEADER :] = vector * (1 + r)  # rank 1's running moments differ
    out = ranks._decode(table, step=14, epoch=1)
    assert [(rows.rank, rows.multi, rows.tiling() is not None) for rows in out] == [
        (1, True, True),
        (0, True, True),
    ]
    other, divergence = out
    n = len(layout.metrics)
    for j, one in enumerate(other.split()):
        step, epoch, vector = sent[j]
        assert (one.step, one.epoch, one.layers, one.metrics) == (
            step, epoch, layout.layers, layout.metrics,
        )  # fmt: skip
        np.testing.assert_array_equal(one.values, 2 * vector[:n])
    assert [one.step for one in divergence.split()] == [10, 11, 12, 13, 14]
    assert set(divergence.metrics) == {"rank_divergence"} and len(divergence.metrics) == 10
    assert np.isfinite(np.asarray(divergence.values)).all() and (divergence.values > 0).all()
