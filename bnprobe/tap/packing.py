"""Host packing: each measured layer's values as one raw vector, and how to read them back.

On a measured step every layer leaves a few tensors (:func:`raw_pieces`) whose concatenation is
its *raw vector*, laid out as its :class:`Layout` says. :func:`to_host` moves all layers' raw
vectors to the host in one transfer per device, and the :class:`Plan` of the step's layouts turns
that one float64 array into :class:`bnprobe.stats.Segments` with one numpy gather, however many
layers there are.

May import torch, numpy, :mod:`bnprobe.stats` and :mod:`bnprobe.tap.layers`; no Lightning, no
TensorBoard, no pandas.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bnprobe import stats
from bnprobe.tap.layers import LayerState, Snapped, running_buffers


class Layout(NamedTuple):
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


def raw_pieces(layer: LayerState) -> list[Tensor] | None:
    """The tensors whose concatenation is the layer's raw vector (:class:`Layout`), without its
    first blocks where the step's snapshot holds them (:attr:`LayerState.snapped`,
    :func:`snapshot_order`), or None when its first forward of the step did not finish: what
    it measured (:func:`live_pieces`), then its references (:func:`reference_pieces`)."""
    live = live_pieces(layer)
    if live is None:
        return None
    assert layer.layout is not None
    return [*live, *reference_pieces(layer, layer.layout)]


def pieces_size(lay: Layout, snapped: Snapped | None) -> int:
    """The length of what :func:`raw_pieces` gives for a layer of this layout."""
    if snapped is None:
        return lay.size
    return lay.size - lay.channels * (2 * lay.running + 2 * lay.affine) - lay.tracked


def reference_size(lay: Layout) -> int:
    """The length of the references that end a layer's raw vector (:class:`Layout`): gamma_0
    and beta_0 (``affine``), the warm-up reference (``reference``)."""
    return lay.channels * (2 * lay.affine + 2 * lay.reference) + lay.tracked * lay.reference


def live_pieces(layer: LayerState) -> list[Tensor] | None:
    """:func:`raw_pieces` without the references at its end (:func:`reference_pieces`): what
    this step measured, which goes to the host every step."""
    lay = layer.layout
    if lay is None:
        return None
    before, after = layer.before, layer.after
    if after is None:
        if not lay.recovered:
            return None
        after_pieces = running_buffers(layer.module)  # the buffers as that forward left them
        return after_pieces if before is None else [before, *after_pieces]
    return [after] if before is None else [before, after]


def reference_pieces(layer: LayerState, lay: Layout) -> list[Tensor]:
    """The references that end the layer's raw vector: gamma_0, beta_0 and the warm-up
    reference, those its layout has. They change only when taken or restored (new tensors):
    :class:`HostReferences` keeps their host copy."""
    pieces = []
    if lay.affine:
        assert layer.gamma0 is not None and layer.beta0 is not None
        pieces += [layer.gamma0, layer.beta0]
    if lay.reference:
        assert layer.initial is not None
        pieces.append(layer.initial)
    return pieces


class HostReferences:
    """The host copy (float64) of the step's references (:func:`reference_pieces` of every
    layer, concatenated), kept while they are the same tensor objects: gamma_0, beta_0 and the
    initial running buffers are taken once (:func:`bnprobe.tap.layers.take_reference`, or a
    lazy layer's first forward) or restored (:func:`bnprobe.tap.layers.restore_references`),
    each time as new tensors, and never changed in place. So a step moves only what it
    measured to the host; the references join it there."""

    def __init__(self) -> None:
        self._tensors: list[Tensor] = []
        self._host = np.empty(0)

    def host(self, tensors: list[Tensor]) -> np.ndarray:
        """``to_host(tensors)``, from the copy kept when they are the same objects as last
        time. Read-only."""
        kept = self._tensors
        if len(kept) != len(tensors) or not all(map(operator.is_, kept, tensors)):
            host = to_host(tensors) if tensors else np.empty(0)
            host.setflags(write=False)
            self._tensors, self._host = list(tensors), host
        return self._host


@lru_cache(maxsize=16)
def host_plan(
    layouts: tuple[Layout, ...],
    snapped: tuple[Snapped | None, ...],
    groups: tuple[tuple[int, int], ...],
) -> Plan:
    """The :class:`Plan` of these layouts reading the host array as it arrives: each snapshot
    group's values and update counts first (``groups``: their sizes, in group order), then each
    layer's :func:`live_pieces`, then every layer's :func:`reference_pieces` (its
    :attr:`Plan.size` is that array's). Cached: steps nearly always repeat."""
    base = plan(layouts)
    order, size = snapshot_order(layouts, snapped, groups)
    if order is None:
        return base
    index = np.concatenate([order, (size, size + 1)])[base.index]  # [*raw, 0, nan] -> host
    index.setflags(write=False)
    return replace(base, index=index, size=size)


def snapshot_order(
    layouts: tuple[Layout, ...],
    snapped: tuple[Snapped | None, ...],
    groups: tuple[tuple[int, int], ...],
) -> tuple[np.ndarray | None, int]:
    """Where each value of the layers' raw vectors (:class:`Layout`, in layer order) sits in
    what the host receives (:func:`host_plan`: the snapshot, the live pieces, the references),
    and the size of the latter: ``host[order]`` is the layers' concatenated raw vectors (order
    None: the host array is them already)."""
    bases, at = [], 0
    for values, counts in groups:
        bases.append((at, at + values))
        at += values + counts
    order: list[np.ndarray] = []
    tails: list[tuple[int, int, int]] = []  # (place in order, first reference value, length)
    refs = 0
    for lay, snap in zip(layouts, snapped, strict=True):
        if snap is not None:
            c, (values, counts) = lay.channels, bases[snap.group]
            first = values + snap.offset
            if lay.running:
                order.append(np.arange(first, first + 2 * c))
                first += 2 * c
            if lay.tracked:
                order.append(np.array([counts + snap.count_at]))
            if lay.affine:
                order.append(np.arange(first, first + 2 * c))
        tail = reference_size(lay)
        n = pieces_size(lay, snap) - tail
        order.append(np.arange(at, at + n))
        at += n
        if tail:
            tails.append((len(order), refs, tail))
            order.append(np.empty(0, dtype=np.int64))
            refs += tail
    if not refs and not any(values + counts for values, counts in groups):
        return None, at
    for place, first, n in tails:  # the references follow every live piece
        order[place] = np.arange(at + first, at + first + n)
    return np.concatenate(order), at + refs


def to_host(tensors: list[Tensor]) -> np.ndarray:
    """Concatenate 1-d tensors into one float64 host array, with one transfer per device."""
    try:  # one device (nearly always): one cat, one transfer
        return torch.cat(tensors).to("cpu", torch.float64).numpy()
    except RuntimeError:
        devices = {t.device for t in tensors}
        if len(devices) == 1:
            raise
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


QUANTITIES = (
    "mean_old",
    "var_old",
    "mean_new",
    "var_new",
    "running_mean",
    "running_var",
    "gamma",
    "beta",
    "gamma0",
    "beta0",
    "initial_mean",
    "initial_var",
    "tracked",
    "initial_tracked",
)
"""The per-channel quantities a :class:`Plan` gathers, in the order of its index rows.

``mean_old``/``var_old``: the running moments before the update (recovered layers; 0 for the
others); ``mean_new``/``var_new``: the running moments after it (recovered layers) or the batch
moments themselves; ``running_mean``/``running_var``: the running moments the forward started
from; ``gamma``/``beta`` and ``gamma0``/``beta0`` (drift reference); ``initial_mean``/
``initial_var`` (warm-up reference); ``tracked``/``initial_tracked``: ``num_batches_tracked`` now
and at the warm-up reference, repeated per channel. NaN where a layer lacks the quantity."""


@dataclass(frozen=True, eq=False)
class Plan:
    """Where each per-channel quantity of a set of layer layouts sits in their concatenated raw
    vectors: one row of indices into ``[*raw, 0.0, nan]`` per quantity (:data:`QUANTITIES`), so
    that a step's :class:`stats.Segments` take one numpy gather however many layers there are.

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
    size: int
    """The length of the host array it reads: the layouts' concatenated raw vectors, or with
    :func:`host_plan` the step's snapshot's values before them."""

    bessel: np.ndarray
    """``(n-1)/n`` of ``count`` (:func:`bnprobe.stats.bessel`), for the recovery."""
    bound_factor: np.ndarray
    """The momentum where the update gives the moments (``recoverable``), else 1."""
    bound_bessel: np.ndarray
    """``(n-1)/n`` of ``samples``, for :func:`bnprobe.stats.recovery_ill_conditioned`."""
    any_recoverable: bool

    def segments(self, *host: np.ndarray, ill: bool = True) -> stats.Segments:
        """The step's :class:`bnprobe.stats.Segments` from the host array it reads, given in
        parts (the transfer, then the references: :class:`HostReferences`). ``ill=False``
        leaves :attr:`~bnprobe.stats.Segments.ill_conditioned` None (the tap checks it per
        step, :class:`IllCheck`, before it processes a block of steps)."""
        values = np.concatenate([*host, _ZERO_NAN])[self.index]
        return self._segments(values, 1, ill)

    def block_segments(self, raws: list[np.ndarray], refs: np.ndarray) -> stats.Segments:
        """The :class:`bnprobe.stats.Segments` of k steps of these layouts at once, one after
        the other (per-layer quantities are per (step, layer) segment), from each step's
        transfer and the references they share. Each step's values are gathered through this
        plan's own index into a (quantities, k, channels) array, so that each quantity is one
        contiguous row of k x channels values, and every per-channel constant broadcasts over
        the steps: each channel's values are computed by the same elementwise formulas from the
        same inputs as :meth:`segments` of each step alone, bit for bit, and nothing of size
        k x channels is kept between blocks. Without
        :attr:`~bnprobe.stats.Segments.ill_conditioned`: the tap checks each step as it keeps it
        (:func:`ill_conditioned`)."""
        k = len(raws)
        if k == 1:
            return self.segments(raws[0], refs, ill=False)
        # (quantities, k, channels): each step gathered as :meth:`segments` gathers it, into
        # its place, so that each quantity's k x channels values are one contiguous row
        values = np.empty((len(self.index), k, self.index.shape[1]))
        for i, raw in enumerate(raws):
            values[:, i] = np.concatenate([raw, refs, _ZERO_NAN])[self.index]
        return self._segments(values, k, False)

    def _segments(self, values: np.ndarray, k: int, ill: bool) -> stats.Segments:
        """:meth:`segments` (``values``: quantities x channels, ``k`` 1) or
        :meth:`block_segments` (quantities x k x channels, ``ill`` False) from the gathered
        values."""
        (
            mean_old,
            var_old,
            mean_new,
            var_new,
            running_mean,
            running_var,
            gamma,
            beta,
            gamma0,
            beta0,
            initial_mean,
            initial_var,
            tracked,
            initial_tracked,
        ) = values
        mean, var = stats.recover_moments(
            mean_old, var_old, mean_new, var_new, self.factor, self.count, bessel=self.bessel
        )

        def flat(x: np.ndarray) -> np.ndarray:  # (k, channels) -> one row of k x channels
            return x if k == 1 else x.reshape(-1)  # contiguous: a view

        def tiled(x: np.ndarray) -> np.ndarray:  # a per-channel constant, for each step
            return x if k == 1 else np.tile(x, k)

        channels = tiled(self.channels)
        seg = stats.Segments(
            channels,
            flat(mean),
            flat(var),
            flat(running_mean),
            flat(running_var),
            tiled(self.eps),
            flat(gamma),
            flat(beta),
            flat(gamma0),
            flat(beta0),
        )
        seg.running = tiled(self.running)
        seg.mean0, seg.var0 = flat(initial_mean), flat(initial_var)
        seg.n0, seg.n = flat(initial_tracked), flat(tracked)
        seg.momentum, seg.per_layer_counts = tiled(self.momentum), True
        if ill and self.any_recoverable:
            ill_channels = stats.recovery_ill_conditioned(
                running_mean,
                running_var,
                mean,
                var,
                self.bound_factor,
                self.samples,
                bessel=self.bound_bessel,
            )
            seg.ill_conditioned = np.add.reduceat(ill_channels & self.recoverable, self.starts) > 0
        return seg


class IllCheck(NamedTuple):
    """What :func:`ill_check` needs of a :class:`Plan` to say, from one step's transfer alone,
    which recoverable layers' recovery is ill-conditioned: the part of
    :meth:`Plan.segments` that decides :attr:`bnprobe.tap.layers.LayerState.suspect` (whether
    the next measured step computes a layer's moments directly), restricted to the channels of
    the recoverable layers. The tap runs it at every measured step, so that processing steps
    in blocks never delays that decision."""

    rows: np.ndarray
    """(6, n): mean_old, var_old, mean_new, var_new, running_mean, running_var of the
    recoverable channels, into the transfer (the zeros of directly measured layers: 0)."""
    zero: np.ndarray | None
    """Where those rows read the 0.0 after the host array (None: nowhere)."""
    factor: np.ndarray
    keep: np.ndarray
    bessel: np.ndarray
    bound_factor: np.ndarray
    bound_keep: np.ndarray
    bound_bessel: np.ndarray
    starts: np.ndarray
    layers: tuple[int, ...]
    """The recoverable layers (their place in the plan's layouts)."""
    reads: int
    """The transfer must hold more than this many values (the largest index read)."""


_ILL_ROWS = tuple(QUANTITIES.index(q) for q in QUANTITIES[:6])


@lru_cache(maxsize=16)
def ill_check(base: Plan) -> IllCheck | None:
    """The :class:`IllCheck` of a plan (None: no layer is recoverable, or a row it needs
    lies beyond the transfer, which then goes the whole way, :meth:`Plan.segments`)."""
    if not base.any_recoverable:
        return None
    sel = np.flatnonzero(base.recoverable)
    # C order: the fancy index leaves it transposed, and every row of the check would be read
    # with a stride of six values (~0.2 ms more a step at 8192 channels)
    index = np.ascontiguousarray(base.index[list(_ILL_ROWS)][:, sel])
    zero_at = index == base.size
    if (index > base.size).any():
        return None
    clean = np.where(zero_at, 0, index)
    layers = tuple(
        i
        for i, (a, c) in enumerate(zip(base.starts.tolist(), base.channels.tolist(), strict=True))
        if c and base.recoverable[a]
    )
    sub = np.array([base.channels[i] for i in layers], dtype=np.int64)
    check = IllCheck(
        rows=clean,
        zero=zero_at if zero_at.any() else None,
        factor=base.factor[sel],
        keep=1.0 - base.factor[sel],
        bessel=base.bessel[sel],
        bound_factor=base.bound_factor[sel],
        bound_keep=1.0 - base.bound_factor[sel],
        bound_bessel=base.bound_bessel[sel],
        starts=np.concatenate([[0], np.cumsum(sub)[:-1]]),
        layers=layers,
        reads=int(clean.max(initial=0)),
    )
    return check


def ill_conditioned(check: IllCheck, raw: np.ndarray) -> np.ndarray:
    """Per recoverable layer (:attr:`IllCheck.layers`): is recovering its moments
    ill-conditioned at this step? The values :meth:`Plan.segments` gives ``ill_conditioned``
    for those layers, bit for bit (the same elementwise formulas on the same values), from the
    step's transfer ``raw`` alone."""
    values = raw[check.rows]
    if check.zero is not None:
        values[check.zero] = 0.0
    ill = stats.recovered_ill_conditioned(
        values,
        check.factor,
        check.keep,
        check.bessel,
        check.bound_factor,
        check.bound_keep,
        check.bound_bessel,
    )
    out: np.ndarray = np.add.reduceat(ill, check.starts) > 0
    return out


_ZERO_NAN = np.array([0.0, np.nan])
_ZERO_NAN.setflags(write=False)


@lru_cache(maxsize=16)
def plan(layouts: tuple[Layout, ...]) -> Plan:
    """The :class:`Plan` of these layouts (they rarely change from step to step: cached)."""
    total = sum(lay.size for lay in layouts)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in QUANTITIES}
    offset = 0
    for lay in layouts:
        c = lay.channels
        zero, nan = np.full(c, total), np.full(c, total + 1)
        # the raw vector, in order: running (2 blocks) [tracked], affine (2), new (2),
        # affine0 (2), initial (2) [initial_tracked]; blocks of c values and two scalars
        blocks: list[np.ndarray] = []
        scalars = {"tracked": nan, "initial_tracked": nan}
        at = offset
        sequence = ["block", "block", "tracked"] if lay.running else []
        sequence += ["block"] * (4 * lay.affine + 2)
        sequence += ["block", "block", "initial_tracked"] if lay.reference else []
        for part in sequence:
            if part == "block":
                blocks.append(np.arange(at, at + c))
                at += c
            elif lay.tracked:
                scalars[part] = np.full(c, at)
                at += 1
        nblocks = (lay.size - lay.tracked * (lay.running + lay.reference)) // c
        assert at - offset == lay.size and len(blocks) == nblocks
        running = [blocks.pop(0), blocks.pop(0)] if lay.running else [nan, nan]
        affine = [blocks.pop(0), blocks.pop(0)] if lay.affine else [nan, nan]
        new = [blocks.pop(0), blocks.pop(0)]
        affine0 = [blocks.pop(0), blocks.pop(0)] if lay.affine else [nan, nan]  # gamma0, beta0
        initial = [blocks.pop(0), blocks.pop(0)] if lay.reference else [nan, nan]
        old = running if lay.recovered else [zero, zero]  # recovered: old and new running
        quantities = [*old, *new, *running, *affine, *affine0, *initial]
        quantities += [scalars["tracked"], scalars["initial_tracked"]]
        for key, idx in zip(QUANTITIES, quantities, strict=True):
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
    result = Plan(
        channels=channels,
        index=np.stack([np.concatenate(parts[key]) for key in QUANTITIES]),
        starts=np.concatenate([[0], np.cumsum(channels)[:-1]]),
        size=total,
        **repeated,
        **flags,
        bessel=stats.bessel(repeated["count"]),
        bound_factor=np.where(flags["recoverable"], repeated["momentum"], 1.0),
        bound_bessel=stats.bessel(repeated["samples"]),
        any_recoverable=bool(flags["recoverable"].any()),
    )
    for value in vars(result).values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)  # shared by every step of these layouts
    return result
