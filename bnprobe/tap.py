"""Find the BatchNorm layers of a model and measure them with forward hooks.

:class:`BNTap` registers one forward pre-hook and one forward hook per BN layer, once, and
removes them on :meth:`BNTap.detach` (idempotent; also a context manager). Between logging steps
the hooks only check a flag. On a logging step (:meth:`BNTap.start` ... :meth:`BNTap.collect`)
the pre-hook of each layer's first forward copies what that forward starts from: the running
buffers, gamma and beta (one ``torch.cat`` kernel of O(channels) values, on the layer's
device). The batch moments follow exactly from the running buffers before and after the update
(:func:`bnprobe.stats.recover_moments`); the updated buffers are read at :meth:`BNTap.collect`,
or copied by a second call's pre-hook when the layer runs again. Only where the moments cannot
be recovered does the post-hook compute them (one ``var_mean``). :meth:`BNTap.collect` moves
every layer's values to the host in one transfer per device and derives all metrics there in
float64 numpy (:func:`bnprobe.stats.segment_metrics`). No activation is kept and nothing
synchronizes with the host inside a hook.
"""

from __future__ import annotations

import fnmatch
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache, partial
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from bnprobe import stats
from bnprobe.store import (
    AFFINE_METRICS,
    COUNT_METRICS,
    MOMENT_METRICS,
    SHIFT_METRICS,
    WARMUP_METRICS,
    Rows,
    concat,
)

LayerSelection: TypeAlias = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
"""``None`` (every BN layer), a name or glob pattern, a list of them, or a predicate
``(name, module) -> bool``."""

ROOT = "<root>"
"""Layer name used when the model itself is a BN layer (``named_modules`` names it '')."""


def find_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, _BatchNorm]:
    """The BN layers of ``model`` selected by ``layers``, by qualified name, in module order.

    Every instance of ``torch.nn.modules.batchnorm._BatchNorm`` counts: BatchNorm1d/2d/3d,
    SyncBatchNorm, the lazy variants and user subclasses. Names and glob patterns
    (``"encoder.*.bn1"``) that match no BN layer raise ``ValueError`` naming them.
    """
    found = {(name or ROOT): m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if layers is None:
        return found
    if callable(layers):
        return {name: m for name, m in found.items() if layers(name, m)}
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"layers must hold layer names or glob patterns (str); got {pattern!r} "
                f"of type {type(pattern).__name__}"
            )
        hits = {name for name in found if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            known = ", ".join(found) or "none"
            raise ValueError(
                f"layers={pattern!r} matches no BatchNorm layer of the model. "
                f"Its BatchNorm layers are: {known}. Use one of these names or a glob pattern."
            )
        chosen |= hits
    return {name: m for name, m in found.items() if name in chosen}


@dataclass
class Snapshot:
    """What one step measured: its rows and, if kept, per-channel arrays.

    ``parts`` holds the rows as :class:`bnprobe.store.Rows` (columns, as the tap makes them) or
    tables; :attr:`rows` builds one DataFrame of them only when it is asked for.
    """

    parts: Sequence[Rows | pd.DataFrame]
    channels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """layer -> {"gamma", "beta", "d", "v", ...} per-channel values (signed d and v)."""
    _table: pd.DataFrame | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def rows(self) -> pd.DataFrame:
        """Every row as one table (SPEC schema)."""
        if self._table is None:
            frames = [p.frame() if isinstance(p, Rows) else p for p in self.parts]
            self._table = concat(frames)
        return self._table

    @property
    def aggregates(self) -> Rows | None:
        """The layer rows (channel NA) as plain columns, when the snapshot holds nothing else
        that a logger would show (None: use :attr:`rows`)."""
        columns = [p for p in self.parts if isinstance(p, Rows) and p.channels is None]
        tables = [p for p in self.parts if not isinstance(p, Rows)]
        return columns[0] if len(columns) == 1 and not tables else None


class _Layout(NamedTuple):
    """What a layer's raw vector holds: blocks of ``channels`` values each, in this order.

    With ``running``: the running mean and variance as the first forward of the step found them
    (for ``recovered`` layers, before it updated them), and with ``tracked`` one value more,
    ``num_batches_tracked`` then; with ``affine``: gamma and beta; then two blocks: the running
    mean and variance after the update (``recovered``: the batch moments follow from it) or else
    the batch moments mu_B, var_B themselves; with ``affine``: gamma_0, beta_0; with
    ``reference``: the initial running mean and variance (the warm-up reference) and, with
    ``tracked``, ``num_batches_tracked`` then, last.
    """

    channels: int
    recovered: bool
    running: bool
    affine: bool
    factor: float
    samples: float
    """Elements per channel the batch moments are taken over (n)."""
    eps: float
    tracked: bool = False
    reference: bool = False
    momentum: float = -1.0
    """The layer's momentum; -1 for None (cumulative average)."""
    recoverable: bool = False
    """The update gives the batch moments (``recovered`` unless the tap chose to compute them)."""

    @property
    def size(self) -> int:
        blocks = 2 * self.running + 2 + 4 * self.affine + 2 * self.reference
        scalars = self.tracked * (self.running + self.reference)
        return self.channels * blocks + scalars


@dataclass(eq=False)
class _Layer:
    name: str
    module: _BatchNorm
    gamma0: Tensor | None = None
    beta0: Tensor | None = None
    calls: int = 0
    failed: bool = False
    layout: _Layout | None = None
    """Set by the first forward of a measured step."""
    before: Tensor | None = None
    """cat(running_mean, running_var, gamma, beta) (those the layer has) as that forward found
    them."""
    after: Tensor | None = None
    """``recovered``: cat(running_mean, running_var) after the first forward, taken by a second
    one (shared layer, activation checkpointing), else read at collect. Otherwise the batch
    moments cat(mu_B, var_B)."""
    modes: tuple[bool, bool] = (False, False)
    """(layer in training mode, model in training mode) at that forward."""
    frozen: bool = False
    """At its last measured training forward the layer was in eval mode while the model was in
    training mode (a frozen BN layer, as in fine-tuning)."""
    batch_size: float = 0.0
    producer: tuple[float, float] | None = None
    """(input_bias, input_dropout) of a traced step."""
    pooled: stats.Moments | None = None
    initial: Tensor | None = None
    """cat(running_mean, running_var[, num_batches_tracked]) when the tap first saw the layer:
    the warm-up reference (``warmup_residual``, ``*_excess``)."""
    suspect: bool = True
    """Compute the batch moments directly at the next measured step, as recovering them from
    the update would not be accurate (true until a measured step shows otherwise)."""


class BNTap:
    """Forward hooks on the BN layers of ``model`` that measure stage-``train`` metrics.

    Use it from any training loop::

        with BNTap(model) as tap:
            for step, batch in enumerate(loader):
                tap.start()                      # this step is measured
                loss = model(batch).loss(); ...  # forward (+ backward, optimizer step)
                rows = tap.collect(step=step).rows
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelection = None,
        *,
        keep_channels: bool = False,
        per_channel: bool = False,
        world_size: Callable[[nn.Module], int] | None = None,
    ) -> None:
        self.model = model
        self.keep_channels = keep_channels or per_channel
        self.per_channel = per_channel
        self.active = False
        self._world_size = world_size
        self.layers = [_Layer(name, m) for name, m in find_layers(model, layers).items()]
        self._handles: list[RemovableHandle] = []
        self._trace: dict[int, tuple[weakref.ReferenceType[Tensor], nn.Module]] | None = None
        self._model_modules: set[int] = set()
        self._failures: list[str] = []
        self._pool = False
        self._started = False
        self._channels: dict[str, dict[str, np.ndarray]] = {}
        self._chan_rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> BNTap:
        """Register the hooks (once; calling again does nothing) and remember gamma_0, beta_0."""
        if self._handles:
            return self
        for layer in self.layers:
            self.reference(layer)
            m = layer.module
            self._handles.append(m.register_forward_pre_hook(partial(self._pre_hook, layer)))
            self._handles.append(m.register_forward_hook(partial(self._post_hook, layer)))
        return self

    def detach(self) -> None:
        """Remove every hook this tap registered. Safe to call any number of times."""
        self.active = False
        self._stop_trace()
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> BNTap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reference(self, layer: _Layer) -> None:
        """Take gamma_0 and beta_0 (the drift reference) and the initial running buffers (the
        warm-up reference) once the layer is initialized."""
        m = layer.module
        running = _running(m)
        if layer.initial is None and running and not any(is_lazy(t) for t in running):
            layer.initial = torch.cat([*running, *_tracked(m)])
        if layer.gamma0 is not None or not m.affine or is_lazy(m.weight):
            return
        layer.gamma0 = m.weight.detach().clone()
        layer.beta0 = m.bias.detach().clone()

    def references(self) -> dict[str, dict[str, Tensor]]:
        """gamma_0, beta_0, the initial running buffers and whether the next measured step
        computes the moments directly, of each layer, on the CPU (for checkpoints)."""
        out: dict[str, dict[str, Tensor]] = {}
        for layer in self.layers:
            refs = {}
            if layer.gamma0 is not None and layer.beta0 is not None:
                refs = {"gamma0": layer.gamma0.cpu(), "beta0": layer.beta0.cpu()}
            if layer.initial is not None:
                refs["initial"] = layer.initial.cpu()
            refs["suspect"] = torch.tensor(layer.suspect)  # a resumed run measures as this one
            if refs:
                out[layer.name] = refs
        return out

    def load_references(self, refs: dict[str, dict[str, Tensor]]) -> None:
        """Restore gamma_0 and beta_0 saved by :meth:`references` (resumed runs keep drifting
        from the original reference)."""
        for layer in self.layers:
            saved = refs.get(layer.name)
            if saved is None:
                continue
            if "suspect" in saved:
                layer.suspect = bool(saved["suspect"])
            running = _running(layer.module)
            if "initial" in saved and running:
                layer.initial = saved["initial"].to(running[0].device)
            if "gamma0" not in saved:
                continue
            device = layer.module.weight.device if layer.module.affine else None
            layer.gamma0 = saved["gamma0"].to(device)
            layer.beta0 = saved["beta0"].to(device)

    # -- one logging step ---------------------------------------------------------------------
    def start(self, *, trace: bool = False, pool: bool = False) -> None:
        """Measure the next forward of each layer.

        ``trace=True`` also learns which module produced each BN input (``input_bias``,
        ``input_dropout``), at the cost of a global forward hook for this step only.
        ``pool=True`` instead pools the input moments of every forward until :meth:`collect`
        (stage ``val``: all validation batches of an epoch against the running stats in use).
        """
        for layer in self.layers:
            layer.calls, layer.layout, layer.before, layer.after = 0, None, None, None
            layer.producer, layer.pooled = None, None
        self._pool = pool
        if trace:
            self._start_trace()
        self.active = self._started = True

    def collect(
        self, *, step: int, epoch: int = 0, rank: int = 0, stage: str = "train"
    ) -> Snapshot:
        """Stop measuring and return what this step measured (one host transfer per device);
        no rows without a :meth:`start` first."""
        self.active = False
        self._stop_trace()
        if not self._started:
            return Snapshot([Rows(step, epoch, stage, rank, [], [], [])])
        self._started = False
        if self._pool:
            for layer in self.layers:
                if layer.pooled is not None and not layer.failed:
                    self._guarded(layer, self._finish_pool, layer)
        results = self._host_metrics([layer for layer in self.layers if not layer.failed])
        layers: list[str] = []
        metrics: list[str] = []
        values: list[float] = []
        for layer in self.layers:
            if layer.failed:
                continue
            names, vals = results.get(layer, ((), []))
            structure = self._structure(layer)
            layers += [layer.name] * (len(names) + len(structure))
            metrics += names
            metrics += structure
            values += vals
            values += structure.values()
        parts = [Rows(step, epoch, stage, rank, layers, metrics, values)]
        if self._chan_rows is not None:
            chan_layers, chan_metrics, chan_index, chan_values = self._chan_rows
            parts.append(
                Rows(step, epoch, stage, rank, chan_layers, chan_metrics, chan_values, chan_index)
            )
        snapshot = Snapshot(parts, self._channels)
        self._chan_rows, self._channels = None, {}
        return snapshot

    def _structure(self, layer: _Layer) -> dict[str, float]:
        """The structural metrics of a layer this step (store.STRUCTURE_METRICS and, on a traced
        step, store.TRACE_METRICS), in the order the table has them."""
        lay = layer.layout
        if self._pool:
            return {"samples_per_channel": lay.samples} if lay is not None else {}
        if lay is None:
            return {"forward_calls": float(layer.calls)}
        m = layer.module
        out = {
            "forward_calls": float(layer.calls),
            "train_mode": float(layer.modes[0]),
            "model_train_mode": float(layer.modes[1]),
            "momentum": float("nan") if m.momentum is None else float(m.momentum),
            "has_running_stats": float(lay.running and m.track_running_stats),
        }
        if layer.producer is not None:
            out["input_bias"], out["input_dropout"] = layer.producer
        out |= {"samples_per_channel": lay.samples, "batch_size": layer.batch_size, "eps": lay.eps}
        return out

    def _pieces(self, layer: _Layer) -> list[Tensor] | None:
        """The tensors whose concatenation is the layer's raw vector (:class:`_Layout`), or None
        when its first forward of the step did not finish."""
        lay = layer.layout
        if lay is None:
            return None
        pieces = [layer.before] if layer.before is not None else []
        if layer.after is not None:
            pieces.append(layer.after)
        elif lay.recovered:  # called once: the buffers still hold what that forward left
            pieces += _running(layer.module)
        else:
            return None
        if lay.affine:
            assert layer.gamma0 is not None and layer.beta0 is not None
            pieces += [layer.gamma0, layer.beta0]
        if lay.reference:
            assert layer.initial is not None
            pieces.append(layer.initial)
        return pieces

    def _host_metrics(
        self, measured: list[_Layer]
    ) -> dict[_Layer, tuple[tuple[str, ...], list[float]]]:
        """Metric names and values of each measured layer, computed for all layers at once
        (:func:`bnprobe.stats.segment_metrics`); per-channel vectors and rows when kept."""
        ok: list[_Layer] = []
        layouts: list[_Layout] = []
        pieces: list[Tensor] = []
        for layer in measured:
            lay, parts = layer.layout, self._pieces(layer)
            if lay is None or parts is None:
                continue
            size = sum(p.numel() for p in parts)
            if lay.channels < 1 or size != lay.size:
                self._fail(layer, RuntimeError(f"measured {size} values, the layout is {lay}"))
                continue
            ok.append(layer)
            layouts.append(lay)
            pieces += parts
        if not ok:
            return {}
        try:
            seg = _plan(tuple(layouts)).segments(_to_host(pieces))
            table, per = stats.segment_metrics(seg)
        except Exception as err:  # the probe must never stop training
            for layer in ok:
                self._fail(layer, err)
            return {}
        columns = np.stack([table[name] for name in _ALL_METRICS], axis=1).tolist()
        out: dict[_Layer, tuple[tuple[str, ...], list[float]]] = {}
        ill = seg.ill_conditioned.tolist() if seg.ill_conditioned is not None else []
        for i, (layer, lay, row) in enumerate(zip(ok, layouts, columns, strict=True)):
            names, index = _metric_index(lay.running, lay.affine, lay.tracked)
            out[layer] = (names, [row[i] for i in index])
            if lay.recoverable and ill:
                layer.suspect = bool(ill[i])
        if self.keep_channels:
            chan = {"batch_mean": seg.mean, "batch_var": seg.var, "running_mean": seg.mu_r}
            chan |= {"running_var": seg.var_r, "gamma": seg.gamma, "beta": seg.beta, **per}
            self._keep_channels(list(zip(ok, layouts, strict=True)), seg, chan)
        return out

    def _keep_channels(
        self,
        ok: list[tuple[_Layer, _Layout]],
        seg: stats.Segments,
        chan: dict[str, np.ndarray],
    ) -> None:
        """Per-layer channel vectors for the snapshot, and per-channel rows if asked for."""
        ends = np.cumsum(seg.channels).tolist()
        starts = [0, *ends[:-1]]
        running_keys = ("running_mean", "running_var", "d", "v", "kl")
        for (layer, lay), a, b in zip(ok, starts, ends, strict=True):
            keys = ["batch_mean", "batch_var"]
            keys += running_keys if lay.running else ()
            keys += ("gamma", "beta") if lay.affine else ()
            self._channels[layer.name] = {k: chan[k][a:b] for k in keys}
        if not self.per_channel:
            return
        running = np.repeat([lay.running for _, lay in ok], seg.channels)
        affine = np.repeat([lay.affine for _, lay in ok], seg.channels)
        names = np.repeat(np.array([layer.name for layer, _ in ok], dtype=object), seg.channels)
        index = np.arange(len(names)) - np.repeat(starts, seg.channels)
        sources = {"mean_shift": np.abs(chan["d"]), "var_shift": np.abs(chan["v"])}
        parts: list[tuple[str, np.ndarray, np.ndarray | None]] = [
            ("batch_mean", chan["batch_mean"], None),
            ("batch_var", chan["batch_var"], None),
        ]
        for name in ("running_mean", "running_var", "mean_shift", "var_shift", "kl"):
            parts.append((name, sources[name] if name in sources else chan[name], running))
        parts += [("gamma", chan["gamma"], affine), ("beta", chan["beta"], affine)]
        col_layers, col_metrics, col_index, col_values = [], [], [], []
        for name, vec, mask in parts:
            sel = slice(None) if mask is None else mask
            n = int(mask.sum()) if mask is not None else len(vec)
            col_layers.append(names[sel])
            col_metrics.append(np.full(n, name, dtype=object))
            col_index.append(index[sel])
            col_values.append(vec[sel])
        self._chan_rows = (
            np.concatenate(col_layers),
            np.concatenate(col_metrics),
            np.concatenate(col_index),
            np.concatenate(col_values),
        )

    def frozen_layers(self) -> list[str]:
        """The layers that were in eval mode while the model trained, at their last measured
        training forward: what :func:`bnprobe.check_mismatch` should keep frozen."""
        return [layer.name for layer in self.layers if layer.frozen]

    @property
    def failures(self) -> list[str]:
        """One line per layer the tap turned off after an error inside its hooks."""
        return list(self._failures)

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, layer: _Layer, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        if not self.active or layer.failed or self._pool:
            return
        layer.calls += 1
        try:
            if layer.calls == 1:
                self._before(layer, module, args[0] if args else None)
            elif layer.calls == 2 and layer.layout is not None and layer.layout.recovered:
                # shared layer, or re-run by activation checkpointing: keep the first update
                layer.after = torch.cat(_running(module))
        except Exception as err:  # the probe must never stop training
            self._fail(layer, err)

    def _post_hook(
        self, layer: _Layer, module: _BatchNorm, args: tuple[Any, ...], output: Any
    ) -> None:
        if not self.active or layer.failed:
            return
        if self._pool:
            self._guarded(layer, self._accumulate, layer, args[0])
        elif layer.calls == 1 and layer.after is None and _direct(layer.layout):
            self._guarded(layer, self._batch_moments, layer, args[0])

    def _guarded(self, layer: _Layer, fn: Callable[..., None], *args: Any) -> None:
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as err:  # the probe must never stop training
            self._fail(layer, err)

    def _accumulate(self, layer: _Layer, x: Any) -> None:
        batch = stats.batch_moments(_tensor_input(x))
        layer.pooled = batch if layer.pooled is None else stats.combine(layer.pooled, batch)

    def _finish_pool(self, layer: _Layer) -> None:
        m, pooled = layer.module, layer.pooled
        assert pooled is not None
        running = m.running_mean is not None and m.running_var is not None
        tracked = _tracked(m)
        if running:
            assert m.running_mean is not None and m.running_var is not None
            layer.before = torch.cat([m.running_mean, m.running_var, *tracked])
        layer.after = torch.cat([pooled.mean, pooled.var])
        layer.layout = _Layout(
            channels=pooled.mean.numel(),
            recovered=False,
            running=running,
            affine=False,
            factor=0.0,
            samples=pooled.n,
            eps=float(m.eps),
            tracked=running and bool(tracked),
            reference=running and _has_initial(layer, pooled.mean.numel(), bool(tracked)),
            momentum=-1.0 if m.momentum is None else float(m.momentum),
        )

    def _before(self, layer: _Layer, m: _BatchNorm, x: Any) -> None:
        """At the layer's first forward of a measured step: one O(channels) copy (one
        ``torch.cat`` kernel) of what that forward starts from, and the facts about it."""
        x = _tensor_input(x)
        channels = int(x.shape[1]) if x.dim() > 1 else 0
        if channels < 1:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(x.shape)}")
        if layer.gamma0 is None:
            self.reference(layer)  # a lazy layer's own pre-hook, which runs first, initialized it
        layer.modes = (m.training, self.model.training)
        if self.model.training and not self._pool:
            layer.frozen = not m.training
        if self._trace is not None:
            self._note_producer(layer, x)
        count, batch_size = x.numel() / channels, float(x.shape[0])
        if self._world_size is not None and m.training and isinstance(m, nn.SyncBatchNorm):
            world = self._world_size(m)  # SyncBN normalizes with moments over every rank
            count, batch_size = count * world, batch_size * world
        layer.batch_size = batch_size
        running = _running(m)
        tracked = _tracked(m) if running else []
        momentum = m.momentum
        recoverable = (
            bool(running)
            and m.training
            and m.track_running_stats
            and momentum is not None
            and momentum >= stats.MIN_RECOVERY_FACTOR
        )
        affine = layer.gamma0 is not None and m.affine
        blocks = [*running, *tracked]  # num_batches_tracked: int64, promoted by the cat
        if affine:
            params = m._parameters  # Module.__getattr__ costs ~0.5 us a call
            blocks += [params["weight"].detach(), params["bias"].detach()]  # type: ignore[union-attr]
        if blocks:
            layer.before = torch.cat(blocks)
        layer.layout = _Layout(
            channels,
            recoverable and not layer.suspect,
            bool(running),
            affine,
            float(momentum or 0.0),
            count,
            m.eps,
            tracked=bool(tracked),
            reference=bool(running) and _has_initial(layer, channels, bool(tracked)),
            momentum=-1.0 if momentum is None else float(momentum),
            recoverable=recoverable,
        )

    def _batch_moments(self, layer: _Layer, x: Any) -> None:
        """Where the update does not give the batch moments: compute them (one ``var_mean``)."""
        layer.after = torch.cat(stats.raw_moments(_tensor_input(x)))

    def _fail(self, layer: _Layer, err: Exception) -> None:
        layer.failed = True
        layer.layout, layer.before, layer.after = None, None, None
        line = (
            f"bnprobe: measuring layer {layer.name!r} ({type(layer.module).__name__}) failed with "
            f"{type(err).__name__}: {err}. This layer is no longer measured; training goes on."
        )
        self._failures.append(line)
        warnings.warn(line, RuntimeWarning, stacklevel=2)

    # -- which module produced each BN input (one traced step) -----------------------------------
    def _start_trace(self) -> None:
        self._model_modules = {id(m) for m in self.model.modules()}
        self._trace = {}
        hook = torch.nn.modules.module.register_module_forward_hook(self._record_output)
        self._trace_handle: RemovableHandle | None = hook

    def _stop_trace(self) -> None:
        handle = getattr(self, "_trace_handle", None)
        if handle is not None:
            handle.remove()
            self._trace_handle = None
        self._trace = None

    def _record_output(self, module: nn.Module, args: Any, output: Any) -> None:
        """Remember which module returned each tensor. A module with children (Sequential, a
        block) that returns a tensor one of its modules already returned does not replace it:
        forward hooks fire innermost first, so ``Sequential(conv, Dropout)`` leaves the Dropout
        as the producer. Leaf modules do replace (``ReLU(inplace=True)`` returns the conv's
        tensor, and it is the ReLU that feeds the next layer). Functional calls
        (``F.dropout``, ``x + bias``) are not modules and cannot be seen."""
        traced = self._trace is not None and id(module) in self._model_modules
        if traced and isinstance(output, Tensor):
            assert self._trace is not None
            if module._modules:
                entry = self._trace.get(id(output))
                if entry is not None and entry[0]() is output:
                    return
            self._trace[id(output)] = (weakref.ref(output), module)

    def _note_producer(self, layer: _Layer, x: Any) -> None:
        assert self._trace is not None
        entry = self._trace.get(id(x))
        producer = entry[1] if entry is not None and entry[0]() is x else None
        bias = isinstance(producer, nn.Linear | nn.modules.conv._ConvNd) and (
            getattr(producer, "bias", None) is not None
        )
        p = producer.p if isinstance(producer, nn.modules.dropout._DropoutNd) else 0.0
        layer.producer = (float(bias), float(p))


def _running(m: _BatchNorm) -> list[Tensor]:
    """[running_mean, running_var] of a BN layer, or [] without running statistics (read from
    its buffer dict: ``Module.__getattr__`` costs ~0.5 us a call, and a hook reads them often)."""
    buffers = m._buffers
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    return [mean, var] if mean is not None and var is not None else []


def _tracked(m: _BatchNorm) -> list[Tensor]:
    """[num_batches_tracked viewed as 1 value] of a BN layer, or [] without that buffer."""
    nbt = m._buffers.get("num_batches_tracked")
    return [nbt.view(1)] if nbt is not None else []


def _has_initial(layer: _Layer, channels: int, tracked: bool) -> bool:
    """Whether the layer's warm-up reference fits its layout (2 C values, + 1 if tracked)."""
    init = layer.initial
    return init is not None and init.numel() == 2 * channels + int(tracked)


def _direct(layout: _Layout | None) -> bool:
    """Whether a measured layer's batch moments are computed rather than recovered."""
    return layout is not None and not layout.recovered


def _tensor_input(x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the BN input to be a tensor, got {type(x).__name__}")
    return x


_ALL_METRICS = (
    *MOMENT_METRICS,
    *SHIFT_METRICS,
    *WARMUP_METRICS,
    *COUNT_METRICS,
    *AFFINE_METRICS,
)


@cache
def _metric_index(
    running: bool, affine: bool, tracked: bool = False
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The metrics a layer has (names, in row order) and their positions in ``_ALL_METRICS``."""
    names = [*MOMENT_METRICS]
    names += SHIFT_METRICS if running else ()
    names += WARMUP_METRICS if running and tracked else ()
    names += COUNT_METRICS
    names += AFFINE_METRICS if affine else ()
    return tuple(names), tuple(_ALL_METRICS.index(n) for n in names)


_SEGMENT_KEYS = ("mo", "vo", "mn", "vn", "mr", "vr", "g", "b", "g0", "b0", "m0", "v0", "n", "n0")


@dataclass(frozen=True, eq=False)
class _Plan:
    """Where each per-channel quantity of a set of layer layouts sits in their concatenated raw
    vectors: one row of indices into ``[*raw, 0.0, nan]`` per quantity (``_SEGMENT_KEYS``; a
    layer's scalars, ``num_batches_tracked`` then and now, repeated per channel), so that a
    step's :class:`stats.Segments` take one numpy gather however many layers there are.

    Recovered layers get mu_B = m_o + (m_n - m_o)/f and var_B = (v_n - (1-f) v_o)/f · (n-1)/n
    (:func:`bnprobe.stats.recover_moments`); directly measured ones go through the same formula
    with m_o = v_o = 0 and f = n = 1, which returns them unchanged, bit for bit. For every layer
    whose update could give its moments, :func:`bnprobe.stats.recovery_ill_conditioned` says
    whether it would do so accurately: the tap measures it directly next time if not.
    """

    channels: np.ndarray
    index: np.ndarray
    factor: np.ndarray
    count: np.ndarray
    eps: np.ndarray
    running: np.ndarray
    momentum: np.ndarray
    recoverable: np.ndarray
    samples: np.ndarray
    starts: np.ndarray

    def segments(self, raw: np.ndarray) -> stats.Segments:
        values = np.concatenate([raw, (0.0, np.nan)])[self.index]
        mo, vo, mn, vn, mr, vr, g, b, g0, b0, m0, v0, n, n0 = values
        mean, var = stats.recover_moments(mo, vo, mn, vn, self.factor, self.count)
        seg = stats.Segments(self.channels, mean, var, mr, vr, self.eps, g, b, g0, b0)
        seg.running, seg.mean0, seg.var0, seg.n0, seg.n = self.running, m0, v0, n0, n
        seg.momentum = self.momentum
        if self.recoverable.any():
            rf = np.where(self.recoverable, self.momentum, 1.0)
            ill = stats.recovery_ill_conditioned(mr, vr, mean, var, rf, self.samples)
            seg.ill_conditioned = np.add.reduceat(ill & self.recoverable, self.starts) > 0
        return seg


@lru_cache(maxsize=16)
def _plan(layouts: tuple[_Layout, ...]) -> _Plan:
    """The :class:`_Plan` of these layouts (they rarely change from step to step: cached)."""
    total = sum(lay.size for lay in layouts)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in _SEGMENT_KEYS}
    offset = 0
    for lay in layouts:
        c = lay.channels
        nblocks = (lay.size - lay.tracked * (lay.running + lay.reference)) // c
        zero, nan = np.full(c, total), np.full(c, total + 1)
        # the raw vector, in order: running (2 blocks) [n], affine (2), second (2), reference
        # (2), initial (2) [n0]; blocks of c values and the scalars n and n0
        blocks: list[np.ndarray] = []
        scalars: dict[str, np.ndarray] = {"n": nan, "n0": nan}
        at = offset
        sequence = ["b", "b", "n"] if lay.running else []
        sequence += ["b"] * (4 * lay.affine + 2)
        sequence += ["b", "b", "n0"] if lay.reference else []
        for part in sequence:
            if part == "b":
                blocks.append(np.arange(at, at + c))
                at += c
            elif lay.tracked:
                scalars[part] = np.full(c, at)
                at += 1
        assert at - offset == lay.size and len(blocks) == nblocks
        running = [blocks.pop(0), blocks.pop(0)] if lay.running else [nan, nan]
        affine = [blocks.pop(0), blocks.pop(0)] if lay.affine else [nan, nan]
        second = [blocks.pop(0), blocks.pop(0)]
        reference = [blocks.pop(0), blocks.pop(0)] if lay.affine else [nan, nan]
        initial = [blocks.pop(0), blocks.pop(0)] if lay.reference else [nan, nan]
        old = running if lay.recovered else [zero, zero]  # recovered: old and new running
        quantities = [*old, *second, *running, *affine, *reference, *initial]
        quantities += [scalars["n"], scalars["n0"]]
        for key, idx in zip(_SEGMENT_KEYS, quantities, strict=True):
            parts[key].append(idx)
        offset += lay.size
    channels = np.array([lay.channels for lay in layouts], dtype=np.int64)
    per_layer = {
        "factor": [lay.factor if lay.recovered else 1.0 for lay in layouts],
        "count": [lay.samples if lay.recovered else 1.0 for lay in layouts],  # n <= 1: var as is
        "eps": [lay.eps for lay in layouts],
        "momentum": [lay.momentum for lay in layouts],
        "samples": [lay.samples for lay in layouts],
    }
    repeated = {k: np.repeat(np.array(v, dtype=np.float64), channels) for k, v in per_layer.items()}
    flags = {
        "running": np.repeat([lay.running for lay in layouts], channels),
        "recoverable": np.repeat([lay.recoverable for lay in layouts], channels),
    }
    return _Plan(
        channels=channels,
        index=np.stack([np.concatenate(parts[key]) for key in _SEGMENT_KEYS]),
        starts=np.concatenate([[0], np.cumsum(channels)[:-1]]),
        **repeated,
        **flags,
    )


def _to_host(tensors: list[Tensor]) -> np.ndarray:
    """Concatenate 1-d tensors into one float64 host array, with one transfer per device."""
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch.cat(tensors).to("cpu", torch.float64).numpy()
    host = {
        d: torch.cat([t for t in tensors if t.device == d]).to("cpu", torch.float64).numpy()
        for d in devices
    }
    taken = dict.fromkeys(devices, 0)
    pieces = []
    for t in tensors:
        n = t.numel()
        pieces.append(host[t.device][taken[t.device] : taken[t.device] + n])
        taken[t.device] += n
    return np.concatenate(pieces)
