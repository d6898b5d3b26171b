"""One run's table as the rules read it: wide per-stage views and small shared helpers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.diagnosis.findings import Evidence
from bnprobe.diagnosis.thresholds import DEFAULT_EPS, DEFAULT_MOMENTUM, Thresholds


class Run:
    """One run's table with wide per-stage views (rank, layer, step) x metric."""

    def __init__(self, df: pd.DataFrame, thresholds: Thresholds) -> None:
        self.df = df
        self.th = thresholds
        self.order = {layer: i for i, layer in enumerate(layer_order(df))}
        self._wide: dict[str, pd.DataFrame] = {}
        train = self.wide("train")
        self.momentum: dict[str, float] = {}
        self.eval_only: set[str] = set()
        self.eps: dict[str, float] = {}
        for layer, g in train.groupby("layer", sort=False):
            name = str(layer)
            # rows where the layer ran; there a NaN momentum means momentum=None
            ran = col(g, "train_mode").notna() if "train_mode" in g else col(g, "momentum").notna()
            if "momentum" in g and ran.any():
                self.momentum[name] = float(g.loc[ran, "momentum"].iloc[-1])
            mode = col(g, "train_mode").dropna()
            if len(mode) and float(mode.iloc[-1]) == 0.0:
                self.eval_only.add(name)
            eps = col(g, "eps").dropna()
            self.eps[name] = float(eps.iloc[-1]) if len(eps) else DEFAULT_EPS

    def wide(self, stage: str) -> pd.DataFrame:
        """Layer-aggregate rows of ``stage`` as columns step, rank, layer, <metric>..."""
        if stage not in self._wide:
            self._wide[stage] = pivot(self.df, stage)
        return self._wide[stage]

    def channels(self, stage: str, metric: str) -> pd.DataFrame:
        """Per-channel rows of one metric: columns step, rank, layer, channel, value."""
        d = self.df
        sel = (d["stage"] == stage) & (d["metric"] == metric) & d["channel"].notna()
        return d.loc[sel, ["step", "rank", "layer", "channel", "value"]]

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
        updates = col(df, "num_batches_tracked").to_numpy(dtype=float)
        static = self.static
        out = np.empty(len(df), dtype=float)
        for i, (la, s) in enumerate(zip(df["layer"], df["step"], strict=True)):
            if str(la) in static:
                out[i] = 0.0
            elif math.isfinite(given[i]):
                out[i] = given[i]
            else:
                out[i] = self.model_residual(str(la), int(s), updates[i])
        return out

    def warm(self, df: pd.DataFrame) -> np.ndarray:
        """Per row: is the layer past its warm-up (residual below the threshold)?"""
        return self.residuals(df) < self.th.warmup_residual

    def unused(self) -> set[str]:
        """Layers with forward_calls == 0 at every logged training step."""
        train = self.wide("train")
        if "forward_calls" not in train:
            return set()
        calls = train.groupby("layer", sort=False)["forward_calls"]
        return {str(k) for k, v in calls.max().items() if v == 0.0}

    def layer_key(self, layer: str) -> int:
        return self.order.get(layer, len(self.order))

    def eps_of(self, df: pd.DataFrame) -> np.ndarray:
        return df["layer"].map(lambda la: self.eps.get(str(la), DEFAULT_EPS)).to_numpy(float)


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


def pivot(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """Layer-aggregate rows of one stage, one row per (rank, layer, step), one column per
    metric, sorted by rank, layer (in table order) and step."""
    sel = df[(df["stage"] == stage) & df["channel"].isna()]
    if not len(sel):
        return pd.DataFrame({"rank": [], "layer": [], "step": []}).astype(
            {"rank": "int64", "layer": object, "step": "int64"}
        )
    sel = sel.drop_duplicates(["rank", "layer", "step", "metric"], keep="last")
    wide = sel.pivot(index=["rank", "layer", "step"], columns="metric", values="value")
    wide.columns = [str(c) for c in wide.columns]
    wide = wide.reset_index()
    order = {la: i for i, la in enumerate(layer_order(sel))}
    wide = wide.assign(_order=wide["layer"].map(order)).sort_values(
        ["rank", "_order", "step"], kind="stable"
    )
    wide = wide.drop(columns="_order").reset_index(drop=True)
    return wide.astype({"rank": "int64", "step": "int64", "layer": object})


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
    ``train_min_steps`` of them); ``df`` sorted by step within each group."""
    return df.groupby(["rank", "layer"], sort=False)[column].transform(
        lambda x: x.rolling(th.train_window, min_periods=th.train_min_steps).median()
    )


def trailing(df: pd.DataFrame, bad: np.ndarray) -> pd.DataFrame:
    """Rows of the unbroken stretch of bad rows that ends at the latest row, per (rank, layer).

    ``df`` is sorted by step within each (rank, layer); a group whose latest row is fine
    contributes nothing.
    """
    keep = np.zeros(len(df), dtype=bool)
    positions = np.arange(len(df))
    for _, idx in df.assign(_pos=positions).groupby(["rank", "layer"], sort=False)["_pos"]:
        pos = idx.to_numpy()
        i = len(pos)
        while i > 0 and bad[pos[i - 1]]:
            i -= 1
        keep[pos[i:]] = True
    return df[keep]


def episodes(bad: pd.DataFrame) -> Iterator[tuple[str, int, pd.Series]]:
    """Per layer of ``bad`` (in table order): (layer, first step, the row with the top score)."""
    for layer, g in bad.groupby("layer", sort=False):
        first = int(g["step"].min())
        worst = top(g, "score") if "score" in g else g.iloc[0]
        yield str(layer), first, worst


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
