"""Constants stored when they change: the encoder the store applies to rows as they arrive, and
the fill every reader applies so that a table reads as if each value had been written each step.

A metric marked ``constant`` in the catalogue (``eps``, ``momentum``, ``train_mode``,
``model_train_mode``, ``has_running_stats``, ``batch_size``, ``samples_per_channel``: what the
layer is, the same at almost every step) is written at the first step of a store and then only
when its value changes, per (stage, rank, layer). A layer that has such a metric at a step has
its ``batch_mean`` row (:data:`bnprobe.metrics.ANCHOR`) there too, so the steps a value was in
force are known: :func:`fill_constants` puts back, at each such step without a stored row, the
last stored value, with the anchor's epoch, in the row's catalogue place. ``fill_constants`` of
the encoded rows is the table the tap produced (tests/test_store.py checks this on a real fit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bnprobe import metrics as _metrics
from bnprobe.store.table import CONSTANT_METRICS, Rows, frozen_names, same_names

ANCHOR = _metrics.ANCHOR

_RANK: dict[tuple[str, str], int] = {
    (stage, m.name): i for stage in _metrics.STAGES for i, m in enumerate(_metrics.entries(stage))
}
"""(stage, metric) -> position in the stage's catalogue order: the order of a layer's rows."""
_RANKS: dict[str, dict[str, int]] = {
    stage: {m: i for (s, m), i in _RANK.items() if s == stage} for stage in _metrics.STAGES
}


class Changes:
    """Which rows of constant metrics to keep: those whose value differs from the last one kept
    for the same (stage, rank, layer, metric), and every constant of a layer that has no anchor
    row in the block (a step where measuring it failed: nothing to fill from there).

    The positions of the constants in a block of rows are worked out once per layout (the tap
    sends the same layer and metric lists every step); the comparison is one numpy expression.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[str, int, str, str], int] = {}
        self._last = np.full(64, np.nan)
        self._seen = np.zeros(64, dtype=bool)
        self._plans: dict[tuple[str, int, int], tuple[Any, Any, Any]] = {}

    def keep(self, rows: Rows) -> np.ndarray | None:
        """A mask of the rows to store (None: all of them). Rows of several steps
        (:attr:`Rows.multi`) are judged step by step, as if each step came on its own."""
        constants = CONSTANT_METRICS.get(rows.stage)
        if constants is None or rows.channels is not None or not len(rows.metrics):
            return None
        if rows.multi:
            return self._keep_steps(rows, constants)
        plan = self._plan(rows, constants)
        if plan is None:
            return None
        where, slots, anchored = plan
        values = np.asarray(rows.values, dtype=np.float64)[where]
        last = self._last[slots]
        same = self._seen[slots] & ((values == last) | (np.isnan(values) & np.isnan(last)))
        self._last[slots] = values
        self._seen[slots] = True
        drop = same & anchored
        if not drop.any():
            return None
        keep = np.ones(len(rows.metrics), dtype=bool)
        keep[where[drop]] = False
        return keep

    def _keep_steps(self, rows: Rows, constants: frozenset[str]) -> np.ndarray | None:
        """:meth:`keep` of rows of several steps: for k steps named alike (:meth:`Rows.tiling`)
        one plan and one (k, constants) comparison, each step against the one before (the
        first against the last value kept); else step by step."""
        tiled = rows.tiling()
        plan = None
        if tiled is not None:
            n, layers, metrics = tiled
            plan = self._plan(Rows(0, 0, rows.stage, rows.rank, layers, metrics, ()), constants)
            if plan is None:
                return None
        if tiled is None or plan is None or len(np.unique(plan[1])) != len(plan[1]):
            pairs = zip(rows.runs(), rows.split(), strict=True)
            masks = [(run, self.keep(part)) for run, part in pairs]
            if all(mask is None for _, mask in masks):
                return None
            out = np.ones(len(rows.metrics), dtype=bool)
            for (a, b), mask in masks:
                if mask is not None:
                    out[a:b] = mask
            return out
        where, slots, anchored = plan
        k = len(rows.metrics) // n
        values = np.asarray(rows.values, dtype=np.float64).reshape(k, n)[:, where]
        before = np.empty_like(values)
        before[0] = self._last[slots]
        before[1:] = values[:-1]
        seen = np.ones(values.shape, dtype=bool)
        seen[0] = self._seen[slots]
        same = seen & ((values == before) | (np.isnan(values) & np.isnan(before)))
        self._last[slots] = values[-1]
        self._seen[slots] = True
        drop = same & anchored
        if not drop.any():
            return None
        keep = np.ones((k, n), dtype=bool)
        keep[:, where] = ~drop
        return keep.reshape(-1)

    def _plan(
        self, rows: Rows, constants: frozenset[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        key = (rows.stage, rows.rank, len(rows.metrics))
        cached = self._plans.get(key)
        if (
            cached is not None
            and same_names(cached[1], rows.metrics)
            and same_names(cached[0], rows.layers)
        ):
            plan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = cached[2]
            return plan
        layers, metrics = list(rows.layers), list(rows.metrics)
        where = [i for i, m in enumerate(metrics) if m in constants]
        if not where:
            plan = None
        else:
            measured = {la for la, m in zip(layers, metrics, strict=True) if m == ANCHOR}
            slots = [self._slot((rows.stage, rows.rank, layers[i], metrics[i])) for i in where]
            anchored = [layers[i] in measured for i in where]
            plan = (np.array(where), np.array(slots), np.array(anchored, dtype=bool))
        keep = (rows.layers, rows.metrics)  # the objects themselves when frozen: cheap to compare
        self._plans[key] = (
            keep[0] if frozen_names(keep[0]) else layers,
            keep[1] if frozen_names(keep[1]) else metrics,
            plan,
        )
        return plan

    def _slot(self, key: tuple[str, int, str, str]) -> int:
        slot = self._slots.setdefault(key, len(self._slots))
        if slot >= len(self._last):
            grow = len(self._last)
            self._last = np.concatenate([self._last, np.full(grow, np.nan)])
            self._seen = np.concatenate([self._seen, np.zeros(grow, dtype=bool)])
        return slot


def constant_mask(df: pd.DataFrame) -> np.ndarray:
    """Rows of ``df`` that are layer rows of a constant metric."""
    mask = np.zeros(len(df), dtype=bool)
    if not len(df):
        return mask
    layer_rows = df["channel"].isna().to_numpy()
    for stage, names in CONSTANT_METRICS.items():
        mask |= (
            layer_rows
            & (df["stage"] == stage).to_numpy()
            & df["metric"].isin(list(names)).to_numpy()
        )
    return mask


def fill_constants(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (SPEC columns, table order) with each constant's value in force written at every
    step its layer was measured (its anchor row) and no row of its own: the table as the tap
    made it. Rows already there are kept as they are; a table that has every row (a table read
    from TensorBoard, an export) comes back unchanged."""
    const = constant_mask(df)
    if not const.any():
        return df
    pos = np.arange(len(df))
    na = df["channel"].isna().to_numpy()
    anchor_rows = na & (df["metric"] == ANCHOR).to_numpy()
    anchor_rows &= df["stage"].isin(list(CONSTANT_METRICS)).to_numpy()
    by = ["stage", "rank", "layer", "metric"]
    stored = df.loc[const, ["step", *by, "value"]].assign(_src=df["step"].to_numpy()[const])
    anchors = df.loc[anchor_rows, ["step", "epoch", "stage", "rank", "layer"]]
    anchors = anchors.assign(_pos=pos[anchor_rows])
    wanted = []
    for stage, names in CONSTANT_METRICS.items():
        at = anchors[anchors["stage"] == stage]
        have = stored.loc[stored["stage"] == stage, "metric"].unique()
        for name in sorted(names & {str(m) for m in have}):
            wanted.append(at.assign(metric=name))
    if not wanted:
        return df
    left = pd.concat(wanted, ignore_index=True)
    left["metric"] = left["metric"].astype(object)
    left = left.sort_values("step", kind="stable")
    right = stored.sort_values("step", kind="stable").drop_duplicates(["step", *by], keep="last")
    merged = pd.merge_asof(left, right, on="step", by=by, direction="backward")
    fill = merged[merged["_src"].notna() & (merged["_src"] != merged["step"])]
    if not len(fill):
        return df
    added = pd.DataFrame(
        {
            "step": fill["step"].to_numpy(dtype=np.int64),
            "epoch": fill["epoch"].to_numpy(dtype=np.int64),
            "stage": pd.Series(fill["stage"].to_numpy(dtype=object), dtype=object),
            "rank": fill["rank"].to_numpy(dtype=np.int64),
            "layer": pd.Series(fill["layer"].to_numpy(dtype=object), dtype=object),
            "channel": pd.array([pd.NA] * len(fill), dtype="Int64"),
            "metric": pd.Series(fill["metric"].to_numpy(dtype=object), dtype=object),
            "value": fill["value"].to_numpy(dtype=np.float64),
        }
    )
    return _in_place(df, added, fill["_pos"].to_numpy(dtype=np.int64))


def _in_place(df: pd.DataFrame, added: pd.DataFrame, anchor_pos: np.ndarray) -> pd.DataFrame:
    """``df`` with ``added`` rows put in the block (consecutive layer rows of one step, stage,
    rank and layer) of their anchor, each block that gained rows sorted by catalogue order."""
    n = len(df)
    keys = [df[c].to_numpy() for c in ("step", "stage", "rank", "layer")]
    na = df["channel"].isna().to_numpy()
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for key in (*keys, na):
        change[1:] |= key[1:] != key[:-1]
    block = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    grown = np.zeros(len(starts), dtype=bool)
    grown[block[anchor_pos]] = True
    both = pd.concat([df, added], ignore_index=True)
    pos = np.concatenate([np.arange(n), anchor_pos])
    blk = block[pos]
    first = np.where(grown[blk], starts[blk], np.concatenate([np.arange(n), anchor_pos]))
    within = np.zeros(len(both), dtype=np.int64)
    sel = grown[blk]
    for stage, ranks in _RANKS.items():  # catalogue order within the blocks that grew
        here = sel & (both["stage"] == stage).to_numpy()
        if here.any():
            named = both["metric"].to_numpy()[here]
            within[here] = pd.Series(named).map(ranks).fillna(len(ranks)).to_numpy(np.int64)
    order = np.lexsort((pos, within, first))
    return both.iloc[order].reset_index(drop=True)
