"""One run's table as the rules read it: wide per-stage views and small shared helpers.

The rules never read the long table itself: :class:`Run` holds its rows as numpy columns with
stage, layer and metric as integer codes (:class:`Columns`: from a table, or straight from a
:class:`~bnprobe.diagnosis.digest.Digest`, which keeps them so), and builds each stage's wide
view (:func:`pivot`) from them once, with integer arithmetic instead of grouping strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.diagnosis.findings import Evidence
from bnprobe.diagnosis.thresholds import DEFAULT_EPS, DEFAULT_MOMENTUM, Thresholds

T = TypeVar("T")


@dataclass(frozen=True)
class Columns:
    """One run's rows in table order as numpy columns: ``stage``, ``layer`` and ``metric`` are
    codes into ``names`` (object array), ``channel`` is -1 for layer rows."""

    step: np.ndarray
    stage: np.ndarray
    rank: np.ndarray
    layer: np.ndarray
    channel: np.ndarray
    metric: np.ndarray
    value: np.ndarray
    names: np.ndarray

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Columns:
        """The columns of a table with the SPEC columns."""
        names: list[object] = []
        vocab: dict[object, int] = {}
        coded = {}
        for c in ("stage", "layer", "metric"):
            codes, uniques = pd.factorize(df[c].to_numpy(dtype=object), use_na_sentinel=False)
            lut = np.empty(len(uniques), dtype=np.int64)
            for i, name in enumerate(uniques):
                if name not in vocab:
                    vocab[name] = len(names)
                    names.append(name)
                lut[i] = vocab[name]
            coded[c] = lut[codes] if len(codes) else codes.astype(np.int64)
        return cls(
            df["step"].to_numpy(dtype=np.int64),
            coded["stage"],
            df["rank"].to_numpy(dtype=np.int64),
            coded["layer"],
            df["channel"].fillna(-1).to_numpy(dtype=np.int64),
            coded["metric"],
            df["value"].to_numpy(dtype=np.float64),
            np.asarray([*names, None], dtype=object)[:-1],
        )

    def __len__(self) -> int:
        return len(self.step)

    def code(self, name: str) -> int:
        """The code of ``name`` (-1: no row has it)."""
        hit = np.flatnonzero(self.names == name)
        return int(hit[0]) if len(hit) else -1

    def codes(self, names: Iterable[str]) -> np.ndarray:
        """Per code: whether its name is one of ``names``."""
        wanted = set(names)
        return np.fromiter((n in wanted for n in self.names), bool, len(self.names))

    def frame(self, idx: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
        """Rows ``idx`` as a small table of ``columns`` (names for the coded ones)."""
        out: dict[str, object] = {}
        for c in columns:
            x = getattr(self, c)[idx]
            if c in ("stage", "layer", "metric"):
                out[c] = pd.Series(self.names[x], dtype=object)
            elif c == "channel":
                out[c] = pd.arrays.IntegerArray(x.copy(), x < 0)
            else:
                out[c] = x
        return pd.DataFrame(out)


class Run:
    """One run's rows (a table, or :class:`Columns`) with wide per-stage views (rank, layer,
    step) x metric."""

    def __init__(self, df: pd.DataFrame | Columns, thresholds: Thresholds) -> None:
        self.rows = df if isinstance(df, Columns) else Columns.from_frame(df)
        self.th = thresholds
        rows = self.rows
        self.order = {str(rows.names[c]): i for i, c in enumerate(pd.unique(rows.layer).tolist())}
        self.ranks = len(pd.unique(rows.rank))
        """How many ranks the run's rows come from."""
        self._wide: dict[str, pd.DataFrame] = {}
        self._memo: dict[str, object] = {}
        train = self.wide("train")
        self.momentum: dict[str, float] = {}
        self.eval_only: set[str] = set()
        self.eps: dict[str, float] = {}
        mode = col(train, "train_mode").to_numpy()
        eps = col(train, "eps").to_numpy()
        momentum = col(train, "momentum").to_numpy()
        # rows where the layer ran; there a NaN momentum means momentum=None
        ran = ~np.isnan(mode if "train_mode" in train else momentum)
        for layer, pos in zip(*groups(train["layer"]), strict=True):
            name = str(layer)
            if "momentum" in train:
                hit = pos[ran[pos]]
                if len(hit):
                    self.momentum[name] = float(momentum[hit[-1]])
            m = mode[pos]
            m = m[~np.isnan(m)]
            if len(m) and float(m[-1]) == 0.0:
                self.eval_only.add(name)
            e = eps[pos]
            e = e[~np.isnan(e)]
            self.eps[name] = float(e[-1]) if len(e) else DEFAULT_EPS

    def wide(self, stage: str) -> pd.DataFrame:
        """Layer-aggregate rows of ``stage`` as columns step, rank, layer, <metric>..."""
        if stage not in self._wide:
            self._wide[stage] = pivot(self.rows, stage)
        return self._wide[stage]

    def channels(self, stage: str, metric: str) -> pd.DataFrame:
        """Per-channel rows of one metric: columns step, rank, layer, channel, value."""
        r = self.rows
        sel = (r.stage == r.code(stage)) & (r.metric == r.code(metric)) & (r.channel >= 0)
        return r.frame(np.flatnonzero(sel), ["step", "rank", "layer", "channel", "value"])

    def model_residual(self, layer: str, step: int, updates: float | None = None) -> float:
        """Fraction of the initial running statistics left after ``updates`` updates (default:
        ``step``): ``(1 - m) ** updates``; 0 when the layer never updates them (eval mode,
        momentum 0); momentum=None (cumulative average) replaces them at the first update.
        For tables without the ``warmup_residual`` metric."""
        if layer in self.eval_only:
            return 0.0
        n = float(step if updates is None or math.isnan(updates) else updates)
        m = self.momentum.get(layer, DEFAULT_MOMENTUM)
        if math.isnan(m):
            return 0.0 if n >= 1 else 1.0
        if m <= 0.0:
            return 0.0
        return float((1.0 - min(m, 1.0)) ** max(n, 0.0))

    @property
    def static(self) -> set[str]:
        """Layers whose running statistics do not update while the model trains (eval mode,
        momentum 0): no warm-up is under way, their statistics are what eval mode gets."""
        return self.eval_only | {la for la, m in self.momentum.items() if m == 0.0}

    def residuals(self, df: pd.DataFrame) -> np.ndarray:
        """Per row of a wide table: the warm-up residual of the layer at that row: the
        ``warmup_residual`` metric where the table has it, else :meth:`model_residual`; 0 for
        :attr:`static` layers."""
        given = col(df, "warmup_residual").to_numpy(dtype=float)
        static = df["layer"].isin(self.static).to_numpy(dtype=bool)
        out = np.where(static, 0.0, given)
        missing = np.flatnonzero(~static & ~np.isfinite(given))
        if len(missing):  # tables without warmup_residual: the model, row by row
            updates = col(df, "num_batches_tracked").to_numpy(dtype=float)
            layers, steps = df["layer"].to_numpy()[missing], df["step"].to_numpy()[missing]
            for i, la, s in zip(missing.tolist(), layers, steps, strict=True):
                out[i] = self.model_residual(str(la), int(s), updates[i])
        return np.asarray(out, dtype=float)

    def warm(self, df: pd.DataFrame) -> np.ndarray:
        """Per row: is the layer past its warm-up (residual below the threshold)?"""
        return self.residuals(df) < self.th.warmup_residual

    def memo(self, name: str, make: Callable[[], T]) -> T:
        """``make()``, once per run: what several rules read (tables are copy-on-write)."""
        if name not in self._memo:
            self._memo[name] = make()
        return cast(T, self._memo[name])

    def active(self) -> pd.DataFrame:
        """:func:`active` training rows, once."""
        return self.memo("active", lambda: active(self.wide("train")))

    def unused(self) -> set[str]:
        """Layers with forward_calls == 0 at every logged training step."""
        return set(self.memo("unused", self._unused))

    def _unused(self) -> set[str]:
        train = self.wide("train")
        if "forward_calls" not in train:
            return set()
        calls = train.groupby("layer", sort=False)["forward_calls"]
        return {str(k) for k, v in calls.max().items() if v == 0.0}

    def layer_key(self, layer: str) -> int:
        return self.order.get(layer, len(self.order))

    def eps_of(self, df: pd.DataFrame) -> np.ndarray:
        codes, layers = pd.factorize(df["layer"].to_numpy(dtype=object), use_na_sentinel=False)
        lut = np.array([self.eps.get(str(la), DEFAULT_EPS) for la in layers], dtype=float)
        return lut[codes] if len(codes) else np.zeros(0, dtype=float)


def groups(*keys: pd.Series | np.ndarray) -> tuple[list[object], list[np.ndarray]]:
    """The groups of equal ``keys`` as ``DataFrame.groupby(keys, sort=False)`` makes them: the
    key of each group (of the first key only) in order of first appearance, and the positions
    of its rows in order."""
    if not len(keys[0]):
        return [], []
    first, uniques = pd.factorize(np.asarray(keys[0]), use_na_sentinel=False)
    code = first
    for key in keys[1:]:
        k, u = pd.factorize(np.asarray(key), use_na_sentinel=False)
        code = pd.factorize(code * len(u) + k)[0]
    order = np.argsort(code, kind="stable")
    pos = np.split(order, np.flatnonzero(np.diff(code[order])) + 1)
    return [uniques[first[p[0]]] for p in pos], pos


def by_layer(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per layer, the positions of its rows in order: ``df[df["layer"] == layer]`` is
    ``df.iloc[by_layer(df)[layer]]``, without comparing every row's name per layer."""
    keys, pos = groups(df["layer"]) if len(df) else ([], [])
    return {str(k): p for k, p in zip(keys, pos, strict=True)}


def check_table(df: object) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(
            f"expected a pandas DataFrame with the bnprobe schema; got {type(df).__name__}. "
            "Use BNProbe.to_dataframe(), bnprobe.load(path) or bnprobe.read_tensorboard(path)."
        )
    missing = [c for c in store.COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"the table is missing columns {missing}; a bnprobe table has the columns "
            f"{list(store.COLUMNS)} (BNProbe.to_dataframe(), bnprobe.load, "
            "bnprobe.read_tensorboard)"
        )


def runs(df: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """The runs of a table: ``[(None, df)]`` without a ``run`` column, else one per run (a
    single run keeps its name), in table order. Runs are never merged."""
    if "run" not in df.columns:
        return [(None, df)]
    return [
        (None if pd.isna(name) else str(name), part)
        for name, part in df.groupby("run", sort=False, dropna=False)
    ]


def layer_order(df: pd.DataFrame) -> list[str]:
    return [str(x) for x in pd.unique(df["layer"])]


def pivot(rows: Columns | pd.DataFrame, stage: str) -> pd.DataFrame:
    """Layer-aggregate rows of one stage, one row per (rank, layer, step), one column per
    metric (sorted by name), sorted by rank, layer (in table order) and step; of rows repeated
    for the same (rank, layer, step, metric), the last one."""
    if isinstance(rows, pd.DataFrame):
        rows = Columns.from_frame(rows)
    idx = np.flatnonzero((rows.stage == rows.code(stage)) & (rows.channel < 0))
    if not len(idx):
        return pd.DataFrame({"rank": [], "layer": [], "step": []}).astype(
            {"rank": "int64", "layer": object, "step": "int64"}
        )
    if len(idx) == len(rows):  # one stage, no channel rows: the columns themselves
        rank, layer, step, metric, value = rows.rank, rows.layer, rows.step, rows.metric, rows.value
    else:
        rank, layer, step, metric, value = (
            x[idx] for x in (rows.rank, rows.layer, rows.step, rows.metric, rows.value)
        )
    ranks, rank_code = _dense(rank)
    steps, step_code = _dense(step)
    present = np.flatnonzero(np.bincount(metric, minlength=len(rows.names)))
    by_name = present[np.argsort(rows.names[present].astype(str), kind="stable")]
    column = np.zeros(len(rows.names), dtype=np.int64)
    column[by_name] = np.arange(len(by_name))
    col_code = column[metric]
    row = _rows_of(rank_code, layer, step_code, len(steps), len(rows.names))
    cell = row * len(by_name) + col_code
    if np.bincount(cell).max() > 1:  # the same (rank, layer, step, metric) twice: keep the last
        last = ~pd.Series(cell).duplicated(keep="last").to_numpy()
        rank_code, layer, step_code = rank_code[last], layer[last], step_code[last]
        col_code, value, metric = col_code[last], value[last], metric[last]
        present = np.flatnonzero(np.bincount(metric, minlength=len(rows.names)))
        keep = np.isin(by_name, present)
        column[by_name[keep]] = np.arange(int(keep.sum()))
        by_name = by_name[keep]
        col_code = column[metric]
        row = _rows_of(rank_code, layer, step_code, len(steps), len(rows.names))
    n = int(row.max()) + 1
    grid = np.full((n, len(by_name)), np.nan)
    grid[row, col_code] = value
    at = np.zeros(n, dtype=np.int64)
    at[row] = np.arange(len(row))
    wide = pd.DataFrame(grid, columns=[str(x) for x in rows.names[by_name]])
    wide.insert(0, "step", steps[step_code[at]].astype(np.int64))
    wide.insert(0, "layer", pd.Series(rows.names[layer[at]], dtype=object))
    wide.insert(0, "rank", ranks[rank_code[at]].astype(np.int64))
    return wide


def _dense(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of ``x`` and the index of each element among them, in
    O(len(x)) for columns made of long stretches of one value (steps, ranks)."""
    starts = np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1]]))
    distinct, inverse = np.unique(x[starts], return_inverse=True)
    lengths = np.diff(np.append(starts, len(x)))
    return distinct, np.repeat(inverse, lengths)


def _rows_of(
    rank: np.ndarray, layer: np.ndarray, step: np.ndarray, steps: int, names: int
) -> np.ndarray:
    """Per element, its row in the wide view sorted by rank, layer (in order of first
    appearance) and step."""
    layers = pd.unique(layer)
    position = np.zeros(names, dtype=np.int64)
    position[layers] = np.arange(len(layers))
    key = (rank.astype(np.int64) * len(layers) + position[layer]) * steps + step
    if int(rank.max() + 1) * len(layers) * steps <= max(4 * len(key), 1 << 22):
        used = np.zeros(int(key.max()) + 1, dtype=bool)
        used[key] = True
        return np.asarray((np.cumsum(used) - 1)[key])
    return np.asarray(np.unique(key, return_inverse=True)[1]).reshape(-1)


def col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-NaN when the table does not have that metric."""
    if name in df:
        return df[name].astype(float)
    return pd.Series(np.nan, index=df.index, dtype=float)


def active(train: pd.DataFrame) -> pd.DataFrame:
    """Training rows of layers that ran at that step (``forward_calls`` > 0, when known)."""
    if not len(train) or "forward_calls" not in train:
        return train
    return train[train["forward_calls"].fillna(1.0) > 0.0]


def score(df: pd.DataFrame, limits: dict[str, float]) -> np.ndarray:
    """max over metrics of value / limit. NaN, inf and missing metrics count 0: non-finite
    values are the nonfinite rule's business."""
    out = np.zeros(len(df), dtype=float)
    for metric, limit in limits.items():
        if metric in df:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = df[metric].to_numpy(dtype=float) / limit
            out = np.fmax(out, np.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0))
    return out


def rolling_median(df: pd.DataFrame, column: str, th: Thresholds) -> pd.Series:
    """Per (rank, layer), the median of ``column`` over the last ``train_window`` rows (at least
    ``train_min_steps`` of them); ``df`` sorted by step within each group.

    One pandas rolling pass over every group at once, the groups apart by ``train_window - 1``
    NaN (which a rolling median skips): no window reaches into another group."""
    _, pos = groups(df["rank"], df["layer"])
    n = len(df)
    if not n:
        return pd.Series(np.nan, index=df.index, dtype=float, name=column)
    order = np.concatenate(pos)
    lengths = np.array([len(p) for p in pos])
    gap = th.train_window - 1
    starts = np.concatenate([[0], np.cumsum(lengths + gap)[:-1]])
    place = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    place += np.arange(n)
    spaced = np.full(int(place[-1]) + 1, np.nan)
    spaced[place] = df[column].to_numpy(dtype=float)[order]
    rolled = pd.Series(spaced).rolling(th.train_window, min_periods=th.train_min_steps).median()
    out = np.empty(n)
    out[order] = rolled.to_numpy()[place]
    return pd.Series(out, index=df.index, name=column)


def trailing(df: pd.DataFrame, bad: np.ndarray) -> pd.DataFrame:
    """Rows of the unbroken stretch of bad rows that ends at the latest row, per (rank, layer).

    ``df`` is sorted by step within each (rank, layer); a group whose latest row is fine
    contributes nothing.
    """
    keep = np.zeros(len(df), dtype=bool)
    bad = np.asarray(bad, dtype=bool)
    for pos in groups(df["rank"], df["layer"])[1]:
        b = bad[pos]
        if not b[-1]:
            continue
        fine = np.flatnonzero(~b)
        keep[pos[fine[-1] + 1 if len(fine) else 0 :]] = True
    return df[keep]


def episodes(bad: pd.DataFrame) -> Iterator[tuple[str, int, pd.Series]]:
    """Per layer of ``bad`` (in table order): (layer, first step, the row with the top score)."""
    for layer, first, i in spans(bad):
        yield layer, first, bad.iloc[i]


def spans(bad: pd.DataFrame) -> list[tuple[str, int, int]]:
    """:func:`episodes` with the position in ``bad`` of the row with the top score (the first
    of its layer where ``bad`` has no ``score``) instead of the row: one pass over the layers'
    positions, no per-layer table (a rule that does not read the row pays nothing for it)."""
    if not len(bad):
        return []
    keys, pos = groups(bad["layer"])
    step = bad["step"].to_numpy()
    score = (
        np.nan_to_num(bad["score"].to_numpy(dtype=float), nan=-np.inf) if "score" in bad else None
    )
    out = []
    for layer, p in zip(keys, pos, strict=True):
        i = p[int(np.argmax(score[p]))] if score is not None else p[0]
        out.append((str(layer), int(step[p].min()), int(i)))
    return out


def latest(df: pd.DataFrame, pos: np.ndarray) -> pd.Series:
    """``df.iloc[pos].sort_values("step").iloc[-1]`` (``pos`` non-empty), without the sort where
    ``pos`` is in strictly increasing step order (one rank: a wide view is sorted by rank,
    layer, step), where the row at the largest step is the last."""
    step = df["step"].to_numpy()[pos]
    if len(step) < 2 or bool((step[1:] > step[:-1]).all()):
        return df.iloc[int(pos[-1])]
    return df.iloc[pos].sort_values("step").iloc[-1]


def top(df: pd.DataFrame, column: str) -> pd.Series:
    """The first row with the largest value of ``column`` (NaN counts as smallest)."""
    values = np.nan_to_num(df[column].to_numpy(dtype=float), nan=-np.inf)
    return df.iloc[int(np.argmax(values))]


def get(row: pd.Series, name: str, default: float = math.nan) -> float:
    if name not in row.index:
        return default
    value = row[name]
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def num(x: float) -> float | str:
    """A float for evidence: 6 significant digits; non-finite values as text ("nan", "inf")."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.6g}")


def evidence(row: pd.Series, metrics: Sequence[str], **extra: float | int | str) -> Evidence:
    """Evidence from the metrics of one wide row (those present and not NaN) plus ``extra``."""
    ev: Evidence = {}
    for m in metrics:
        value = get(row, m)
        if not math.isnan(value):
            ev[m] = num(value)
    for key, item in extra.items():
        ev[key] = num(item) if isinstance(item, float) else item
    if "rank" in row.index and "rank" not in ev:
        ev["rank"] = int(row["rank"])
    return ev


def pct(x: float) -> str:
    """A share as a percentage, never 'nan%': 'n/a' for non-finite values."""
    return f"{x:.0%}" if math.isfinite(x) else "n/a"


def fmt(x: float, spec: str = ".2f") -> str:
    """A number for a message; 'n/a' for non-finite values (never 'nan' or 'inf')."""
    return format(x, spec) if math.isfinite(x) else "n/a"
