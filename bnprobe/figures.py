"""Figures where a picture reads better than numbers, drawn from the SPEC table, and the
colour scale they share with the BatchNorm tab.

Owns: the drawing of figures (plain ``matplotlib.figure.Figure`` objects) from a table; the
fixed, threshold-tied colour scale (:func:`limit`, :func:`scale_colours`: healthy, borderline
and past the diagnosis threshold are three bands, the same in every run and model); the bounded
rows an epoch-end figure reads (:class:`FigureRows`). May import numpy, pandas,
:mod:`bnprobe.store` and the diagnosis thresholds; never Lightning, torch or TensorBoard
(writing a figure to TensorBoard is the TensorBoard module's job).

matplotlib is optional (``pip install bnprobe[figures]``): it is imported only inside the
functions that draw, so ``import bnprobe`` works without it and stays fast. Callers ask
:func:`available` first and skip figures when it is False. Figures are drawn with the Agg
canvas: no pyplot, no global state, nothing to close, safe in a training process without a
display.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.diagnosis.thresholds import DEFAULT_THRESHOLDS, Thresholds

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GAP_METRICS: tuple[str, ...] = ("local_gap", "output_gap")
_MAX_LAYER_LABELS = 32
_MAX_STEP_LABELS = 8
FONT_SIZE = 11
FIGURE_WIDTH_PX = 640
"""Figures are 640 px wide with 11-point text: the Images dashboard shows them without
shrinking the text below legibility (900 px figures were scaled down to about half)."""

# --------------------------------------------------------------------------- the colour scale

BAND_EDGES: tuple[float, float] = (0.5, 1.0)
"""Where the bands change, as a share of the threshold: healthy below half of it, borderline
from half of it to it, past the threshold above it."""

BAND_NAMES: tuple[str, str, str] = ("healthy", "borderline", "past the threshold")

SCALE_TOP = 2.0
"""The scale saturates at twice the threshold (darkest red)."""

SCALE_STOPS: tuple[tuple[float, str, str], ...] = (
    # (share of the threshold, colour just above, colour just below the next stop)
    (0.0, "#eaf5ea", "#8cc98f"),
    (0.5, "#ffe7a3", "#f5a13c"),
    (1.0, "#e0443a", "#6b0d0d"),
)
"""The fixed colour scale, the same in the tab and in the figures: each band a ramp of its own
hue (green, amber, red), with a jump at each band edge so that the three bands read apart."""

NO_THRESHOLD = ("#f4f6fb", "#2c4f8c")
"""Metrics without a diagnosis threshold: a blue ramp from 0 to the largest value shown."""

MISSING = "#d9d9d9"


@dataclass(frozen=True)
class Limit:
    """A diagnosis threshold of one metric: ``value``, and whether a measurement is bad
    ``above`` it or ``below`` it; ``name`` is the :class:`Thresholds` field."""

    value: float
    above: bool
    name: str

    def share(self, x: np.ndarray) -> np.ndarray:
        """How far along the scale each value is, as a share of the threshold (1 = at it)."""
        if self.above:
            return x / self.value
        return (1.0 - x) / (1.0 - self.value)  # pred_agreement: the share that changes

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "above": self.above, "name": self.name}


_LIMITS: dict[tuple[str, str], str] = {
    ("train", "mean_shift"): "train_mean_shift_max",
    ("train", "mean_shift_excess"): "train_mean_shift_max",
    ("train", "var_shift"): "train_var_shift_max",
    ("train", "var_shift_excess"): "train_var_shift_max",
    ("val", "mean_shift"): "val_mean_shift_max",
    ("val", "mean_shift_excess"): "val_mean_shift_max",
    ("val", "var_shift"): "val_var_shift_max",
    ("val", "var_shift_excess"): "val_var_shift_max",
    ("val", "kl"): "val_kl_max",
    ("probe", "local_gap"): "local_gap_max",
    ("probe", "output_gap"): "local_gap_max",
    ("probe", "logits_gap"): "logits_gap_max",
    ("probe", "pred_agreement"): "pred_agreement_min",
    ("probe", "recal_pred_change"): "recal_pred_change_max",
    ("train", "gamma_small_frac"): "dead_channel_frac_max",
    ("train", "var_small_frac"): "var_small_channel_frac",
    ("val", "var_small_frac"): "var_small_channel_frac",
    ("train", "rank_divergence"): "rank_divergence_max",
}
"""Which threshold of the diagnosis a metric is judged by (``output_gap`` by the ``local_gap``
one: the same relative gap, measured at the output)."""


def limit(stage: str, metric: str, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Limit | None:
    """The diagnosis threshold ``metric`` is coloured by in ``stage``, None when it has none."""
    name = _LIMITS.get((stage, metric))
    if name is None:
        return None
    return Limit(float(getattr(thresholds, name)), not name.endswith("_min"), name)


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def scale_colours(share: np.ndarray) -> np.ndarray:
    """RGB (0..255, float) of each share of the threshold on the fixed scale; NaN -> grey."""
    share = np.asarray(share, dtype=np.float64)
    out = np.empty((*share.shape, 3))
    out[...] = _rgb(MISSING)
    tops = [*(s for s, _, _ in SCALE_STOPS[1:]), SCALE_TOP]
    for (lo, start, end), hi in zip(SCALE_STOPS, tops, strict=True):
        inside = (share >= lo) & (share < hi) if hi < SCALE_TOP else share >= lo
        if lo == 0.0:
            inside |= share < 0
        k = np.clip((share[inside] - lo) / (hi - lo), 0.0, 1.0)[:, None]
        out[inside] = _rgb(start) * (1 - k) + _rgb(end) * k
    return out


def scale_spec(thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """The scale as the frontend takes it (one source for both)."""
    return {
        "edges": list(BAND_EDGES),
        "top": SCALE_TOP,
        "stops": [list(s) for s in SCALE_STOPS],
        "bands": list(BAND_NAMES),
        "no_threshold": list(NO_THRESHOLD),
        "missing": MISSING,
        "limits": {
            f"{stage}/{metric}": lim.to_dict()
            for stage, metric in _LIMITS
            if (lim := limit(stage, metric, thresholds)) is not None
        },
    }


FIGURE_STEPS = 120
"""The most steps (columns) an epoch-end heatmap draws: what it reads and draws is the same
at epoch 1 and at epoch 100."""


def downsample_steps(steps: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` of the sorted distinct ``steps``, evenly spread, first and last kept:
    what an epoch-end figure draws, whatever the number of epochs."""
    distinct = np.unique(steps)
    if len(distinct) <= most:
        return distinct
    pick = np.unique(np.round(np.linspace(0, len(distinct) - 1, most)).astype(np.int64))
    return distinct[pick]


INSTALL_HINT = "pip install 'bnprobe[figures]'"
"""How to get figures when :func:`available` is False."""


@functools.cache
def available() -> bool:
    """Whether figures can be drawn: matplotlib (the ``figures`` extra) imports.

    Imports the two matplotlib modules drawing needs (``matplotlib.figure`` and the Agg
    backend), once per process: a broken installation counts as missing, not only an absent one.
    """
    try:
        for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def _aggregates(df: pd.DataFrame) -> pd.DataFrame:
    """Layer aggregates of rank 0 of a single run."""
    if "run" in df.columns and df["run"].nunique() > 1:
        runs = sorted(df["run"].unique())
        raise ValueError(
            f"the table holds {len(runs)} runs ({runs[:3]}...); draw one at a time: "
            "df[df['run'] == run]"
        )
    keep = df["channel"].isna().to_numpy()
    if "rank" in df.columns:
        keep = keep & (df["rank"] == 0).to_numpy()
    return df[keep]


def has_rows(df: pd.DataFrame, stage: str, metrics: Sequence[str]) -> bool:
    """Whether ``df`` has layer aggregates of ``stage`` for any of ``metrics``."""
    if len(df) == 0:
        return False
    sel = (df["stage"] == stage) & df["metric"].isin(list(metrics)) & df["channel"].isna()
    return bool(sel.any())


def _layer_order(layers: pd.Series) -> list[str]:
    """Layers in first-seen order (``named_modules()`` order when the rows were logged so)."""
    return [str(x) for x in dict.fromkeys(layers.tolist())]


def _label_layers(ax: Axes, layers: list[str]) -> None:
    every = max(1, -(-len(layers) // _MAX_LAYER_LABELS))
    ticks = list(range(0, len(layers), every))
    ax.set_yticks(ticks, [layers[i] for i in ticks], fontsize=FONT_SIZE)


def _figure(n_layers: int, per_layer: float) -> Figure:
    """A figure :data:`FIGURE_WIDTH_PX` wide, as tall as its layers need (within bounds)."""
    from matplotlib.figure import Figure

    height = min(max(3.0, 1.6 + per_layer * n_layers), 9.0)
    return Figure(figsize=(FIGURE_WIDTH_PX / 100, height), dpi=100, layout="constrained")


def scale_colormap(lim: Limit) -> tuple[Any, Any]:
    """The fixed scale of ``lim`` as a matplotlib (colormap, norm) on the metric's own values:
    the bands sit at the same shares of the threshold in every figure."""
    import matplotlib.colors as mcolors

    shares = np.linspace(0.0, SCALE_TOP, 512, endpoint=False) + SCALE_TOP / 1024
    colours = scale_colours(shares) / 255.0
    if lim.above:
        cmap = mcolors.ListedColormap(colours)
        norm = mcolors.Normalize(0.0, SCALE_TOP * lim.value)
    else:  # value = 1 - share * (1 - limit): reversed
        cmap = mcolors.ListedColormap(colours[::-1])
        norm = mcolors.Normalize(1.0 - SCALE_TOP * (1.0 - lim.value), 1.0)
    return cmap.with_extremes(bad=MISSING), norm


def shift_heatmap(
    df: pd.DataFrame,
    stage: str = "train",
    metric: str = "mean_shift",
    *,
    max_steps: int = FIGURE_STEPS,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> Figure:
    """A layers x steps heatmap of one metric (default: ``mean_shift``, mean |d| per layer).

    Rows are layers in the order they were logged, columns the logged steps (at most
    ``max_steps``, evenly spread with the first and last kept; unevenly spaced steps get equal
    width; tick labels give the step). The colours are the fixed scale of the metric's diagnosis
    threshold (:func:`limit`): green below half of it, amber up to it, red past it, darkest at
    twice it, whatever the run; a metric without a threshold gets a blue ramp over its own range.
    NaN and inf cells are grey.
    """
    rows = _aggregates(df)
    rows = rows[(rows["stage"] == stage) & (rows["metric"] == metric)]
    if rows.empty:
        raise ValueError(
            f"no layer aggregates of stage {stage!r}, metric {metric!r} to draw; "
            f"stages present: {sorted(df['stage'].unique())}"
        )
    layers = _layer_order(rows["layer"])
    drawn = downsample_steps(rows["step"].to_numpy(), max_steps)
    rows = rows[rows["step"].isin(drawn)].drop_duplicates(["layer", "step"], keep="last")
    grid = rows.pivot(index="layer", columns="step", values="value").reindex(layers)
    steps = [int(s) for s in grid.columns]
    values = np.ma.masked_invalid(grid.to_numpy(dtype=np.float64))
    lim = limit(stage, metric, thresholds)
    import matplotlib.colors as mcolors

    if lim is not None:
        cmap, norm = scale_colormap(lim)
    else:
        finite = values.compressed()
        vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        cmap = mcolors.LinearSegmentedColormap.from_list("bnprobe", list(NO_THRESHOLD))
        cmap = cmap.with_extremes(bad=MISSING)
        norm = mcolors.Normalize(vmin, vmax if vmax > vmin else vmin + 1.0)

    fig = _figure(len(layers), 0.16)
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    every = max(1, -(-len(steps) // _MAX_STEP_LABELS))
    ticks = list(range(0, len(steps), every))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=FONT_SIZE)
    _label_layers(ax, layers)
    ax.set_xlabel("step", fontsize=FONT_SIZE)
    ax.set_title(f"{stage} {metric} ({len(layers)} layers)", fontsize=FONT_SIZE + 1)
    bar = fig.colorbar(image, ax=ax, shrink=0.9, extend="max" if lim is not None else "neither")
    bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    if lim is not None:
        t = lim.value
        marks = [0.0, 0.5 * t, t, SCALE_TOP * t] if lim.above else [1.0, 1 - 0.5 * (1 - t), t]
        bar.set_ticks(marks, labels=[f"{m:.3g}" for m in marks])
        bar.ax.axhline(t, color="black", linewidth=1.5)
        bar.set_label(f"{metric} (threshold {t:g})", fontsize=FONT_SIZE)
    else:
        bar.set_label(f"{metric} (no threshold)", fontsize=FONT_SIZE)
    return fig


def gap_bars(df: pd.DataFrame, *, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Figure:
    """Bars of the latest probe's ``local_gap`` and ``output_gap`` for every layer, with the
    diagnosis threshold of ``local_gap`` drawn as a dashed line.

    gap = ‖y_train − y_eval‖ / ‖y_train‖: ``local_gap`` for the layer alone on the same input,
    ``output_gap`` at its output with the whole model switched. The title adds the whole-model
    ``logits_gap`` and ``pred_agreement`` when they were measured at that step. A NaN or
    infinite gap (a model that produced NaN) gets no bar but its value written in its place;
    the axis is scaled to the finite values and the threshold.
    """
    rows = _aggregates(df)
    rows = rows[rows["stage"] == "probe"]
    gaps = rows[rows["metric"].isin(list(GAP_METRICS)) & (rows["layer"] != store.MODEL)]
    if gaps.empty:
        raise ValueError(
            f"no probe rows of {' or '.join(GAP_METRICS)} to draw; run the train/eval probe "
            "(BNProbe with a validation loop or probe_batch, or bnprobe.check_mismatch) first"
        )
    step = int(gaps["step"].max())
    latest = gaps[gaps["step"] == step].drop_duplicates(["layer", "metric"], keep="last")
    layers = _layer_order(latest["layer"])
    grid = latest.pivot(index="layer", columns="metric", values="value").reindex(
        index=layers, columns=list(GAP_METRICS)
    )

    fig = _figure(len(layers), 0.22)
    ax = fig.add_subplot()
    y = np.arange(len(layers), dtype=np.float64)
    width = 0.4
    colors = {"local_gap": "#4c72b0", "output_gap": "#8c8c8c"}
    values = grid.to_numpy(dtype=np.float64)
    present = (
        latest.assign(one=1.0)
        .pivot(index="layer", columns="metric", values="one")
        .reindex(index=layers, columns=list(GAP_METRICS))
        .notna()
        .to_numpy()
    )
    finite = np.isfinite(values)
    top = float(values[finite].max()) if finite.any() else 0.0
    line = limit("probe", "local_gap", thresholds)
    threshold = line.value if line is not None else 0.0
    right = max(top, threshold) * 1.15 if max(top, threshold) > 0 else 1.0
    for i, metric in enumerate(GAP_METRICS):
        vals = values[:, i]
        ok = finite[:, i]
        pos = y + (i - 0.5) * width
        ax.barh(pos, np.where(ok, vals, 0.0), height=width, color=colors[metric], label=metric)
        # NaN and inf are written where the bar would start: a bar cannot show them, and
        # drawing inf (or nan_to_num's 1.8e308) overflows matplotlib's transforms.
        for where, value, measured in zip(pos[~ok], vals[~ok], present[~ok, i], strict=True):
            text = _nonfinite_text(float(value)) if measured else "not measured"
            ax.text(0.0, where, f" {text}", va="center", fontsize=FONT_SIZE - 1,
                    color=colors[metric])  # fmt: skip
    if line is not None:
        ax.axvline(
            threshold, color=SCALE_STOPS[2][1], linestyle="--", linewidth=1.5,
            label=f"threshold {threshold:g}",
        )  # fmt: skip
    ax.set_xlim(0.0, right)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top
    _label_layers(ax, layers)
    ax.tick_params(axis="x", labelsize=FONT_SIZE)
    ax.set_xlabel("relative gap ‖y_train − y_eval‖ / ‖y_train‖", fontsize=FONT_SIZE)
    ax.legend(loc="lower right", fontsize=FONT_SIZE - 1, framealpha=0.9)
    ax.grid(axis="x", alpha=0.3)
    title = f"train/eval gap per layer, probe at step {step}"
    model = rows[(rows["layer"] == store.MODEL) & (rows["step"] == step)]
    extras = [
        f"{m} {float(model.loc[model['metric'] == m, 'value'].iloc[-1]):.3g}"
        for m in ("logits_gap", "pred_agreement")
        if (model["metric"] == m).any()
    ]
    if extras:
        title += "\n" + ", ".join(extras)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    return fig


class FigureRows:
    """The rows the epoch-end figures draw, kept bounded whatever the length of the run.

    :meth:`add` takes the rows recorded since the last call (figure metrics only) and keeps the
    layer aggregates of rank 0 of at most ``max_steps`` steps per stage for the heatmaps (evenly
    spread, first and last kept) and of the latest probe step for the gap chart. So a figure
    reads and draws the same amount at epoch 1 and at epoch 100.
    """

    def __init__(self, max_steps: int = FIGURE_STEPS) -> None:
        self.max_steps = max_steps
        self.rows = store.empty_frame()
        self.last_step: dict[str, int] = {}
        """Per stage, the last step taken in: rows up to it are not new."""

    def new(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``df`` after each stage's last step taken in."""
        if not self.last_step or df.empty:
            return df
        last = df["stage"].map(self.last_step).fillna(-np.inf).to_numpy()
        return df[df["step"].to_numpy() > last]

    def add(self, df: pd.DataFrame) -> pd.DataFrame:
        """Take in new rows; return what the figures draw now."""
        df = self.new(df)
        if not df.empty:
            agg = _aggregates(df)
            for stage, step in agg.groupby("stage", sort=False)["step"].max().items():
                self.last_step[str(stage)] = max(int(step), self.last_step.get(str(stage), -1))
            kept = store.concat([self.rows, agg]) if len(self.rows) else agg
            parts = []
            for stage, part in kept.groupby("stage", sort=False):
                if stage == "probe":
                    parts.append(part[part["step"] == part["step"].max()])
                else:
                    steps = downsample_steps(part["step"].to_numpy(), self.max_steps)
                    parts.append(part[part["step"].isin(steps)])
            self.rows = store.concat(parts) if parts else store.empty_frame()
        return self.rows


def _nonfinite_text(value: float) -> str:
    if np.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"
