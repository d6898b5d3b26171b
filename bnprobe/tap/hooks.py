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

import copy
import time
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
    ill_check,
    ill_conditioned,
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

BLOCK_STEPS = 16
"""The most measured training steps :meth:`BNTap.keep` processes in one block: the fixed cost
of a measured step (numpy calls on small arrays, row building, each sink's call) is paid once
per block."""
BLOCK_VALUES = 8192
"""The most values per quantity (steps x channels) that a block's segments and metrics are
computed over at once: a larger block is computed a few steps at a time (:func:`_block_metrics`),
so that its arrays (64 KiB each) stay in the cache, where the training step between two blocks
has left little. Blocks of 16 steps of up to 512 channels take one go; at 8192 channels (256
layers of 32), between training steps, processing a block took 2.5-2.7 ms a measured step at
once and 1.2-1.7 ms one step at a time (process CPU time, alternated runs)."""
MAX_BLOCK_SPAN = 32
"""A block ends before the next measured step would be more than this many training steps
after its first: at ``every_n_steps`` above it (the default 50 included), every measured step
is processed at once, and TensorBoard never lags more than this many steps."""
MAX_BLOCK_AGE_S = 2.0
"""... or more than this many seconds after its first (slow steps are processed at once)."""


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
        block: int = BLOCK_STEPS,
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
        """The last measured step's plan and what it was made of (:meth:`_prepare`)."""
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"BNTap(block=...) must be a positive int; got {block!r}")
        self.block = block
        """The most measured training steps :meth:`keep` processes in one block."""
        self._block: _Block | None = None
        self._kept: tuple[int, float] | None = None
        """The step and time of the last step :meth:`keep` or :meth:`collect` took."""

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
        """Stop measuring and return what this step measured (one host transfer per device),
        after the rows of any steps kept by :meth:`keep` and not processed yet; no rows of
        this step without a :meth:`start` first."""
        snap = self._take(step, epoch, rank, stage, hold=False)
        assert snap is not None
        return snap

    def keep(self, *, step: int, epoch: int = 0, rank: int = 0) -> Snapshot | None:
        """:meth:`collect` of a measured training step, processed in a block of steps: the
        step's values are kept (one transfer to the host, and the check that decides whether
        the next measured step recovers each layer's moments, so that nothing the next step
        measures depends on the block) and the block is processed in one go when it ends. It
        ends when it holds ``block`` steps (the constructor's), when a step has another plan
        (layers, layouts, snapshot groups, references, structure), when the next measured
        step would come more than :data:`MAX_BLOCK_SPAN` steps or :data:`MAX_BLOCK_AGE_S`
        seconds after the block's first, or when :meth:`drain` (or :meth:`collect`) is
        called. Returns the rows of the steps processed now (None: the step was kept). The
        rows are those :meth:`collect` would have given each step, bit for bit."""
        return self._take(step, epoch, rank, "train", hold=True)

    def drain(self) -> Snapshot | None:
        """The rows of the steps kept by :meth:`keep` and not processed yet (None: none). The
        drivers call it wherever anyone needs the rows: validation, the end of a training
        epoch, a checkpoint, the end of fit, a failure, and every read of the table."""
        if self._block is None:
            return None
        return self._finish()

    @property
    def pending(self) -> int:
        """Measured steps kept by :meth:`keep` and not processed yet."""
        return 0 if self._block is None else len(self._block.steps)

    def _take(self, step: int, epoch: int, rank: int, stage: str, *, hold: bool) -> Snapshot | None:
        self.active = self._snapshot_due = False
        self._trace.stop()
        done: list[Snapshot] = []
        if not self._started:
            if self._block is not None:
                done.append(self._finish())
            done.append(Snapshot([Rows(step, epoch, stage, rank, [], [], [])]))
            return _joined(done)
        self._started = False
        if self._pooling:
            if self._block is not None:
                done.append(self._finish())
            done.append(self._pooled(step, epoch, rank, stage))
            return _joined(done)
        prep = self._prepare([lay for lay in self.layers if not lay.failed])
        while prep is not None:  # this step's plan; a block of another plan ends first
            step_plan, ok, layouts, raw, refs = prep
            placeholder = build.LayerMetrics(ok, layouts, _NO_TABLE)
            rkey = build.row_key(self.layers, placeholder, False)
            if self._block is None or self._block.takes(step_plan, refs, rkey, stage, rank):
                break
            done.append(self._finish())
            if not any(layer.failed for layer in ok):
                break
            # processing that block turned layers off: this step goes without them, as it
            # would have one step at a time
            prep = self._prepare([lay for lay in self.layers if not lay.failed])
        self._snapshots, self._snapshot_due = [], False
        if prep is None:  # nothing measured: the step's structure rows alone, in order
            if self._block is not None:
                done.append(self._finish())
            rows = build.layer_rows(
                step, epoch, stage, rank, self.layers, None, False, self._row_memo
            )
            done.append(Snapshot([rows]))
            return _joined(done)
        block = self._block
        now = time.monotonic()
        if block is None:
            row_plan, structure = build.row_plan(
                self.layers, placeholder, False, self._row_memo, rkey
            )
            block = self._block = _Block(
                step_plan, ok, layouts, refs, rkey, row_plan, structure, stage, rank, now
            )
        block.steps.append(step)
        block.epochs.append(epoch)
        block.raws.append(raw)
        previous, self._kept = self._kept, (step, now)
        if not hold or self._ends(block, previous, step, now):
            done.append(self._finish(check=True))  # this step's recovery check made there
            return _joined(done)
        try:  # kept: whether the next step recovers each layer must be known now
            self._check_recovery(step_plan, ok, layouts, raw, refs)
        except Exception as err:  # the probe must never stop training: one warning, every layer
            for layer in ok:
                self._fail(layer, err)
        return _joined(done) if done else None

    def _ends(
        self, block: _Block, previous: tuple[int, float] | None, step: int, now: float
    ) -> bool:
        """Whether the block ends with the step just kept: full, or the next measured step
        (expected as far after this one as this one came after the one before) would make it
        span more than :data:`MAX_BLOCK_SPAN` steps or :data:`MAX_BLOCK_AGE_S` seconds."""
        if len(block.steps) >= self.block or previous is None:
            return True
        gap, interval = step - previous[0], now - previous[1]
        if gap <= 0:
            return True
        return step + gap - block.steps[0] > MAX_BLOCK_SPAN or (
            now + interval - block.born > MAX_BLOCK_AGE_S
        )

    def _pooled(self, step: int, epoch: int, rank: int, stage: str) -> Snapshot:
        """A pooled (validation) step's rows, processed at once."""
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
            channels = build.channel_vectors(ok, seg.channels, chan)
            if self.per_channel:
                parts.append(build.channel_rows(ok, seg.channels, chan, step, epoch, stage, rank))
        return Snapshot(parts, channels)

    def _finish(self, *, check: bool = False) -> Snapshot:
        """Process the kept block in one go: the steps' metrics, a few steps at a time
        (:func:`_block_metrics`: :meth:`Plan.block_segments`, then
        :func:`bnprobe.stats.segment_metrics` over every (step, layer)), one block of rows;
        per-channel vectors (histograms) and rows per step. ``check``: the block ends with
        the step being collected, whose recovery check (:meth:`_check_recovery`, every
        earlier step's made when it was kept) is made now, from that step alone."""
        block = self._block
        assert block is not None
        self._block = None
        k = len(block.steps)
        ok = block.ok
        try:
            matrix, chan = _block_metrics(block, self.keep_channels)
            if check:  # the last step's layers: the next step's choice
                self._check_recovery(block.plan, ok, block.layouts, block.raws[-1], block.refs)
        except Exception as err:  # the probe must never stop training: one warning, every layer
            if k > 1:  # only what one step at a time would have lost is lost
                return self._finish_steps(block, check)
            for layer in ok:
                self._fail(layer, err)
            return Snapshot([])
        first_step, first_epoch = block.steps[0], block.epochs[0]
        steps: list[int] | int = block.steps if k > 1 else first_step
        epochs: list[int] | int = block.epochs if k > 1 else first_epoch
        assert block.row_plan is not None
        rows = build.block_rows(
            block.steps, block.epochs, block.stage, block.rank, matrix, block.row_plan,
            block.structure,
        )  # fmt: skip
        parts = [rows]
        if not self.keep_channels:
            return Snapshot(parts)
        pairs = list(zip(ok, block.layouts, strict=True))
        sizes = block.plan.channels
        if self.per_channel:
            parts.append(
                build.channel_rows(pairs, sizes, chan, steps, epochs, block.stage, block.rank)
            )
        if k == 1:
            return Snapshot(parts, build.channel_vectors(pairs, sizes, chan))
        width = int(sizes.sum())
        history: list[tuple[str, int, build.ChannelVectors]] = []
        for i, step in enumerate(block.steps):
            part = {name: vec[i * width : (i + 1) * width] for name, vec in chan.items()}
            history.append((block.stage, step, build.channel_vectors(pairs, sizes, part)))
        return Snapshot(parts, history[-1][2], history)

    def _finish_steps(self, block: _Block, check: bool) -> Snapshot:
        """:meth:`_finish` of a block whose processing failed, one step at a time, as if each
        step had been processed when it was kept: the steps before the first that fails give
        their rows; that one turns its layers off with one warning, and it and the later
        steps give the rows of a step that measured nothing, as those layers, off, would have."""
        done: list[Snapshot] = []
        failed = False
        for i, (step, epoch) in enumerate(zip(block.steps, block.epochs, strict=True)):
            if not failed:
                self._block = block.alone(i)
                snap = self._finish(check=check and i == len(block.steps) - 1)
                if snap.parts:
                    done.append(snap)
                    continue
                failed = True
            rows = build.layer_rows(
                step, epoch, block.stage, block.rank, self.layers, None, False, self._row_memo
            )
            done.append(Snapshot([rows]))
        return _joined(done)

    def _prepare(self, measured: list[LayerState]) -> _Prepared | None:
        """A measured step's values on the host, and its plan: the measured layers' pieces
        moved in one transfer per device. None: nothing measured (or all of it failed)."""
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
            return None
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
            return None
        if raw.size + refs.size != step_plan.size:  # a layer measured what its layout does not say
            kept = self._sized(ok)
            if len(kept) < len(ok):
                return self._prepare(kept)
            odd = RuntimeError(f"measured {raw.size} values, the plan reads {step_plan.size}")
            for layer in ok:
                self._fail(layer, odd)
            return None
        return _Prepared(step_plan, ok, layouts, raw, refs)

    def _check_recovery(
        self,
        step_plan: Plan,
        ok: list[LayerState],
        layouts: list[Layout],
        raw: np.ndarray,
        refs: np.ndarray,
    ) -> None:
        """Set each recoverable layer's ``suspect``: whether recovering its moments from the
        update is ill-conditioned at this step (then the next measured step computes them
        directly). The values :meth:`Plan.segments` gives, from the recoverable channels
        alone (:func:`bnprobe.tap.packing.ill_conditioned`): made for each step
        :meth:`keep` holds for a block, so that the next measured step measures exactly as it
        would if this one had been processed at once."""
        if not step_plan.any_recoverable:
            return
        check = ill_check(step_plan)
        if check is not None and check.reads < raw.size:
            flags = ill_conditioned(check, raw).tolist()
            for at, ill in zip(check.layers, flags, strict=True):
                ok[at].suspect = bool(ill)
            return
        seg = step_plan.segments(raw, refs)  # a row beyond the transfer: the whole way
        if seg.ill_conditioned is not None:
            _set_suspect(ok, layouts, seg.ill_conditioned)

    def _host_metrics(
        self, measured: list[LayerState]
    ) -> tuple[
        build.LayerMetrics | None,
        list[tuple[LayerState, Layout]],
        stats.Segments | None,
        dict[str, np.ndarray],
    ]:
        """The metrics of the measured layers of a pooled step (:meth:`_prepare`, then
        :func:`bnprobe.stats.segment_metrics` at once) and, for the per-channel vectors and
        rows, the layers measured, their segments and per-channel vectors (None, [], None, {}
        when none)."""
        prep = self._prepare(measured)
        if prep is None:
            return None, [], None, {}
        step_plan, ok, layouts, raw, refs = prep
        try:
            seg = step_plan.segments(raw, refs, ill=False)
            table, per = stats.segment_metrics(seg)
        except Exception as err:  # the probe must never stop training: one warning, every layer
            for layer in ok:
                self._fail(layer, err)
            return None, [], None, {}
        out = build.layer_metrics(ok, layouts, table)
        chan: dict[str, np.ndarray] = {}
        if self.keep_channels:
            chan = _channel_columns(seg, per)
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


class _Prepared(NamedTuple):
    """A measured step on the host (:meth:`BNTap._prepare`)."""

    plan: Plan
    ok: list[LayerState]
    layouts: list[Layout]
    raw: np.ndarray
    refs: np.ndarray


_NO_TABLE = np.empty((0, 0))
_NO_TABLE.setflags(write=False)


class _Block:
    """Measured training steps kept by :meth:`BNTap.keep`, all of one plan: their transfers,
    steps and epochs, and what their rows are made of (the same for every step)."""

    __slots__ = (
        "born", "epochs", "layouts", "ok", "plan", "rank", "raws", "refs", "rkey",
        "row_plan", "stage", "steps", "structure",
    )  # fmt: skip

    def __init__(
        self,
        plan: Plan,
        ok: list[LayerState],
        layouts: list[Layout],
        refs: np.ndarray,
        rkey: object,
        row_plan: Any,
        structure: np.ndarray,
        stage: str,
        rank: int,
        born: float,
    ) -> None:
        self.plan, self.ok, self.layouts, self.refs = plan, ok, layouts, refs
        self.rkey, self.row_plan, self.structure = rkey, row_plan, structure
        self.stage, self.rank, self.born = stage, rank, born
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.raws: list[np.ndarray] = []

    def alone(self, i: int) -> _Block:
        """The block of its ``i``-th step alone."""
        one = copy.copy(self)
        one.steps, one.epochs, one.raws = [self.steps[i]], [self.epochs[i]], [self.raws[i]]
        return one

    def takes(self, plan: Plan, refs: np.ndarray, rkey: object, stage: str, rank: int) -> bool:
        """Whether a step of this plan, references, rows, stage and rank joins the block."""
        return (
            plan is self.plan
            and refs is self.refs
            and stage == self.stage
            and rank == self.rank
            and rkey == self.rkey
        )


def _block_metrics(block: _Block, channels: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A block's (k x layers, metrics) matrix (:func:`bnprobe.tap.rows.layer_metrics`) and,
    with ``channels``, its per-channel columns (:func:`_channel_columns`, k x channels values
    each), computed :data:`BLOCK_VALUES` at a time (:meth:`Plan.block_segments` and
    :func:`bnprobe.stats.segment_metrics` of a few steps, one after the other): every value is
    computed from the same inputs by the same elementwise formulas, whichever steps it is
    computed with. Each part's columns are copied into the block's at once: kept, they would
    keep alive the part's temporaries they are views of, and the next part would take fresh
    memory (page faults) instead of reusing theirs."""
    plan, raws = block.plan, block.raws
    k, width = len(raws), int(plan.channels.sum())
    n = max(1, BLOCK_VALUES // max(1, width))  # steps at a time
    matrices: list[np.ndarray] = []
    chan: dict[str, np.ndarray] = {}
    for at in range(0, k, n):
        seg = plan.block_segments(raws[at : at + n], block.refs)
        table, per = stats.segment_metrics(seg)
        matrices.append(build.layer_metrics(block.ok, block.layouts, table).table)
        if not channels:
            continue
        columns = _channel_columns(seg, per)
        if n >= k:
            chan = columns
            break
        if not chan:
            chan = {name: np.empty(k * width, column.dtype) for name, column in columns.items()}
        for name, column in columns.items():
            chan[name][at * width : at * width + column.size] = column
    return (matrices[0] if len(matrices) == 1 else np.concatenate(matrices)), chan


def _channel_columns(seg: stats.Segments, per: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's (or a block's) per-channel columns: the segments' moments and parameters and
    the per-channel metrics of :func:`bnprobe.stats.segment_metrics`."""
    chan = {"batch_mean": seg.mean, "batch_var": seg.var, "running_mean": seg.mu_r}
    return chan | {"running_var": seg.var_r, "gamma": seg.gamma, "beta": seg.beta, **per}


def _set_suspect(ok: list[LayerState], layouts: list[Layout], ill: np.ndarray) -> None:
    """Each recoverable layer's ``suspect`` from its step's ill-conditioned flag: whether the
    next measured step computes its moments directly."""
    for layer, lay, flag in zip(ok, layouts, ill.tolist(), strict=True):
        if lay.recoverable:
            layer.suspect = bool(flag)


def _joined(snaps: list[Snapshot]) -> Snapshot:
    """Snapshots one after the other as one (their rows in order, each step's channels)."""
    if len(snaps) == 1:
        return snaps[0]
    parts = [part for snap in snaps for part in snap.parts]
    history = [entry for snap in snaps for entry in snap.step_channels()]
    return Snapshot(parts, history[-1][2] if history else None, history)


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
