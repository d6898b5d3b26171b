"""Reading event files back into the SPEC table, with TensorBoard's own reader.

Owns :func:`read_tensorboard` and :func:`read_runs`. Imports TensorBoard's event processing (on
first use) and :mod:`bnprobe.store`; no torch, no Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.tensorboard.tags import PREFIX, Tag, _after_root, _match_scalar


def _size_guidance() -> dict[str, int]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    return {
        ea.SCALARS: 0,  # 0 = keep every event
        ea.TENSORS: 0,  # scalars written with new_style=True arrive as tensors
        ea.HISTOGRAMS: 1,
        ea.COMPRESSED_HISTOGRAMS: 1,
        ea.IMAGES: 1,
        ea.AUDIO: 1,
    }


def _scalar_series(acc: Any) -> Iterable[tuple[str, list[int], list[float]]]:
    """Every scalar series of an accumulator as (tag, steps, values), old and new style."""
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        yield tag, [e.step for e in events], [float(e.value) for e in events]
    for tag in tags.get("tensors", []):
        meta = acc.SummaryMetadata(tag)
        if meta.plugin_data.plugin_name != "scalars":
            continue
        from tensorboard.util import tensor_util

        events = acc.Tensors(tag)
        values = [float(tensor_util.make_ndarray(e.tensor_proto).item()) for e in events]
        yield tag, [e.step for e in events], values


def _run_frame(acc: Any) -> pd.DataFrame:
    """The SPEC rows of one run (an accumulator that has been reloaded)."""
    epochs: dict[str, dict[int, int]] = {}
    series: list[tuple[Tag, list[int], list[float]]] = []
    for tag, steps, values in _scalar_series(acc):
        rest = _after_root(tag)
        if rest is not None and len(rest) == 2 and rest[1] == "epoch":
            epochs[rest[0]] = {s: round(v) for s, v in zip(steps, values, strict=True)}
            continue
        parsed = _match_scalar(tag)
        if parsed is not None:
            series.append((parsed, steps, values))
    frames = []
    stage_order = {s: i for i, s in enumerate(store.STAGES)}
    for order, (parsed, steps, values) in enumerate(series):
        by_step = dict(zip(steps, values, strict=True))  # a step logged twice: the last wins
        n = len(by_step)
        ep = epochs.get(parsed.stage, {})
        frames.append(
            pd.DataFrame(
                {
                    "step": np.fromiter(by_step.keys(), dtype=np.int64, count=n),
                    "epoch": np.array([ep.get(s, -1) for s in by_step], dtype=np.int64),
                    "stage": parsed.stage,
                    "rank": np.zeros(n, dtype=np.int64),
                    "layer": parsed.layer,
                    "channel": pd.array([pd.NA] * n, dtype="Int64"),
                    "metric": parsed.metric,
                    "value": np.fromiter(by_step.values(), dtype=np.float64, count=n),
                    "_stage": stage_order.get(parsed.stage, len(stage_order)),
                    "_order": order,
                }
            )
        )
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["step", "_stage", "_order"], kind="stable")
    return df.drop(columns=["_stage", "_order"]).reset_index(drop=True)


def read_tensorboard(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read the bnprobe scalars of a run folder, or of a folder of runs, into the SPEC table.

    Uses TensorBoard's own reader (``EventMultiplexer``, every scalar kept). A run is a folder
    with event files directly in it. Returns one row per ``bnprobe/<stage>/<metric>/<layer>``
    scalar event (also ``<prefix>-bnprobe/...``, written through a logger with a prefix):
    rank 0, channel NA, epoch from ``bnprobe/<stage>/epoch`` at the same step (-1 where it was
    not logged), value as TensorBoard stored it (float32). When several runs hold bnprobe
    scalars, a last column ``run`` holds each run folder's path relative to ``path`` (posix
    separators), the same names :func:`bnprobe.load` gives the runs' stores.

    Raises FileNotFoundError naming ``path`` when it does not exist, holds no event files, or
    its event files hold no bnprobe scalars.
    """
    frames = read_runs(path)
    if len(frames) == 1:  # one run with bnprobe data: the plain SPEC table
        return next(iter(frames.values()))
    return store.with_runs(frames)


def read_runs(path: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """What :func:`read_tensorboard` reads, as ``{run: table}`` (``"."``: ``path`` itself);
    runs without bnprobe scalars are left out. The same errors."""
    from tensorboard.backend.event_processing import event_accumulator, event_multiplexer

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no TensorBoard event files at {str(root)!r}: it does not exist")
    accs: dict[str, Any] = {}
    if root.is_file():
        acc = event_accumulator.EventAccumulator(str(root), size_guidance=_size_guidance())
        accs["."] = acc.Reload()
    else:
        mux = event_multiplexer.EventMultiplexer(size_guidance=_size_guidance())
        mux.AddRunsFromDirectory(str(root))
        mux.Reload()
        accs = {Path(run).as_posix(): mux.GetAccumulator(run) for run in sorted(mux.Runs())}
    if not accs:
        raise FileNotFoundError(
            f"no TensorBoard event files at {str(root)!r}: no events.out.tfevents.* file in it "
            "or below it. Pass the logger's run folder (e.g. lightning_logs/version_0) or its "
            "parent."
        )
    frames = {run: _run_frame(acc) for run, acc in accs.items()}
    frames = {run: store.conform(f) for run, f in frames.items() if len(f)}
    if not frames:
        raise FileNotFoundError(
            f"no bnprobe scalars at {str(root)!r}: its event files ({len(accs)} run(s)) have no "
            f"'{PREFIX}/<stage>/<metric>/<layer>' tags (nor '<prefix>-{PREFIX}/...'). Was "
            "BNProbe attached with a TensorBoardLogger?"
        )
    return dict(sorted(frames.items()))
