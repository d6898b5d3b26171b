"""The TensorBoard dashboards beyond the scalars: the Custom Scalars layout and the figures.

Owns :func:`layout`/:func:`write_layout` (one multiline chart per metric, all layers overlaid) and
:func:`add_figures`/:func:`render` (matplotlib figures as images). Writes only through public
``SummaryWriter`` methods (``add_custom_scalars``, ``add_image``). Imports no Lightning; matplotlib
only inside the figure functions.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bnprobe import metrics
from bnprobe.tensorboard.tags import METRICS_BY_STAGE, PREFIX, _check_part, figure_tag

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

_LAYOUT_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


def default_charts(world_size: int = 1) -> dict[str, tuple[str, ...]]:
    """The charts of every stage that can have data: :data:`METRICS_BY_STAGE` without the
    metrics only a multi-process run records (``rank_divergence``) when ``world_size`` is 1."""
    ddp_only = (
        set() if world_size > 1 else {m.name for m in metrics.CATALOGUE if metrics.DDP in m.needs}
    )
    return {
        stage: tuple(m for m in names if m not in ddp_only)
        for stage, names in METRICS_BY_STAGE.items()
    }


def layout(
    stages: Sequence[str] = ("train", "val", "probe"),
    metrics_by_stage: Mapping[str, Sequence[str]] | None = None,
    root: str = PREFIX,
    *,
    world_size: int = 1,
) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout as ``SummaryWriter.add_custom_scalars`` takes it.

    One category ``<root>/<stage>`` per stage; in it one multiline chart per metric whose
    regex ``^<root>/<stage>/<metric>/`` matches that metric's tag for every layer, so all
    layers overlay in one chart. ``root``: :func:`tag_root` of the logger's prefix. Without
    ``metrics_by_stage``, the charts are :func:`default_charts` of ``world_size``: none that
    can never have data. The BatchNorm tab (:mod:`bnprobe.tensorboard.plugin`) is the view
    for many layers; this layout stays for users who want the raw curves.
    """
    chosen = default_charts(world_size) if metrics_by_stage is None else metrics_by_stage
    if isinstance(stages, str):
        raise ValueError(f"stages must be a sequence of stage names, got the string {stages!r}")
    out: dict[str, dict[str, list[Any]]] = {}
    for stage in stages:
        _check_part("stage", stage)
        if stage not in chosen:
            raise ValueError(
                f"no metrics for stage {stage!r} in metrics_by_stage "
                f"(it has {sorted(chosen)}); add them or drop the stage"
            )
        charts: dict[str, list[Any]] = {}
        for metric in chosen[stage]:
            _check_part("metric", metric)
            regex = "^" + re.escape(f"{root}/{stage}/{metric}/")
            charts[metric] = ["Multiline", [regex]]
        if charts:
            out[f"{root}/{stage}"] = charts
    return out


def write_layout(
    writer: SummaryWriter,
    stages: Sequence[str] = ("train", "val", "probe"),
    metrics_by_stage: Mapping[str, Sequence[str]] | None = None,
    root: str = PREFIX,
    *,
    world_size: int = 1,
) -> bool:
    """Write the Custom Scalars layout (see :func:`layout`) once per writer.

    Returns True when it wrote the layout, False when this writer already has it (a second
    call is a no-op; TensorBoard merges identical layouts of several runs into one).
    """
    spec = layout(stages, metrics_by_stage, root, world_size=world_size)
    if writer in _LAYOUT_WRITTEN:
        return False
    writer.add_custom_scalars(spec)
    _LAYOUT_WRITTEN.add(writer)
    return True


def render(fig: Figure) -> np.ndarray:
    """Draw a figure with the Agg canvas; return its pixels as an HxWx3 uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call]
    rgba = canvas.buffer_rgba()  # type: ignore[no-untyped-call]
    return np.asarray(rgba)[:, :, :3].copy()


FIGURE_METRICS: tuple[str, ...] = (
    "mean_shift", "local_gap", "output_gap", "logits_gap", "pred_agreement"
)  # fmt: skip
"""The metrics :func:`add_figures` draws (the whole-model two go into the gap chart's title)."""


def add_figures(
    writer: SummaryWriter, df: pd.DataFrame, step: int, root: str = PREFIX
) -> list[str]:
    """Log the figures for which ``df`` has data, as images at ``step``; return their tags
    (under ``root``, :func:`tag_root`).

    - ``bnprobe/train/figure/mean_shift`` and ``bnprobe/val/figure/mean_shift``: layers x steps
      heatmaps of ``mean_shift`` (:func:`bnprobe.figures.shift_heatmap`);
    - ``bnprobe/probe/figure/gaps``: the latest probe's ``local_gap`` and ``output_gap`` per
      layer (:func:`bnprobe.figures.gap_bars`).

    A figure without rows is skipped silently. Figures are drawn with Agg, never pyplot.
    """
    from bnprobe import figures

    agg = df[df["channel"].isna().to_numpy()]
    drawn: list[tuple[str, Figure]] = []
    for stage in ("train", "val"):
        if figures.has_rows(agg, stage, ("mean_shift",)):
            heatmap = figures.shift_heatmap(agg, stage)
            drawn.append((figure_tag(stage, "mean_shift", root), heatmap))
    if figures.has_rows(agg, "probe", figures.GAP_METRICS):
        drawn.append((figure_tag("probe", "gaps", root), figures.gap_bars(agg)))
    for tag, fig in drawn:
        writer.add_image(tag, render(fig), global_step=int(step), dataformats="HWC")
    return [tag for tag, _ in drawn]
