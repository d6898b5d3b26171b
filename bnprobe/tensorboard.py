"""TensorBoard: the tag scheme, the Custom Scalars layout, histograms, figures, and reading
event files back into the SPEC table.

Tags (one run = one folder of event files)::

    bnprobe/<stage>/<metric>/<layer>      scalar: a layer aggregate (channel NA, rank 0)
    bnprobe/<stage>/epoch                 scalar: the trainer epoch of that stage at that step
    bnprobe/<stage>/hist/<name>/<layer>   histogram of a per-channel vector (gamma, beta, d, v)
    bnprobe/<stage>/figure/<name>         image: a matplotlib figure (see bnprobe.figures)
    custom_scalars__config__              the Custom Scalars layout (:func:`write_layout`)

The tag root is ``bnprobe``, or ``<prefix>-bnprobe`` for a Lightning logger made with
``prefix=...`` (what its ``log_metrics`` turns ``bnprobe/...`` keys into): scalars, histograms,
figures and the layout's regexes all use the same root (:func:`tag_root`), and the reader
accepts any root that ends in ``bnprobe`` after a separator.

``<layer>`` is the qualified name from ``named_modules()``, written as is, except the
whole-model layer ``<model>``, which is spelled ``_model_`` (what tag sanitizers such as
tensorboardX's turn it into anyway, and safe in URLs and regexes). A module literally named
``_model_``, ``_model__``, ... gets one more trailing underscore, so the mapping is one to one
and :func:`parse_tag` inverts :func:`scalar_tag` exactly. Per-channel rows are never logged
as scalars; their distribution goes into the histograms.

Nothing here imports Lightning: the callback passes ``trainer.logger.experiment`` (a
``torch.utils.tensorboard.SummaryWriter``), and a plain PyTorch loop can pass its own writer.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from bnprobe import store

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

PREFIX = "bnprobe"
MODEL_TAG = "_model_"
"""How the whole-model layer ``store.MODEL`` (``<model>``) is spelled in tags."""

HIST_BINS = 30
"""Equal-width bins per histogram: about 0.6 KB per histogram instead of about 9 KB with
torch's default exponential binning (docs/tensorboard.md has the measurement). TensorBoard's
own ``tensorboard.summary.histogram`` defaults to 30 buckets as well."""

HIST_NAMES: tuple[str, ...] = ("gamma", "beta", "d", "v")

_SHIFTS_FIRST = tuple(m for m in store.SHIFT_METRICS if "shift" in m or m.startswith("kl"))
_SHIFTS_FIRST += ("outlier_frac",)  # what a user looks at first, then the raw moments
_MOMENTS = (*store.MOMENT_METRICS, "running_mean", "running_var")
_DATA = (*_SHIFTS_FIRST, *_MOMENTS, "samples_per_channel", *store.COUNT_METRICS)
METRICS_BY_STAGE: dict[str, tuple[str, ...]] = {
    "train": (*_DATA, *store.AFFINE_METRICS, "rank_divergence"),
    "val": _DATA,
    "probe": store.PROBE_METRICS,
    "recalibrate": store.RECALIBRATE_METRICS,
}
"""Charts of the Custom Scalars layout, in order, per stage (one multiline chart each)."""

_RESERVED_METRICS = ("hist", "figure", "epoch")
_MODEL_ESCAPED = re.compile(r"_model_+")
_ROOT = re.compile(rf"(?:.*[\W_])?{PREFIX}")
"""A tag root: ``bnprobe``, or it with a logger's prefix and a separator before it."""


def tag_root(prefix: str = "", join: str = "-") -> str:
    """The root of every bnprobe tag written through a logger with this ``prefix``:
    ``bnprobe``, or ``<prefix><join>bnprobe`` (Lightning's ``LOGGER_JOIN_CHAR`` is ``-``)."""
    return f"{prefix}{join}{PREFIX}" if prefix else PREFIX


class Tag(NamedTuple):
    """The parts of a scalar tag ``bnprobe/<stage>/<metric>/<layer>``."""

    stage: str
    metric: str
    layer: str


# --------------------------------------------------------------------------- tags


def _check_part(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{what} must be a non-empty string without '/', got {value!r}")


def _layer_to_tag(layer: str) -> str:
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty string, got {layer!r}")
    if layer == store.MODEL:
        return MODEL_TAG
    if _MODEL_ESCAPED.fullmatch(layer):
        return layer + "_"
    return layer


def _layer_from_tag(part: str) -> str:
    if part == MODEL_TAG:
        return store.MODEL
    if _MODEL_ESCAPED.fullmatch(part):
        return part[:-1]
    return part


@lru_cache(maxsize=1 << 16)
def scalar_tag(stage: str, metric: str, layer: str) -> str:
    """The TensorBoard tag of a layer aggregate: ``bnprobe/<stage>/<metric>/<layer>``.

    Cached: a logging step builds one tag per layer and metric, the same ones every time."""
    _check_part("stage", stage)
    _check_part("metric", metric)
    if metric in _RESERVED_METRICS:
        raise ValueError(
            f"metric {metric!r} is reserved in the tag scheme ({', '.join(_RESERVED_METRICS)}); "
            "rename the metric"
        )
    return f"{PREFIX}/{stage}/{metric}/{_layer_to_tag(layer)}"


@lru_cache(maxsize=1 << 10)
def epoch_tag(stage: str) -> str:
    """The tag of the per-step epoch scalar of a stage: ``bnprobe/<stage>/epoch``."""
    _check_part("stage", stage)
    return f"{PREFIX}/{stage}/epoch"


def hist_tag(stage: str, name: str, layer: str, root: str = PREFIX) -> str:
    """The tag of a per-channel histogram: ``<root>/<stage>/hist/<name>/<layer>``."""
    _check_part("stage", stage)
    _check_part("histogram name", name)
    return f"{root}/{stage}/hist/{name}/{_layer_to_tag(layer)}"


def figure_tag(stage: str, name: str, root: str = PREFIX) -> str:
    """The tag of a figure image: ``<root>/<stage>/figure/<name>``."""
    _check_part("stage", stage)
    _check_part("figure name", name)
    return f"{root}/{stage}/figure/{name}"


def _after_root(tag: str) -> list[str] | None:
    """The parts of ``tag`` after its root (the first leading parts that make a root: a
    logger's prefix may hold '/'), or None when no root starts it."""
    if PREFIX not in tag:
        return None
    parts = tag.split("/")
    for i in range(len(parts)):
        if parts[i].endswith(PREFIX) and _ROOT.fullmatch("/".join(parts[: i + 1])):
            return parts[i + 1 :]
    return None


def _match_scalar(tag: str) -> Tag | None:
    rest = _after_root(tag)
    if rest is None or len(rest) < 3:
        return None
    stage, metric, layer = rest[0], rest[1], "/".join(rest[2:])
    if not (stage and metric and layer):
        return None
    if metric in _RESERVED_METRICS:
        return None
    return Tag(stage, metric, _layer_from_tag(layer))


def parse_tag(tag: str) -> Tag:
    """Invert :func:`scalar_tag`: ``parse_tag(scalar_tag(s, m, l)) == (s, m, l)``; the same
    for a tag written through a logger with a prefix (``<prefix>-bnprobe/...``).

    Raises ValueError for any other tag (histograms, figures, the epoch scalar, foreign tags).
    """
    parsed = _match_scalar(tag)
    if parsed is None:
        raise ValueError(
            f"{tag!r} is not a bnprobe scalar tag; expected '{PREFIX}/<stage>/<metric>/<layer>'"
        )
    return parsed


def scalar_metrics(rows: pd.DataFrame) -> dict[int, dict[str, float]]:
    """Turn table rows into ``{step: {tag: value}}`` for ``logger.log_metrics(d, step=step)``.

    Keeps the layer aggregates of rank 0 (channel NA), and adds ``bnprobe/<stage>/epoch`` for
    every (stage, step) so that :func:`read_tensorboard` recovers the epoch column. Where a
    key occurs twice, the later row wins.
    """
    agg = rows[rows["channel"].isna().to_numpy() & (rows["rank"] == 0).to_numpy()]
    out: dict[int, dict[str, float]] = {}
    cols = zip(
        agg["step"].tolist(),
        agg["epoch"].tolist(),
        agg["stage"].tolist(),
        agg["metric"].tolist(),
        agg["layer"].tolist(),
        agg["value"].tolist(),
        strict=True,
    )
    for step, epoch, stage, metric, layer, value in cols:
        d = out.setdefault(int(step), {})
        d[epoch_tag(stage)] = float(epoch)
        d[scalar_tag(stage, metric, layer)] = float(value)
    return out


# --------------------------------------------------------------------------- writing

_LAYOUT_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


def layout(
    stages: Sequence[str] = ("train", "val", "probe"),
    metrics_by_stage: Mapping[str, Sequence[str]] | None = None,
    root: str = PREFIX,
) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout as ``SummaryWriter.add_custom_scalars`` takes it.

    One category ``<root>/<stage>`` per stage; in it one multiline chart per metric whose
    regex ``^<root>/<stage>/<metric>/`` matches that metric's tag for every layer, so all
    layers overlay in one chart. ``root``: :func:`tag_root` of the logger's prefix.
    """
    chosen = METRICS_BY_STAGE if metrics_by_stage is None else metrics_by_stage
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
        out[f"{root}/{stage}"] = charts
    return out


def write_layout(
    writer: SummaryWriter,
    stages: Sequence[str] = ("train", "val", "probe"),
    metrics_by_stage: Mapping[str, Sequence[str]] | None = None,
    root: str = PREFIX,
) -> bool:
    """Write the Custom Scalars layout (see :func:`layout`) once per writer.

    Returns True when it wrote the layout, False when this writer already has it (a second
    call is a no-op; TensorBoard merges identical layouts of several runs into one).
    """
    spec = layout(stages, metrics_by_stage, root)
    if writer in _LAYOUT_WRITTEN:
        return False
    writer.add_custom_scalars(spec)
    _LAYOUT_WRITTEN.add(writer)
    return True


def _as_numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    detach = getattr(values, "detach", None)
    if detach is not None:  # a torch tensor: one copy to the host, as float64
        values = detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def add_histograms(
    writer: SummaryWriter,
    stage: str,
    layer: str,
    step: int,
    values: Mapping[str, torch.Tensor | np.ndarray | Sequence[float]],
    root: str = PREFIX,
) -> list[str]:
    """Log one histogram per per-channel vector (gamma, beta, d, v) of one layer.

    Uses :data:`HIST_BINS` equal-width bins between the smallest and largest finite value.
    NaN and inf are left out (the ``nonfinite`` metric counts them); a vector with no finite
    value is skipped. Returns the tags written.
    """
    tags: list[str] = []
    for name, vec in values.items():
        arr = _as_numpy(vec)
        arr = arr[np.isfinite(arr)]
        tag = hist_tag(stage, name, layer, root)
        if arr.size == 0:
            continue
        writer.add_histogram(tag, arr, global_step=int(step), bins=HIST_BINS)
        tags.append(tag)
    return tags


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


# --------------------------------------------------------------------------- reading


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
