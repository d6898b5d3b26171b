"""The ``TBPlugin`` of the BatchNorm tab and its routes (under ``/data/plugin/batchnorm/``).

Routes (JSON unless said otherwise; every one validates its query and answers 400 on bad input,
404 for an unknown run or series):

- ``index.js``, ``host.js``, ``style.css``: the frontend (package data, no build step).
- ``runs``: ``{runs: [{run, stages: {stage: [metric]}, layers, store}], scale}``: the runs with
  bnprobe scalars, and the fixed colour scale (:func:`bnprobe.figures.scale_spec`).
- ``findings?run=``: ``bnprobe.diagnose`` on the run's store (cached per state of the store).
- ``heatmap?run=&stage=&metric=[&cols=]``: layers (model order) x columns of logged steps.
- ``layer?run=&layer=``: the layer's curves of every stage, with their thresholds.
- ``channels?run=&layer=&stage=``: the latest per-channel rows of the layer from the store.

Scalars are read through TensorBoard's data provider (fast loader or ``--load_fast=false``);
with the Python loader the multiplexer's records are read directly, because the provider's
``read_scalars`` converts every datum with ``make_ndarray`` (about 17 times slower).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard import context as tb_context
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from bnprobe import figures
from bnprobe.tensorboard.plugin import data

PLUGIN_NAME = "batchnorm"
SCALARS = "scalars"
"""The plugin name under which ``SummaryWriter.add_scalar`` data is listed."""
DOWNSAMPLE = 100_000
"""Points per series asked of the provider: everything its loader kept (1000 by default)."""
MAX_COLS = 2000

_STATIC = Path(__file__).parent / "static"
_FILES = {"/index.js": "text/javascript", "/host.js": "text/javascript", "/style.css": "text/css"}
_LAYER_METRICS: dict[str, tuple[str, ...]] = {
    "train": (
        "batch_mean", "running_mean", "batch_var", "running_var", "mean_shift",
        "mean_shift_excess", "var_shift", "var_shift_excess", "gamma_drift", "beta_drift",
    ),
    "val": (
        "batch_mean", "running_mean", "batch_var", "running_var", "mean_shift",
        "mean_shift_excess", "var_shift", "var_shift_excess", "kl",
    ),
    "probe": ("local_gap", "output_gap"),
}  # fmt: skip
"""What a layer's detail view draws."""
_CHANNEL_METRICS = ("batch_mean", "running_mean", "batch_var", "running_var", "gamma", "beta")

Series = tuple[np.ndarray, np.ndarray]
WSGIApp = Callable[..., Any]


class BatchNormPlugin(base_plugin.TBPlugin):  # type: ignore[misc]
    """The "BatchNorm" tab (module docstring)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        logdir = context.logdir or ""
        # The store is read from a local logdir only (not gs://, not --logdir_spec).
        self._logdir = Path(logdir) if logdir and "://" not in logdir else None
        self._mux = context.multiplexer  # only with --load_fast=false
        self._active = False
        self._findings = data.FindingsCache()
        self._orders: dict[Path, tuple[Any, list[str]]] = {}
        self._lock = threading.Lock()

    # -- TBPlugin --------------------------------------------------------------------------------
    def get_plugin_apps(self) -> dict[str, WSGIApp]:
        apps: dict[str, WSGIApp] = {path: self._serve_static for path in _FILES}
        apps.update(
            {
                "/runs": self._serve_runs,
                "/findings": self._serve_findings,
                "/heatmap": self._serve_heatmap,
                "/layer": self._serve_layer,
                "/channels": self._serve_channels,
            }
        )
        return apps

    def data_plugin_names(self) -> tuple[str, ...]:
        # "scalars" would light the tab for any logdir with a scalar: is_active decides.
        return ()

    def is_active(self) -> bool:
        """Whether the logdir holds bnprobe scalars (or a bnprobe store); a True is kept."""
        if self._active or self._provider is None:
            return self._active
        ctx = tb_context.RequestContext()
        listed = self._provider.list_scalars(ctx, experiment_id="", plugin_name=SCALARS)
        self._active = any(data.parse(t) for tags in listed.values() for t in tags)
        if not self._active and self._logdir is not None and self._logdir.is_dir():
            self._active = next(self._logdir.rglob("part-*.parquet"), None) is not None
        return self._active

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="BatchNorm")

    # -- reading ---------------------------------------------------------------------------------
    def _tags(self, request: Any, run: str | None = None) -> dict[str, dict[str, Any]]:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        filt = provider.RunTagFilter(runs=[run]) if run is not None else None
        listed: dict[str, dict[str, Any]] = self._provider.list_scalars(
            ctx, experiment_id=eid, plugin_name=SCALARS, run_tag_filter=filt
        )
        return listed

    def _read(self, request: Any, run: str, tags: list[str]) -> dict[str, Series]:
        """``{tag: (steps, values)}`` of one run."""
        eid = plugin_util.experiment_id(request.environ)
        out: dict[str, Series] = {}
        if self._mux is not None and not eid:
            for tag in tags:
                events = self._mux.Tensors(run, tag)
                steps = np.fromiter((e.step for e in events), np.int64, len(events))
                values = np.fromiter((_value(e.tensor_proto) for e in events), float, len(events))
                out[tag] = (steps, values)
            return out
        ctx = plugin_util.context(request.environ)
        got = self._provider.read_scalars(
            ctx,
            experiment_id=eid,
            plugin_name=SCALARS,
            downsample=DOWNSAMPLE,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})
        for tag, points in got.items():
            steps = np.fromiter((p.step for p in points), np.int64, len(points))
            values = np.fromiter((p.value for p in points), float, len(points))
            out[tag] = (steps, values)
        return out

    def _run_dir(self, run: str) -> Path | None:
        if self._logdir is None:
            return None
        path = (self._logdir / run).resolve()
        root = self._logdir.resolve()
        if path != root and root not in path.parents:
            raise errors.InvalidArgumentError(f"run {run!r} is outside the logdir")
        return path

    def _model_order(self, run: str) -> list[str]:
        run_dir = self._run_dir(run)
        if run_dir is None:
            return []
        parts = data.store_parts(run_dir)
        key = data.signature(parts[:1])
        with self._lock:
            hit = self._orders.get(run_dir)
            if hit is not None and hit[0] == key:
                return hit[1]
        order = data.model_order(parts)
        with self._lock:
            self._orders[run_dir] = (key, order)
        return order

    # -- routes ----------------------------------------------------------------------------------
    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        name = request.path.rsplit("/", 1)[-1]
        kind = _FILES.get(f"/{name}")
        if kind is None:
            raise errors.NotFoundError(f"no file {name!r}")
        body = (_STATIC / name).read_bytes()
        response: wrappers.Response = http_util.Respond(request, body, kind)
        return response

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        runs = []
        for run, tags in sorted(self._tags(request).items()):
            stages: dict[str, set[str]] = {}
            layers: set[str] = set()
            for tag in tags:
                parsed = data.parse(tag)
                if parsed is not None:
                    stages.setdefault(parsed.stage, set()).add(parsed.metric)
                    layers.add(parsed.layer)
            if not stages:
                continue
            run_dir = self._run_dir(run)
            runs.append(
                {
                    "run": run,
                    "stages": {s: _chart_order(s, ms) for s, ms in sorted(stages.items())},
                    "layers": len(layers - {"<model>"}),
                    "store": run_dir is not None and bool(data.store_parts(run_dir)),
                }
            )
        return _json(request, {"runs": runs, "scale": figures.scale_spec()})

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_findings(self, request: wrappers.Request) -> wrappers.Response:
        run = _arg(request, "run")
        run_dir = self._run_dir(run)
        t0 = time.perf_counter()
        found = self._findings.get(run_dir) if run_dir is not None else None
        ms = round((time.perf_counter() - t0) * 1e3, 1)
        return _json(request, {"run": run, "findings": found, "timing_ms": ms})

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_heatmap(self, request: wrappers.Request) -> wrappers.Response:
        t0 = time.perf_counter()
        run, stage, metric = (_arg(request, k) for k in ("run", "stage", "metric"))
        cols = _int_arg(request, "cols", 400, 1, MAX_COLS)
        root_tags: dict[str, str] = {}
        for tag in self._tags(request, run).get(run, {}):
            parsed = data.parse(tag)
            if parsed is not None and parsed.stage == stage and parsed.metric == metric:
                root_tags[parsed.layer] = tag
        if not root_tags:
            raise errors.NotFoundError(f"run {run!r} has no {stage}/{metric} scalars")
        t1 = time.perf_counter()
        read = self._read(request, run, list(root_tags.values()))
        t2 = time.perf_counter()
        layers = data.order_layers(root_tags, self._model_order(run))
        series = {layer: read[tag] for layer, tag in root_tags.items() if tag in read}
        steps, grid = data.heatmap(series, layers, cols)
        lim = figures.limit(stage, metric)
        past = 0 if lim is None else int(np.nansum(lim.share(grid) > 1.0))
        t3 = time.perf_counter()
        return _json(
            request,
            {
                "run": run,
                "stage": stage,
                "metric": metric,
                "layers": layers,
                "steps": steps,
                "values": data.nan_to_none(grid),
                "limit": None if lim is None else lim.to_dict(),
                "past": past,
                "points": int(sum(len(s) for s, _ in series.values())),
                "timing_ms": {
                    "list": round((t1 - t0) * 1e3, 1),
                    "read": round((t2 - t1) * 1e3, 1),
                    "bin": round((t3 - t2) * 1e3, 1),
                },
            },
        )

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_layer(self, request: wrappers.Request) -> wrappers.Response:
        run, layer = _arg(request, "run"), _arg(request, "layer")
        wanted: dict[str, tuple[str, str]] = {}
        for tag in self._tags(request, run).get(run, {}):
            parsed = data.parse(tag)
            if parsed is None or parsed.layer != layer:
                continue
            if parsed.metric in _LAYER_METRICS.get(parsed.stage, ()):
                wanted[tag] = (parsed.stage, parsed.metric)
        if not wanted:
            raise errors.NotFoundError(f"run {run!r} has no scalars of layer {layer!r}")
        read = self._read(request, run, list(wanted))
        series: dict[str, dict[str, list[list[Any]]]] = {}
        limits: dict[str, dict[str, Any]] = {}
        latest: dict[str, Any] = {}
        for tag, (stage, metric) in sorted(wanted.items()):
            steps, values = read.get(tag, (np.empty(0, np.int64), np.empty(0)))
            pairs = [
                [int(s), v] for s, v in zip(steps.tolist(), data.nan_to_none(values), strict=True)
            ]
            series.setdefault(stage, {})[metric] = pairs
            lim = figures.limit(stage, metric)
            if lim is not None:
                limits[f"{stage}/{metric}"] = lim.to_dict()
            if stage == "probe" and len(steps):
                latest[metric] = {"step": int(steps[-1]), "value": data.nan_to_none(values)[-1]}
        return _json(
            request,
            {"run": run, "layer": layer, "series": series, "limits": limits, "latest": latest},
        )

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_channels(self, request: wrappers.Request) -> wrappers.Response:
        run, layer, stage = (_arg(request, k) for k in ("run", "layer", "stage"))
        run_dir = self._run_dir(run)
        if run_dir is None or not data.store_parts(run_dir):
            return _json(request, {"run": run, "layer": layer, "step": None, "channels": {}})
        rows = data.read_store(run_dir, stages=[stage], layers=[layer], metrics=_CHANNEL_METRICS)
        rows = rows[rows["channel"].notna()]
        if rows.empty:
            return _json(request, {"run": run, "layer": layer, "step": None, "channels": {}})
        step = int(rows["step"].max())
        latest = rows[rows["step"] == step].sort_values("channel")
        channels = {
            str(m): data.nan_to_none(part["value"].to_numpy())
            for m, part in latest.groupby("metric", sort=False)
        }
        return _json(request, {"run": run, "layer": layer, "step": step, "channels": channels})


def _chart_order(stage: str, metrics: Iterable[str]) -> list[str]:
    """The stage's charted metrics in Custom Scalars order (shifts first): the structural
    ones (eps, momentum, ...) make no heatmap."""
    from bnprobe.tensorboard.tags import METRICS_BY_STAGE

    charted = METRICS_BY_STAGE.get(stage, ())
    order = {m: i for i, m in enumerate(charted)}
    shown = [m for m in metrics if m in order] if charted else list(metrics)
    return sorted(shown, key=lambda m: (order.get(m, len(order)), m))


def _value(proto: Any) -> float:
    if proto.float_val:
        return float(proto.float_val[0])
    if proto.double_val:
        return float(proto.double_val[0])
    return float("nan")


def _arg(request: wrappers.Request, name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise errors.InvalidArgumentError(f"the query needs {name}=")
    return str(value)


def _int_arg(request: wrappers.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d+", raw) or not lo <= int(raw) <= hi:
        raise errors.InvalidArgumentError(f"{name} must be an integer in {lo}..{hi}; got {raw!r}")
    return int(raw)


def _json(request: wrappers.Request, obj: Any) -> wrappers.Response:
    response: wrappers.Response = http_util.Respond(request, obj, "application/json")
    return response


__all__ = ["PLUGIN_NAME", "BatchNormPlugin"]
