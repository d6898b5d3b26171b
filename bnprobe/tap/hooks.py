"""BNTap: the hook handles, the step state machine and the two measuring paths.

:class:`BNTap` registers one forward pre-hook per BN layer, once, and removes it on
:meth:`BNTap.detach`. The hook checks a flag and hands the forward to the path the step was
started with:

* a measured step (:meth:`BNTap.start`): the pre-hook of the step's first BN forward copies
  what every layer's first forward starts from (one snapshot of all layers,
  :func:`_snapshot`, by a :class:`_SnapshotPlan` kept between steps); the pre-hook of each
  layer's first forward notes its facts (:class:`~bnprobe.tap.packing.Layout`) and computes
  the batch moments of its input, only where the running-stat update cannot give them;
* a pooled step (``start(pool=True)``, stage ``val``): the pre-hook pools the input moments of
  every forward; :meth:`BNTap.collect` turns each pool into the same raw vector.

Everything the tap measures reads the layer's input (which BN does not change) or what the
forward starts from, so one pre-hook suffices: a forward hook as well would cost every forward
of every layer, measured or not, a second dispatch.

:meth:`BNTap.collect` packs every layer (:mod:`bnprobe.tap.packing`), derives the metrics on the
host (:func:`bnprobe.stats.segment_metrics`) and builds the rows (:mod:`bnprobe.tap.rows`).

May import torch, numpy, :mod:`bnprobe.stats`, :mod:`bnprobe.store` (``Rows``) and the other
modules of :mod:`bnprobe.tap`; no Lightning, no TensorBoard, no pandas.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from bnprobe import stats
from bnprobe.store import Rows
from bnprobe.tap import rows as build
from bnprobe.tap.layers import (
    LayerSelection,
    LayerState,
    Snapped,
    find_layers,
    restore_references,
    running_buffers,
    saved_references,
    take_reference,
    tensor_input,
    tracked_buffer,
)
from bnprobe.tap.packing import (
    HostReferences,
    Layout,
    Plan,
    host_plan,
    live_pieces,
    pieces_size,
    raw_pieces,
    reference_pieces,
    to_host,
)
from bnprobe.tap.rows import Snapshot
from bnprobe.tap.trace import ProducerTrace

_Hook = Callable[[LayerState, _BatchNorm, Any], None]
_PlanKey = tuple[list[Layout], list[Snapped | None], list[tuple[int, int]]]


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
        self.layers = [LayerState(name, m) for name, m in find_layers(model, layers).items()]
        self._handles: list[RemovableHandle] = []
        self._trace = ProducerTrace(model)
        self._failures: list[str] = []
        self._warned_causes: set[tuple[str, str]] = set()
        self._started = False
        self._pooling = False
        self._snapshots: list[tuple[Tensor, Tensor | None] | None] = []
        """The snapshot of this step: per group, its values and update counts."""
        self._snapshot_due = False
        """A measured step whose first BN forward has not run yet (:func:`_snapshot`)."""
        self._plan: _SnapshotPlan | None = None
        """The snapshot's plan, kept between measured steps while it holds the layers."""
        self._on_input: _Hook = self._first_forward
        """What the pre-hook does with a layer's input on an active step."""
        self._references = HostReferences()
        self._row_memo = build.RowMemo()
        self._last_plan: tuple[_PlanKey, Plan] | None = None
        """The last measured step's plan and what it was made of (:meth:`_host_metrics`)."""

    # -- lifecycle ----------------------------------------------------------------------------
    def attach(self) -> BNTap:
        """Register the pre-hooks (once; calling again does nothing) and remember gamma_0,
        beta_0."""
        if self._handles:
            return self
        for layer in self.layers:
            take_reference(layer)
            m = layer.module
            self._handles.append(m.register_forward_pre_hook(partial(self._pre_hook, layer)))
        return self

    def detach(self) -> None:
        """Remove every hook this tap registered. Safe to call any number of times."""
        self.active = False
        self._trace.stop()
        self._plan = None  # it holds the layers' tensors
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> BNTap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reference(self, layer: LayerState) -> None:
        """Take gamma_0 and beta_0 (the drift reference) and the initial running buffers (the
        warm-up reference) once the layer is initialized."""
        take_reference(layer)

    def references(self) -> dict[str, dict[str, Tensor]]:
        """gamma_0, beta_0, the initial running buffers and whether the next measured step
        computes the moments directly, of each layer, on the CPU (for checkpoints)."""
        return saved_references(self.layers)

    def load_references(self, refs: dict[str, dict[str, Tensor]]) -> None:
        """Restore gamma_0 and beta_0 saved by :meth:`references` (resumed runs keep drifting
        from the original reference)."""
        restore_references(self.layers, refs)

    # -- one logging step ---------------------------------------------------------------------
    def start(self, *, trace: bool = False, pool: bool = False) -> None:
        """Measure the next forward of each layer.

        ``trace=True`` also learns which module produced each BN input (``input_bias``,
        ``input_dropout``), at the cost of a global forward hook for this step only.
        ``pool=True`` instead pools the input moments of every forward until :meth:`collect`
        (stage ``val``: all validation batches of an epoch against the running stats in use).
        """
        for layer in self.layers:
            layer.new_step()
        self._pooling = pool
        self._on_input = self._pool_input if pool else self._first_forward
        self._snapshot_due = not pool
        self._snapshots = []
        if trace:
            self._trace.start()
        self.active = self._started = True

    def collect(
        self, *, step: int, epoch: int = 0, rank: int = 0, stage: str = "train"
    ) -> Snapshot:
        """Stop measuring and return what this step measured (one host transfer per device);
        no rows without a :meth:`start` first."""
        self.active = self._snapshot_due = False
        self._trace.stop()
        if not self._started:
            return Snapshot([Rows(step, epoch, stage, rank, [], [], [])])
        self._started = False
        if self._pooling:
            for layer in self.layers:
                if layer.pooled is not None and not layer.failed:
                    self._guarded(layer, _finish_pool, layer)
        measured, ok, seg, chan = self._host_metrics([lay for lay in self.layers if not lay.failed])
        self._snapshots, self._snapshot_due = [], False
        parts = [
            build.layer_rows(
                step, epoch, stage, rank, self.layers, measured, self._pooling, self._row_memo
            )
        ]
        channels: build.ChannelVectors = {}
        if seg is not None and self.keep_channels:
            channels = build.channel_vectors(ok, seg, chan)
            if self.per_channel:
                parts.append(build.channel_rows(ok, seg, chan, step, epoch, stage, rank))
        return Snapshot(parts, channels)

    def _host_metrics(
        self, measured: list[LayerState]
    ) -> tuple[
        build.LayerMetrics | None,
        list[tuple[LayerState, Layout]],
        stats.Segments | None,
        dict[str, np.ndarray],
    ]:
        """The metrics of the measured layers, computed for all layers at once
        (:func:`bnprobe.stats.segment_metrics`), and, for the per-channel vectors and rows, the
        layers measured, their segments and per-channel vectors (None, [], None, {} when none)."""
        ok: list[LayerState] = []
        layouts: list[Layout] = []
        snapped: list[Snapped | None] = []
        pieces: list[Tensor] = []
        groups: list[tuple[int, int]] = []
        for group in self._snapshots:  # the snapshot's values first, as they were taken
            if group is None:
                groups.append((0, 0))
                continue
            values, counts = group
            groups.append((values.numel(), 0 if counts is None else counts.numel()))
            pieces += [values] if counts is None else [values, counts]
        references: list[Tensor] = []
        for layer in measured:
            parts = live_pieces(layer)
            if parts is None:
                continue
            lay = layer.layout
            assert lay is not None
            if lay.channels < 1:
                whole = raw_pieces(layer)
                assert whole is not None
                self._fail(
                    layer, RuntimeError(f"measured {_numel(whole)} values, the layout is {lay}")
                )
                continue
            ok.append(layer)
            layouts.append(lay)
            snapped.append(layer.snapped)
            pieces += parts
            if lay.affine or lay.reference:
                references += reference_pieces(layer, lay)
        if not ok:
            return None, [], None, {}
        try:
            key = (layouts, snapped, groups)
            last = self._last_plan
            if last is not None and last[0] == key:  # the layouts are the same objects: cheap
                step_plan = last[1]
            else:  # host_plan hashes every layout
                step_plan = host_plan(tuple(layouts), tuple(snapped), tuple(groups))
                self._last_plan = key, step_plan
            raw = to_host(pieces)
            refs = self._references.host(references)
        except Exception as err:  # the probe must never stop training: one warning, every layer
            for layer in ok:
                self._fail(layer, err)
            return None, [], None, {}
        if raw.size + refs.size != step_plan.size:  # a layer measured what its layout does not say
            kept = self._sized(ok)
            if len(kept) < len(ok):
                return self._host_metrics(kept)
            odd = RuntimeError(f"measured {raw.size} values, the plan reads {step_plan.size}")
            for layer in ok:
                self._fail(layer, odd)
            return None, [], None, {}
        try:
            seg = step_plan.segments(raw, refs)
            table, per = stats.segment_metrics(seg)
        except Exception as err:  # the probe must never stop training: one warning, every layer
            for layer in ok:
                self._fail(layer, err)
            return None, [], None, {}
        out = build.layer_metrics(ok, layouts, table)
        if seg.ill_conditioned is not None:
            for layer, lay, ill in zip(ok, layouts, seg.ill_conditioned.tolist(), strict=True):
                if lay.recoverable:
                    layer.suspect = bool(ill)
        chan: dict[str, np.ndarray] = {}
        if self.keep_channels:
            chan = {"batch_mean": seg.mean, "batch_var": seg.var, "running_mean": seg.mu_r}
            chan |= {"running_var": seg.var_r, "gamma": seg.gamma, "beta": seg.beta, **per}
        return out, list(zip(ok, layouts, strict=True)), seg, chan

    def _sized(self, layers: list[LayerState]) -> list[LayerState]:
        """``layers`` without those whose raw vector is not the size their layout says (turned
        off, one warning per cause)."""
        kept = []
        for layer in layers:
            lay, parts = layer.layout, raw_pieces(layer)
            assert lay is not None and parts is not None
            size = _numel(parts)
            if size != pieces_size(lay, layer.snapped):
                self._fail(layer, RuntimeError(f"measured {size} values, the layout is {lay}"))
            else:
                kept.append(layer)
        return kept

    def frozen_layers(self) -> list[str]:
        """The layers that were in eval mode while the model trained, at their last measured
        training forward: what :func:`bnprobe.check_mismatch` should keep frozen."""
        return [layer.name for layer in self.layers if layer.frozen]

    @property
    def failures(self) -> list[str]:
        """One line per layer the tap turned off after an error inside its hooks."""
        return list(self._failures)

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, layer: LayerState, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        if self.active and not layer.failed:
            self._on_input(layer, module, args)

    def _guarded(self, layer: LayerState, fn: Callable[..., None], *args: Any) -> None:
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as err:  # the probe must never stop training
            self._fail(layer, err)

    def _fail(self, layer: LayerState, err: Exception) -> None:
        """Turn ``layer`` off; warn once per cause (the error's type and message), not per
        layer: a failure of the batched computation, or the same error in every layer's hook,
        is one warning. :attr:`failures` keeps one line per layer."""
        layer.failed = True
        layer.layout, layer.before, layer.after = None, None, None
        line = (
            f"bnprobe: measuring layer {layer.name!r} ({type(layer.module).__name__}) failed with "
            f"{type(err).__name__}: {err}. This layer is no longer measured; training goes on."
        )
        self._failures.append(line)
        cause = (type(err).__name__, str(err))
        if cause in self._warned_causes:
            return
        self._warned_causes.add(cause)
        more = " Other layers that fail the same way are turned off without another warning."
        warnings.warn(line + more, RuntimeWarning, stacklevel=2)

    # -- a measured step: the first forward of each layer ---------------------------------------
    def _first_forward(self, layer: LayerState, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        """Pre-hook of a measured step: at the step's first BN forward, snapshot every layer;
        count the forward; at the layer's first, note its facts and, where the update does not
        give the batch moments (not recovered), compute them from its input (one ``var_mean``:
        BN does not change its input, so the pre-hook sees what the forward normalizes); at a
        second of a recovered layer, copy the buffers its first update left."""
        if self._snapshot_due:
            self._snapshot_due = False
            self._take_snapshot()
        layer.calls += 1
        try:
            if layer.calls == 1:
                x = args[0] if args else None
                lay = self._before(layer, module, x)
                if not lay.recovered:
                    with torch.no_grad():
                        _batch_moments(layer, x)
            elif layer.calls == 2 and layer.layout is not None and layer.layout.recovered:
                # shared layer, or re-run by activation checkpointing: keep the first update
                layer.after = torch.cat(running_buffers(module))
        except Exception as err:  # the probe must never stop training
            self._fail(layer, err)

    def _take_snapshot(self) -> None:
        """:func:`_snapshot` of every layer; on an error, none (each pre-hook copies its own
        layer, as for a lazy one)."""
        try:
            with torch.no_grad():
                plan = self._plan
                if plan is None or not plan.holds(self.layers):
                    plan = self._plan = _SnapshotPlan(self.layers)
                self._snapshots = taken = plan.take()
                if None in taken:  # a group failed: keep no plan that holds it
                    self._plan = None
        except Exception:  # the probe must never stop training: the per-layer copy instead
            self._plan = None
            self._snapshots = []
            for layer in self.layers:
                layer.snapped = None

    def _before(self, layer: LayerState, m: _BatchNorm, x: Any) -> Layout:
        """At the layer's first forward of a measured step: the facts about it (its
        :class:`Layout`, :attr:`LayerState.modes`, ``frozen``, ``batch_size``); and, where the
        step's snapshot does not hold the layer (a lazy layer initialized by this forward's own
        pre-hook), one O(channels) copy (one ``torch.cat``) of what that forward starts from.

        The facts nearly always repeat from one measured step to the next: they are a function
        of the key below (input shape, both modes, momentum, eps, ``track_running_stats``,
        ``suspect``, whether gamma_0 is taken, the layer's place in the snapshot, which says
        which buffers it has, and the SyncBN world size) and of the warm-up reference
        :attr:`LayerState.initial` (by identity). While they are the same as at the last first
        forward the snapshot held, that one's layout is reused: the other facts it set are
        still in place (only this method writes them)."""
        if not isinstance(x, Tensor):
            x = tensor_input(x)  # raises
        if (layer.gamma0 is None and m.affine) or layer.initial is None:
            take_reference(layer)  # a lazy layer's own pre-hook, which runs first, initialized it
        if self._trace.running:
            layer.producer = self._trace.producer(x)
        world = 1
        if self._world_size is not None and m.training and isinstance(m, nn.SyncBatchNorm):
            world = self._world_size(m)  # SyncBN normalizes with moments over every rank
        key = (
            x.shape,
            m.training,
            self.model.training,
            m.momentum,
            m.eps,
            m.track_running_stats,
            layer.suspect,
            layer.gamma0 is not None and m.affine,
            layer.snapped,
            world,
        )
        facts = layer.facts
        if facts is not None and facts[0] == key and facts[2] is layer.initial:
            layer.layout = facts[1]
            return facts[1]
        lay = self._layout(layer, m, x, world)
        # kept only where the snapshot held the layer (and so says which buffers it has)
        layer.facts = None if layer.snapped is None else (key, lay, layer.initial)
        return lay

    def _layout(self, layer: LayerState, m: _BatchNorm, x: Tensor, world: int) -> Layout:
        """:meth:`_before` without a layout to reuse: every fact read afresh."""
        channels = int(x.shape[1]) if x.dim() > 1 else 0
        if channels < 1:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(x.shape)}")
        layer.modes = (m.training, self.model.training)
        if self.model.training:
            layer.frozen = not m.training
        count, batch_size = x.numel() / channels, float(x.shape[0])
        if world != 1:
            count, batch_size = count * world, batch_size * world
        layer.batch_size = batch_size
        running = running_buffers(m)
        tracked = bool(running) and m._buffers.get("num_batches_tracked") is not None
        momentum = m.momentum
        recoverable = (
            bool(running)
            and m.training
            and m.track_running_stats
            and momentum is not None
            and momentum >= stats.MIN_RECOVERY_FACTOR
        )
        affine = layer.gamma0 is not None and m.affine
        snap = layer.snapped
        if snap is None or (snap.running, snap.tracked, snap.affine) != (
            bool(running),
            tracked,
            affine,
        ):  # not in the snapshot (lazy): copy it now
            layer.snapped = None
            blocks = [*running, *tracked_buffer(m)] if tracked else list(running)
            if affine:  # num_batches_tracked: int64, promoted by the cat
                params = m._parameters  # Module.__getattr__ costs ~0.5 us a call
                blocks += [params["weight"].detach(), params["bias"].detach()]  # type: ignore[union-attr]
            if blocks:
                layer.before = torch.cat(blocks)
        fields = (  # in Layout's order; tuple.__new__: a NamedTuple's own __new__ costs ~1 us
            channels,
            recoverable and not layer.suspect,
            bool(running),
            affine,
            float(momentum or 0.0),
            count,
            m.eps,
            tracked,
            bool(running) and layer.has_initial(channels, tracked),
            -1.0 if momentum is None else float(momentum),
            recoverable,
        )
        lay = layer.layout = tuple.__new__(Layout, fields)
        return lay

    # -- a pooled step (stage val): every forward's input moments --------------------------------
    def _pool_input(self, layer: LayerState, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        """Pre-hook of a pooled step: add this forward's input moments to the layer's pool."""
        self._guarded(layer, _accumulate, layer, args[0])


def _snapshot(layers: list[LayerState]) -> list[tuple[Tensor, Tensor | None] | None]:
    """What each layer's first forward of a measured step starts from, for every layer at once,
    taken by the pre-hook of the step's first BN forward: the running buffers, gamma and beta
    with one ``torch.cat``, and ``num_batches_tracked`` with one ``torch.stack``, per device and
    dtype, instead of one ``torch.cat`` per layer. It is what each layer's first forward finds:
    gamma and beta do not change during a forward, and a layer's running buffers change only in
    its own forward. (Taken at the first BN forward rather than at :meth:`BNTap.start`: DDP
    with ``broadcast_buffers`` overwrites the buffers with rank 0's at the start of its forward,
    and a user's code may change them between ``start`` and the forward.)
    The counts are cast to the group's dtype, as each layer's own ``torch.cat`` would.
    :attr:`LayerState.snapped` says where each layer's values are
    (:func:`bnprobe.tap.packing.host_plan` reads them back into its raw vector).

    A layer not initialized yet (lazy) is left to its pre-hook, and so is every layer of a group
    whose copy fails (the pre-hook then copies it, or fails the layer as it would have).

    This is the snapshot without a plan kept from an earlier step: :meth:`BNTap._take_snapshot`
    keeps the :class:`_SnapshotPlan` and takes the same copies with it."""
    return _SnapshotPlan(layers).take()


class _SnapshotPlan:
    """Which tensors :func:`_snapshot` concatenates, in which group, and where each layer's
    values land (its :class:`Snapped`): the same from one measured step to the next unless a
    layer changes, so :class:`BNTap` keeps it and rebuilds it only when :meth:`holds` says
    it no longer describes the layers (rebuilding it costs ~3 us a layer, the check ~0.7).

    It depends on, per layer: whether it failed; which tensor objects its running buffers,
    ``num_batches_tracked``, weight and bias are (a buffer replaced or set to None, a module
    ``.to()``, which replaces buffers, ``load_state_dict(assign=True)``); whether gamma_0 is
    taken and ``affine``; whether its first block (running_mean, or the weight) is still lazy
    (it materializes in place); and of its first block the dtype, device and shape and of its
    last block the dtype (``.data = ...`` and ``Module.to()`` change these of a parameter
    without replacing the object). That is everything the grouping reads: the cat of the same
    tensor objects gives the same values, whatever was written into them since. The plan holds
    the objects, so ``is`` compares them (and keeps those a change replaced, O(channels) each,
    until the next measured step or :meth:`BNTap.detach`). ``Tensor._version`` cannot say any
    of this: BN's update bumps it every step."""

    __slots__ = ("entries", "groups", "snapped")

    def __init__(self, layers: list[LayerState]) -> None:
        groups: dict[tuple[int, torch.dtype, torch.dtype], _Group] = {}
        self.snapped: list[tuple[LayerState, Snapped]] = []
        self.entries: list[_Entry] = []
        """Per layer, what :meth:`holds` compares: (layer, failed, running_mean, running_var,
        affine, weight, bias, num_batches_tracked, first block, its metadata or None when
        lazy or absent, last block)."""
        for layer in layers:
            if layer.failed:
                self.entries.append((layer, True, *_NOTHING))
                continue
            m = layer.module
            buffers = m._buffers  # Module.__getattr__ costs ~0.5 us a call
            mean, var = buffers.get("running_mean"), buffers.get("running_var")
            blocks = [mean, var] if mean is not None and var is not None else []
            running = bool(blocks)
            affine = layer.gamma0 is not None and m.affine
            weight = bias = None
            if affine:
                params = m._parameters
                weight, bias = params["weight"], params["bias"]
                blocks += [weight, bias]  # type: ignore[list-item]
            nbt = buffers.get("num_batches_tracked") if running else None
            first = blocks[0] if blocks else None
            entry = (layer, False, mean, var, affine, weight, bias, nbt, first, None, None)
            if first is None or is_lazy(first):  # lazy layers initialize every tensor at once
                self.entries.append(entry)
                continue
            last = blocks[-1]  # (mean, var | gamma, beta): each pair is alike
            meta = (first.dtype, first.device, first.shape, last.dtype)
            self.entries.append((*entry[:9], meta, last))
            key = (first.get_device(), first.dtype, last.dtype)  # one cat dtype per group
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(len(groups), [0], [], [], [])
            count = -1
            if nbt is not None:
                count = len(group.counts)
                group.counts.append(nbt)
            offset = group.size[0]
            group.size[0] += first.numel() * len(blocks)
            group.tensors.extend(blocks)
            group.members.append(layer)
            # tuple.__new__: a NamedTuple's own __new__ costs ~0.4 us
            snap = tuple.__new__(
                Snapped, (running, count >= 0, affine, group.number, offset, count)
            )
            self.snapped.append((layer, snap))
        self.groups = list(groups.values())

    def holds(self, layers: list[LayerState]) -> bool:
        """Whether this plan still describes ``layers`` (see the class)."""
        if len(layers) != len(self.entries):
            return False
        for layer, entry in zip(layers, self.entries, strict=True):
            was, failed, mean, var, affine, weight, bias, nbt, first, meta, last = entry
            if layer is not was or layer.failed is not failed:
                return False
            if failed:
                continue
            m = layer.module
            buffers = m._buffers
            if buffers.get("running_mean") is not mean or buffers.get("running_var") is not var:
                return False
            if (layer.gamma0 is not None and m.affine) is not affine:
                return False
            if affine:
                params = m._parameters
                if params["weight"] is not weight or params["bias"] is not bias:
                    return False
            running = mean is not None and var is not None
            if running and buffers.get("num_batches_tracked") is not nbt:
                return False
            if meta is None:
                if first is not None and not is_lazy(first):
                    return False
                continue
            if (first.dtype, first.device, first.shape, last.dtype) != meta:
                return False
        return True

    def take(self) -> list[tuple[Tensor, Tensor | None] | None]:
        """This step's snapshot: per group, its values and update counts (None where the copy
        failed); sets each layer's :attr:`LayerState.snapped`."""
        for layer, snap in self.snapped:
            layer.snapped = snap
        taken: list[tuple[Tensor, Tensor | None] | None] = []
        for group in self.groups:
            try:
                values = torch.cat(group.tensors)
                counts = torch.stack(group.counts).to(values.dtype) if group.counts else None
            except Exception:  # the pre-hooks copy these layers one by one
                for layer in group.members:
                    layer.snapped = None
                taken.append(None)
            else:
                taken.append((values, counts))
        return taken


_Entry = tuple[Any, ...]
_NOTHING = (None, None, False, None, None, None, None, None, None)


class _Group(NamedTuple):
    """The layers of one device and dtype in a snapshot."""

    number: int
    size: list[int]
    """[values so far]"""
    tensors: list[Tensor]
    counts: list[Tensor]
    """num_batches_tracked of the layers that have it."""
    members: list[LayerState]


def _numel(tensors: list[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def _batch_moments(layer: LayerState, x: Any) -> None:
    """Where the update does not give the batch moments: compute them (one ``var_mean``)."""
    layer.after = torch.cat(stats.raw_moments(tensor_input(x)))


def _accumulate(layer: LayerState, x: Any) -> None:
    batch = stats.batch_moments(tensor_input(x))
    layer.pooled = batch if layer.pooled is None else stats.combine(layer.pooled, batch)


def _finish_pool(layer: LayerState) -> None:
    """A pooled layer's raw vector: the running stats in use and the pooled input moments,
    laid out as a directly measured layer without affine parameters."""
    m, pooled = layer.module, layer.pooled
    assert pooled is not None
    running = m.running_mean is not None and m.running_var is not None
    tracked = tracked_buffer(m)
    if running:
        assert m.running_mean is not None and m.running_var is not None
        layer.before = torch.cat([m.running_mean, m.running_var, *tracked])
    layer.after = torch.cat([pooled.mean, pooled.var])
    layer.layout = Layout(
        channels=pooled.mean.numel(),
        recovered=False,
        running=running,
        affine=False,
        factor=0.0,
        samples=pooled.n,
        eps=float(m.eps),
        tracked=running and bool(tracked),
        reference=running and layer.has_initial(pooled.mean.numel(), bool(tracked)),
        momentum=-1.0 if m.momentum is None else float(m.momentum),
    )
