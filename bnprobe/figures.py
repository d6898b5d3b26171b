"""Figures where a picture reads better than numbers, drawn from the SPEC table.

Owns: the drawing of figures (plain ``matplotlib.figure.Figure`` objects) from a table. May import
numpy, pandas and :mod:`bnprobe.store`; never Lightning, torch or TensorBoard (writing a figure
to TensorBoard is the TensorBoard module's job).

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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bnprobe import store

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GAP_METRICS: tuple[str, ...] = ("local_gap", "output_gap")
_MAX_LAYER_LABELS = 60
_MAX_STEP_LABELS = 10

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
    ax.set_yticks(ticks, [layers[i] for i in ticks], fontsize=9)


def shift_heatmap(df: pd.DataFrame, stage: str = "train", metric: str = "mean_shift") -> Figure:
    """A layers x steps heatmap of one metric (default: ``mean_shift``, mean |d| per layer).

    Rows are layers in the order they were logged, columns the logged steps (unevenly spaced
    steps get equal width; tick labels give the step). NaN and inf cells are grey. The colour
    scale starts at 0 (or at the smallest value if it is negative).
    """
    from matplotlib.figure import Figure

    rows = _aggregates(df)
    rows = rows[(rows["stage"] == stage) & (rows["metric"] == metric)]
    if rows.empty:
        raise ValueError(
            f"no layer aggregates of stage {stage!r}, metric {metric!r} to draw; "
            f"stages present: {sorted(df['stage'].unique())}"
        )
    layers = _layer_order(rows["layer"])
    rows = rows.drop_duplicates(["layer", "step"], keep="last")
    grid = rows.pivot(index="layer", columns="step", values="value").reindex(layers)
    steps = [int(s) for s in grid.columns]
    values = np.ma.masked_invalid(grid.to_numpy(dtype=np.float64))
    finite = values.compressed()
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0

    import matplotlib

    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.75")
    height = min(2.0 + 0.22 * len(layers), 16.0)
    fig = Figure(figsize=(9.0, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        values, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax
    )
    every = max(1, -(-len(steps) // _MAX_STEP_LABELS))
    ticks = list(range(0, len(steps), every))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=9)
    _label_layers(ax, layers)
    ax.set_xlabel("step")
    ax.set_title(f"{stage} {metric} per layer and step ({len(layers)} layers)")
    fig.colorbar(image, ax=ax, label=metric, shrink=0.9)
    return fig


def gap_bars(df: pd.DataFrame) -> Figure:
    """Bars of the latest probe's ``local_gap`` and ``output_gap`` for every layer.

    gap = ‖y_train − y_eval‖ / ‖y_train‖: ``local_gap`` for the layer alone on the same input,
    ``output_gap`` at its output with the whole model switched. The title adds the whole-model
    ``logits_gap`` and ``pred_agreement`` when they were measured at that step. A NaN or
    infinite gap (a model that produced NaN) gets no bar but its value written in its place;
    the axis is scaled to the finite values.
    """
    from matplotlib.figure import Figure

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

    height = min(2.0 + 0.28 * len(layers), 16.0)
    fig = Figure(figsize=(9.0, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(layers), dtype=np.float64)
    width = 0.4
    colors = {"local_gap": "#4c72b0", "output_gap": "#dd8452"}
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
    right = top * 1.15 if top > 0 else 1.0
    for i, metric in enumerate(GAP_METRICS):
        vals = values[:, i]
        ok = finite[:, i]
        pos = y + (i - 0.5) * width
        ax.barh(pos, np.where(ok, vals, 0.0), height=width, color=colors[metric], label=metric)
        # NaN and inf are written where the bar would start: a bar cannot show them, and
        # drawing inf (or nan_to_num's 1.8e308) overflows matplotlib's transforms.
        for where, value, measured in zip(pos[~ok], vals[~ok], present[~ok, i], strict=True):
            text = _nonfinite_text(float(value)) if measured else "not measured"
            ax.text(0.0, where, f" {text}", va="center", fontsize=8, color=colors[metric])
    ax.set_xlim(0.0, right)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top
    _label_layers(ax, layers)
    ax.set_xlabel("relative gap ‖y_train − y_eval‖ / ‖y_train‖")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
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
    ax.set_title(title)
    return fig


def _nonfinite_text(value: float) -> str:
    if np.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"
