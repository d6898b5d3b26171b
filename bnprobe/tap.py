"""Find the BatchNorm layers of a model and measure them with forward hooks.

:class:`BNTap` registers one forward pre-hook and one forward hook per BN layer, once, and
removes them on :meth:`BNTap.detach` (idempotent; also a context manager). Between logging steps
the hooks only check a flag. On a logging step (:meth:`BNTap.start` ... :meth:`BNTap.collect`)
they measure each layer's first forward call of the step with O(channels) tensor work on the
layer's device, and :meth:`BNTap.collect` moves everything to the host in one transfer per
device. No activation is kept and nothing synchronizes with the host inside a hook.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from bnprobe import stats
from bnprobe.store import make_rows

LayerSelection: TypeAlias = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
"""``None`` (every BN layer), a name or glob pattern, a list of them, or a predicate
``(name, module) -> bool``."""

ROOT = "<root>"
"""Layer name used when the model itself is a BN layer (``named_modules`` names it '')."""

MOMENT_METRICS = ("batch_mean", "batch_var")
RUNNING_METRICS = (
    "running_mean",
    "running_var",
    "mean_shift",
    "mean_shift_max",
    "var_shift",
    "var_shift_max",
    "kl",
    "kl_max",
    "outlier_frac",
)
AFFINE_METRICS = (
    "gamma_mean",
    "gamma_std",
    "beta_mean",
    "beta_std",
    "gamma_drift",
    "beta_drift",
    "gamma_small_frac",
)
STRUCTURE_METRICS = (
    "forward_calls",
    "train_mode",
    "model_train_mode",
    "momentum",
    "has_running_stats",
    "samples_per_channel",
)
TRACE_METRICS = ("input_bias", "input_dropout")
CHANNEL_METRICS = (
    "batch_mean",
    "batch_var",
    "running_mean",
    "running_var",
    "mean_shift",
    "var_shift",
    "kl",
    "gamma",
    "beta",
)
"""Per-channel rows: the per-channel quantity whose channel mean is the layer row (abs(d) for
``mean_shift``, abs(v) for ``var_shift``), plus gamma and beta themselves."""


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
    """What one logging step measured: the table rows and, if kept, per-channel arrays."""

    rows: pd.DataFrame
    channels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """layer -> {"gamma", "beta", "d", "v", ...} per-channel values (signed d and v)."""


@dataclass(eq=False)
class _Layer:
    name: str
    module: _BatchNorm
    gamma0: Tensor | None = None
    beta0: Tensor | None = None
    calls: int = 0
    failed: bool = False
    old: tuple[Tensor, Tensor] | None = None
    recover: bool = False
    structure: dict[str, float] = field(default_factory=dict)
    pooled: stats.Moments | None = None
    names: tuple[str, ...] = ()
    values: Tensor | None = None
    channel_names: tuple[str, ...] = ()
    channels: Tensor | None = None


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
        """Take gamma_0 and beta_0 (the drift reference) once the layer is initialized."""
        m = layer.module
        if layer.gamma0 is not None or not m.affine or is_lazy(m.weight):
            return
        layer.gamma0 = m.weight.detach().clone()
        layer.beta0 = m.bias.detach().clone()

    def references(self) -> dict[str, dict[str, Tensor]]:
        """gamma_0 and beta_0 of each layer, on the CPU (for checkpoints)."""
        return {
            layer.name: {"gamma0": layer.gamma0.cpu(), "beta0": layer.beta0.cpu()}
            for layer in self.layers
            if layer.gamma0 is not None and layer.beta0 is not None
        }

    def load_references(self, refs: dict[str, dict[str, Tensor]]) -> None:
        """Restore gamma_0 and beta_0 saved by :meth:`references` (resumed runs keep drifting
        from the original reference)."""
        for layer in self.layers:
            saved = refs.get(layer.name)
            if saved is None:
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
            layer.calls, layer.values, layer.channels, layer.old = 0, None, None, None
            layer.structure = {} if pool else {"forward_calls": 0.0}
            layer.pooled = None
        self._pool = pool
        if trace:
            self._start_trace()
        self.active = True

    def collect(
        self, *, step: int, epoch: int = 0, rank: int = 0, stage: str = "train"
    ) -> Snapshot:
        """Stop measuring and return what this step measured (one host transfer per device)."""
        self.active = False
        self._stop_trace()
        if self._pool:
            for layer in self.layers:
                if layer.pooled is not None and not layer.failed:
                    self._guarded(layer, self._finish_pool, layer)
        measured = [layer for layer in self.layers if layer.values is not None]
        host = _to_host([t for layer in measured for t in _tensors(layer)])
        layers: list[str] = []
        metrics: list[str] = []
        values: list[float] = []
        chan_layers: list[str] = []
        chan_metrics: list[str] = []
        chan_index: list[np.ndarray] = []
        chan_values: list[np.ndarray] = []
        snapshot_channels: dict[str, dict[str, np.ndarray]] = {}
        it = iter(host)
        for layer in self.layers:
            if layer.failed:
                continue
            names: list[str] = []
            vals: list[float] = []
            if layer.values is not None:
                names += layer.names
                vals += next(it).tolist()
            names += layer.structure
            vals += layer.structure.values()
            layers += [layer.name] * len(names)
            metrics += names
            values += vals
            if layer.channels is not None:
                chan = next(it)
                per = dict(zip(layer.channel_names, chan, strict=True))
                snapshot_channels[layer.name] = per
                for name in CHANNEL_METRICS if self.per_channel else ():
                    source = {"mean_shift": "d", "var_shift": "v"}.get(name, name)
                    if source not in per:
                        continue
                    col = np.abs(per[source]) if source != name else per[name]
                    chan_layers += [layer.name] * col.size
                    chan_metrics += [name] * col.size
                    chan_index.append(np.arange(col.size))
                    chan_values.append(col)
        rows = make_rows(
            step=step,
            epoch=epoch,
            stage=stage,
            rank=rank,
            layers=layers,
            metrics=metrics,
            values=values,
        )
        if chan_values:
            per_channel = make_rows(
                step=step,
                epoch=epoch,
                stage=stage,
                rank=rank,
                layers=chan_layers,
                metrics=chan_metrics,
                values=np.concatenate(chan_values),
                channels=np.concatenate(chan_index),
            )
            rows = pd.concat([rows, per_channel], ignore_index=True)
        return Snapshot(rows, snapshot_channels)

    @property
    def failures(self) -> list[str]:
        """One line per layer the tap turned off after an error inside its hooks."""
        return list(self._failures)

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, layer: _Layer, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        if not self.active or layer.failed or self._pool:
            return
        layer.calls += 1
        layer.structure["forward_calls"] = float(layer.calls)
        if layer.calls > 1:  # shared layer, or re-run by activation checkpointing: first call only
            return
        try:
            self._before(layer, module, args)
        except Exception as err:  # the probe must never stop training
            self._fail(layer, err)

    def _post_hook(
        self, layer: _Layer, module: _BatchNorm, args: tuple[Any, ...], output: Any
    ) -> None:
        if not self.active or layer.failed:
            return
        if self._pool:
            self._guarded(layer, self._accumulate, layer, args[0])
        elif layer.calls == 1 and layer.values is None:
            self._guarded(layer, self._measure, layer, module, args[0])

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
        running = None
        if m.running_mean is not None and m.running_var is not None:
            running = (m.running_mean, m.running_var)
        layer.structure["samples_per_channel"] = pooled.n
        self._metrics(layer, m, pooled, running, affine=False)

    def _before(self, layer: _Layer, m: _BatchNorm, args: tuple[Any, ...]) -> None:
        has_running = m.running_mean is not None and m.running_var is not None
        updates = has_running and m.training and m.track_running_stats
        layer.structure.update(
            train_mode=float(m.training),
            model_train_mode=float(self.model.training),
            momentum=float("nan") if m.momentum is None else float(m.momentum),
            has_running_stats=float(has_running and m.track_running_stats),
        )
        if self._trace is not None:
            self._note_producer(layer, args[0] if args else None)
        if updates:
            assert m.running_mean is not None and m.running_var is not None
            layer.old = (m.running_mean.detach().clone(), m.running_var.detach().clone())
            momentum = m.momentum
            layer.recover = momentum is not None and momentum >= stats.MIN_RECOVERY_FACTOR
        else:
            layer.old, layer.recover = None, False

    def _measure(self, layer: _Layer, m: _BatchNorm, x: Any) -> None:
        x = _tensor_input(x)
        self.reference(layer)  # lazy layers are initialized by now
        count = x.numel() / x.shape[1] if x.dim() > 1 and x.shape[1] else 0.0
        if self._world_size is not None and isinstance(m, nn.SyncBatchNorm) and m.training:
            count *= self._world_size(m)  # SyncBN normalizes with moments over every rank
        running: tuple[Tensor, Tensor] | None = None
        if layer.old is not None:  # this forward updated the running stats: use the old ones
            running = layer.old
        elif m.running_mean is not None and m.running_var is not None:
            running = (m.running_mean, m.running_var)
        if layer.old is not None and layer.recover:
            assert m.running_mean is not None and m.running_var is not None
            momentum = float(m.momentum or 0.0)
            mean_old, var_old = layer.old
            batch = stats.recover_moments(
                mean_old, var_old, m.running_mean, m.running_var, momentum, count
            )
        else:
            batch = stats.batch_moments(x)._replace(n=count)
        layer.old = None
        layer.structure["samples_per_channel"] = count
        self._metrics(layer, m, batch, running, affine=True)

    def _metrics(
        self,
        layer: _Layer,
        m: _BatchNorm,
        batch: stats.Moments,
        running: tuple[Tensor, Tensor] | None,
        *,
        affine: bool,
    ) -> None:
        """Turn batch moments (and running moments, affine parameters) into this layer's values."""
        names = ["batch_mean", "batch_var"]
        chan_names = ["batch_mean", "batch_var"]
        chan_rows = [batch.mean, batch.var]  # per-channel quantities, float64
        parts: list[Tensor]
        if running is not None:
            mu_r, var_r = running
            d, v = stats.shifts(batch, mu_r, var_r, m.eps)
            kl = stats.gaussian_kl(d, v)
            ad, av = d.abs(), v.abs()
            outlier = (ad > stats.OUTLIER_MEAN_SHIFT) | (av > stats.OUTLIER_LOG_VAR_RATIO)
            table = torch.stack([batch.mean, batch.var, mu_r.double(), var_r.double(), ad, av, kl])
            parts = [table.mean(dim=1), table[4:].amax(dim=1), outlier.double().mean().reshape(1)]
            names += ["running_mean", "running_var", "mean_shift", "var_shift", "kl"]
            names += ["mean_shift_max", "var_shift_max", "kl_max", "outlier_frac"]
            chan_rows += [table[2], table[3], d, v, kl]
            chan_names += ["running_mean", "running_var", "d", "v", "kl"]
        else:
            parts = [torch.stack(chan_rows).mean(dim=1)]
        parts.append(stats.nonfinite_channels(batch).reshape(1))
        names.append("nonfinite")
        if affine and m.affine and layer.gamma0 is not None and layer.beta0 is not None:
            g, b = m.weight.detach().double(), m.bias.detach().double()
            g0, b0 = layer.gamma0.double(), layer.beta0.double()
            ag = g.abs()
            parts.append(
                torch.stack(
                    [
                        g.mean(),
                        stats.std(g),
                        b.mean(),
                        stats.std(b),
                        (g - g0).norm() / g0.norm(),
                        (b - b0).norm() / math.sqrt(b.numel()),
                        (ag < stats.SMALL_GAMMA * ag.max()).double().mean(),
                    ]
                )
            )
            names += list(AFFINE_METRICS)
            chan_rows += [g, b]
            chan_names += ["gamma", "beta"]
        layer.names = tuple(names)
        layer.values = torch.cat(parts)
        if self.keep_channels:
            layer.channel_names = tuple(chan_names)
            layer.channels = torch.stack(chan_rows)

    def _fail(self, layer: _Layer, err: Exception) -> None:
        layer.failed = True
        layer.values = layer.channels = None
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
        traced = self._trace is not None and id(module) in self._model_modules
        if traced and isinstance(output, Tensor):
            assert self._trace is not None
            self._trace[id(output)] = (weakref.ref(output), module)

    def _note_producer(self, layer: _Layer, x: Any) -> None:
        assert self._trace is not None
        entry = self._trace.get(id(x))
        producer = entry[1] if entry is not None and entry[0]() is x else None
        bias = isinstance(producer, nn.Linear | nn.modules.conv._ConvNd) and (
            getattr(producer, "bias", None) is not None
        )
        p = producer.p if isinstance(producer, nn.modules.dropout._DropoutNd) else 0.0
        layer.structure.update(input_bias=float(bias), input_dropout=float(p))


def _tensor_input(x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the BN input to be a tensor, got {type(x).__name__}")
    return x


def _tensors(layer: _Layer) -> Iterator[Tensor]:
    assert layer.values is not None
    yield layer.values
    if layer.channels is not None:
        yield layer.channels


def _to_host(tensors: list[Tensor]) -> list[np.ndarray]:
    """Copy tensors to the host with one transfer per device; return them as float64 arrays."""
    out: list[np.ndarray | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().numpy()
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].reshape(tensors[i].shape)
            offset += n
    return [a for a in out if a is not None]
