"""Bounded running state of one run for the diagnosis: :class:`Digest`.

The rules (``shifts``, ``batches``, ``parameters``, ``variance``, ``structure``) read a table.
A digest keeps the part of a run's table that they can be decided by, in memory bounded
independently of the run's length, updated as rows arrive (one measured step from the recorder,
or a batch of a parquet part from ``bnprobe report``), and hands the rules that table
(:meth:`Digest.table`), so that streaming and full-table diagnosis run the same code.

What it keeps, per stage:

* every row of the first ``head`` measured steps (first measurements: zero-init gammas, variance
  at the start, trace metrics, structure);
* every row of the latest ``tail`` measured steps (the rules judge the latest state: trailing
  stretches of bad rows, rolling medians over ``train_window`` steps, the latest probe);
* in between, per bucket of steps, only the (layer, step) rows some rule could be decided by:
  for each (rank, layer, metric) the bucket's first and last row, the first row where the value
  changes, the first non-finite value, and the first rows with the smallest and the largest
  value of the metrics in :data:`EXTREMES`; each kept (layer, step) keeps all its metrics and
  every rank, so wide rows stay whole. Neighbouring buckets are merged when more than ``buckets``
  exist (the pair spanning the fewest steps), so the middle stays bounded.

Per-channel rows are kept only where a rule reads them: non-finite values (``nonfinite``) and,
for tables without ``var_small_frac`` (bnprobe before 0.2), ``batch_var`` of stage train.

A run of at most ``head + tail`` measured steps per stage is kept whole: its findings are those of
the full table, by construction. On longer runs the kept rows are a subset, and what can differ
from the full table is listed in docs/diagnosis.md ("Streaming diagnosis"): counts of logged
steps quoted in messages, medians over the whole run (``small_batch``), and the first step of a
long stretch (never earlier than the full table's, later by at most :attr:`Digest.resolution`).
The step counts of the report's summary are exact (:meth:`Digest.steps`).

Kept rows are :class:`~bnprobe.diagnosis.buckets.Block` columns with stage, layer and metric as
integer codes into the digest's names (:meth:`Digest.encode`): grouping is integer arithmetic
(a bucket's rows are chosen in :mod:`bnprobe.diagnosis.buckets`) and a kept row costs no Python
string. :meth:`Digest.table` gives the names back.

This module imports no torch and no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.diagnosis.buckets import Block, concat, select, select_steps
from bnprobe.diagnosis.table import Columns
from bnprobe.store.constants import ANCHOR
from bnprobe.store.table import CONSTANT_METRICS, FrozenMemo

HEAD_STEPS = 32
"""Measured steps per stage kept whole from the start of a run."""
TAIL_STEPS = 128
"""Latest measured steps per stage kept whole."""
BUCKET_STEPS = 32
"""Steps per middle bucket when it is closed (before any merge)."""
MAX_BUCKETS = 16
"""Middle buckets per stage; beyond, the two neighbours spanning the fewest steps are merged."""

EXTREMES: frozenset[str] = frozenset(
    {
        "batch_var",
        "running_mean",
        "running_var",
        "mean_shift",
        "var_shift",
        "kl",
        "mean_shift_excess",
        "var_shift_excess",
        "local_gap",
        "logits_gap",
        "pred_agreement",
        "recal_pred_change",
        "batch_size",
        "samples_per_channel",
        "gamma_small_frac",
        "gamma_drift",
        "beta_drift",
        "var_small_frac",
        "rank_divergence",
        "nonfinite",
        "running_invalid",
        "forward_calls",
        "momentum",
        "train_mode",
        "has_running_stats",
        "input_dropout",
        "input_bias",
    }
)
"""Metrics whose smallest and largest value per bucket are kept (a rule compares them with a
threshold, or looks for their worst value)."""

READ_METRICS: frozenset[str] = EXTREMES | frozenset(
    {
        "batch_mean",
        "eps",
        "warmup_residual",
        "num_batches_tracked",
        "mean_shift_max",
        "var_shift_max",
        "mean_shift_excess_max",
        "var_shift_excess_max",
        "output_gap",
        "recal_logits_shift",
        "gamma_mean",
        "gamma_std",
        "beta_mean",
        "beta_std",
        "gamma",
        "beta",
        "model_train_mode",
    }
)
"""Every metric the rules and the report's summary read: ``bnprobe report`` reads only these."""

_NONFINITE = frozenset(
    {"batch_mean", "batch_var", "running_mean", "running_var", "gamma_mean", "gamma_std"}
    | {"beta_mean", "beta_std", "gamma", "beta"}
)
_COUNTS = frozenset({"nonfinite", "running_invalid"})
_SMALL_FRAC = frozenset({"var_small_frac"})
_BATCH_VAR = frozenset({"batch_var"})


def _full(n: int, value: Any, dtype: Any) -> np.ndarray:
    """``np.full(n, value, dtype)`` without its Python-level wrapper (a measured step makes a
    few of these for every block of rows)."""
    out = np.empty(n, dtype=dtype)
    out.fill(value)
    return out


class _Stage:
    """The kept rows of one stage."""

    def __init__(self) -> None:
        self.head: list[Block] = []
        self.head_steps: set[int] = set()
        self.tail: dict[int, list[Block]] = {}
        self.open: list[Block] = []
        self.open_steps: set[int] = set()
        self.buckets: list[tuple[int, int, Block]] = []  # (first step, last step, rows)


class Digest:
    """The bounded running state of one run that the rules are run on (module docstring).

    ``add`` rows as they arrive (:class:`bnprobe.store.Rows` or a table with the SPEC columns),
    then :meth:`diagnose` (or :meth:`table` for :func:`bnprobe.diagnose` and the report).
    """

    def __init__(
        self,
        *,
        head: int = HEAD_STEPS,
        tail: int = TAIL_STEPS,
        bucket_steps: int = BUCKET_STEPS,
        buckets: int = MAX_BUCKETS,
    ) -> None:
        for name, value in (("head", head), ("tail", tail), ("bucket_steps", bucket_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Digest {name} must be an integer >= 1; got {value!r}")
        if not isinstance(buckets, int) or buckets < 2:
            raise ValueError(f"Digest buckets must be an integer >= 2; got {buckets!r}")
        self.head, self.tail, self.bucket_steps, self.max_buckets = (
            head,
            tail,
            bucket_steps,
            buckets,
        )
        self.rows_seen = 0
        self._stages: dict[str, _Stage] = {}
        self._legacy = True  # no var_small_frac row seen yet: keep channel batch_var of train
        self._counts: dict[tuple[str, int], list[int]] = {}  # (stage, rank) -> [n, first, last]
        self._cache: pd.DataFrame | None = None
        self._names: list[str] = []  # stage, layer and metric names, by code
        self._vocab: dict[str, int] = {}
        self._seen: dict[tuple[str, ...], np.ndarray] = {}
        self._known = FrozenMemo()  # a frozen names column -> its codes
        self._luts: dict[frozenset[str], np.ndarray] = {}

    # -- feeding -------------------------------------------------------------------------------
    def add(self, rows: store.Rows | pd.DataFrame) -> None:
        """Take rows of the run (any number of steps; the steps of a stage in order)."""
        if isinstance(rows, store.Rows):
            self._add_rows(rows)
        else:
            self.add_columns(columns(rows))

    def add_columns(self, cols: dict[str, np.ndarray]) -> None:
        """Take rows given as numpy arrays, one per SPEC column (:func:`columns`)."""
        coded = dict(cols)
        for c in ("stage", "layer", "metric"):
            codes, names = pd.factorize(pd.Series(cols[c], dtype=object))
            coded[c] = self.encode(list(names))[codes]
        self.add_codes(coded)

    def add_codes(self, cols: dict[str, np.ndarray]) -> None:
        """:meth:`add_columns` with ``stage``, ``layer`` and ``metric`` as codes from
        :meth:`encode` (what ``bnprobe report`` gives, from the parquet dictionaries)."""
        for block in _blocks(cols, self):
            self._add_block(block)

    def encode(self, names: Sequence[str] | np.ndarray) -> np.ndarray:
        """The int32 codes of ``names`` in this digest (new names get new codes)."""
        vocab = self._vocab
        for name in names:
            if name not in vocab:
                vocab[name] = len(self._names)
                self._names.append(str(name))
        return np.fromiter((vocab[s] for s in names), np.int32, len(names))

    def _encode_seq(self, names: Sequence[str] | np.ndarray) -> np.ndarray:
        """:meth:`encode` of a step's names, remembered: a probe sends the same lists each
        step, so a measured step pays a tuple's hash instead of a lookup per row, and a column
        that cannot change (:func:`~bnprobe.store.table.frozen_names`: the tap's) seen before
        not even that."""
        known: np.ndarray | None = self._known.get(names)
        if known is not None:
            return known
        key = tuple(names.tolist() if isinstance(names, np.ndarray) else names)
        codes = self._seen.get(key)
        if codes is None:
            if len(self._seen) >= 16:
                self._seen.clear()
            codes = self._seen[key] = self.encode(key)
        self._known.put(names, codes)
        return codes

    def _is(self, names: frozenset[str]) -> np.ndarray:
        """Per code: whether its name is in ``names``."""
        lut = self._luts.get(names)
        if lut is None or len(lut) < len(self._names):
            lut = np.fromiter((n in names for n in self._names), bool, len(self._names))
            self._luts[names] = lut
        return lut

    def _add_rows(self, rows: store.Rows) -> None:
        n = len(rows.metrics)
        if n == 0:
            return
        if rows.multi:
            self._add_steps(rows)
            return
        value = np.asarray(rows.values, dtype=np.float64)
        metric = self._encode_seq(rows.metrics)
        layer = self._encode_seq(rows.layers)
        if rows.channels is None:
            channel = _full(n, -1, np.int64)
            if self._legacy and self._is(_SMALL_FRAC)[metric].any():
                self._legacy = False
            self._count(rows.stage, rows.rank, int(rows.step))
        else:
            keep = self._channel_keep(metric, value)
            if self._legacy and rows.stage == "train":
                keep |= self._is(_BATCH_VAR)[metric]
            if not keep.any():
                self.rows_seen += n
                return
            idx = np.flatnonzero(keep)
            value, metric, layer = value[idx], metric[idx], layer[idx]
            channel = np.asarray(rows.channels, dtype=np.int64)[idx]
        m = len(value)
        stage = self._vocab.get(rows.stage)
        if stage is None:
            stage = int(self.encode([rows.stage])[0])
        block = Block(
            np.arange(self.rows_seen, self.rows_seen + m, dtype=np.int64),
            _full(m, rows.step, np.int64),
            _full(m, rows.epoch, np.int64),
            _full(m, stage, np.int32),
            _full(m, rows.rank, np.int64),
            layer,
            channel,
            metric,
            value,
        )
        self.rows_seen += n
        self._put(rows.stage, int(rows.step), block)

    def _add_steps(self, rows: store.Rows) -> None:
        """:meth:`_add_rows` of rows of several steps (:attr:`bnprobe.store.Rows.multi`): layer
        rows of steps named alike (:meth:`~bnprobe.store.Rows.tiling`) encoded once and cut into
        one block per step; anything else step by step."""
        tiled = rows.tiling() if rows.channels is None else None
        if tiled is None:
            for part in rows.split():
                self._add_rows(part)
            return
        n, layers, metrics = tiled
        k = len(rows.metrics) // n
        metric = self._encode_seq(metrics)
        layer = self._encode_seq(layers)
        if self._legacy and self._is(_SMALL_FRAC)[metric].any():
            self._legacy = False
        stage = self._vocab.get(rows.stage)
        if stage is None:
            stage = int(self.encode([rows.stage])[0])
        value = np.asarray(rows.values, dtype=np.float64)
        step, epoch = np.asarray(rows.step), np.asarray(rows.epoch)
        seq = np.arange(self.rows_seen, self.rows_seen + k * n, dtype=np.int64)
        channel = _full(n, -1, np.int64)
        stages = _full(n, stage, np.int32)
        ranks = _full(n, rows.rank, np.int64)
        # Views of the block's columns: the kept steps (head, tail) hold at most a few blocks.
        for a in range(0, k * n, n):
            at = int(step[a])
            self._count(rows.stage, rows.rank, at)
            b = a + n
            block = Block(
                seq[a:b], step[a:b], epoch[a:b], stages, ranks, layer, channel, metric, value[a:b]
            )
            self._put(rows.stage, at, block)
        self.rows_seen += k * n

    def _channel_keep(self, metric: np.ndarray, value: np.ndarray) -> np.ndarray:
        """Per-channel rows kept: non-finite values of ``_NONFINITE``, counts above 0."""
        keep = ~np.isfinite(value)
        if keep.any():
            keep &= self._is(_NONFINITE)[metric]
        counted = value > 0
        if counted.any():
            keep |= counted & self._is(_COUNTS)[metric]
        return np.asarray(keep, dtype=bool)

    def _add_block(self, block: Block) -> None:
        """A block of one stage and one step, its seq not yet set."""
        n = block.n
        block = block._replace(seq=np.arange(self.rows_seen, self.rows_seen + n, dtype=np.int64))
        self.rows_seen += n
        self._put(self._names[int(block.stage[0])], int(block.step[0]), block)

    def _count(self, stage: str, rank: int, step: int) -> None:
        c = self._counts.get((stage, rank))
        if c is None:
            self._counts[(stage, rank)] = [1, step, step]
        elif step > c[2]:
            c[0] += 1
            c[2] = step
        elif step < c[1]:
            c[0] += 1
            c[1] = step

    def _put(self, stage: str, step: int, block: Block) -> None:
        self._cache = None
        st = self._stages.setdefault(stage, _Stage())
        if step in st.head_steps or (len(st.head_steps) < self.head and step not in st.tail):
            st.head_steps.add(step)
            st.head.append(block)
            return
        if step in st.open_steps:
            st.open.append(block)
            return
        st.tail.setdefault(step, []).append(block)
        while len(st.tail) > self.tail:
            oldest = min(st.tail)
            st.open += st.tail.pop(oldest)
            st.open_steps.add(oldest)
            if len(st.open_steps) >= self.bucket_steps:
                self._close(st)

    def _close(self, st: _Stage) -> None:
        extreme = self._is(EXTREMES)
        rows = select_steps(st.open, extreme)
        st.buckets.append((min(st.open_steps), max(st.open_steps), rows))
        st.open, st.open_steps = [], set()
        if len(st.buckets) > self.max_buckets:  # one merge per close: no spike of work
            spans = [st.buckets[i + 1][1] - st.buckets[i][0] for i in range(len(st.buckets) - 1)]
            i = int(np.argmin(spans))
            (a, _, x), (_, b, y) = st.buckets[i], st.buckets[i + 1]
            st.buckets[i : i + 2] = [(a, b, select(concat([x, y]), extreme))]

    # -- reading -------------------------------------------------------------------------------
    @property
    def rows_kept(self) -> int:
        return sum(b.n for b in self._blocks())

    @property
    def resolution(self) -> int:
        """The most steps one middle bucket spans (0: nothing was summarized, the table is
        whole): how much later than the full table's a first step may be on a long run."""
        spans = [b - a + 1 for st in self._stages.values() for a, b, _ in st.buckets]
        return max(spans, default=0)

    def _blocks(self) -> list[Block]:
        out: list[Block] = []
        for st in self._stages.values():
            out += st.head
            out += [b for _, _, b in st.buckets]
            out += st.open
            for blocks in st.tail.values():
                out += blocks
        return out

    def _rows(self) -> Block | None:
        """The kept rows in arrival order (None: none)."""
        blocks = [b for b in self._blocks() if b.n]
        if not blocks:
            return None
        rows = concat(blocks)
        if (np.diff(rows.seq) < 0).any():
            rows = rows.take(np.argsort(rows.seq, kind="stable"))
        return rows

    def columns(self) -> Columns:
        """What the rules read of :meth:`table`, as integer columns, without building it: the
        kept rows, then the rows :func:`bnprobe.store.fill_constants` would add (at the end:
        no rule depends on where a constant's row is within its step)."""
        names = np.asarray([*self._names, None], dtype=object)[:-1]
        rows = self._rows()
        if rows is None:
            empty = np.zeros(0, dtype=np.int64)
            return Columns(empty, empty, empty, empty, empty, empty, np.zeros(0), names)
        filled = self._filled(rows)
        if filled is not None:
            rows = concat([rows, filled])
        return Columns(
            rows.step, rows.stage, rows.rank, rows.layer, rows.channel, rows.metric, rows.value,
            names,
        )  # fmt: skip

    def _filled(self, rows: Block) -> Block | None:
        """The rows :func:`bnprobe.store.fill_constants` adds to the kept rows: at each anchor
        row of a stage with constants, for each constant stored in that stage, the last value
        stored for its (rank, layer) at or before that step, where none is stored at it."""
        anchor = self._vocab.get(ANCHOR)
        if anchor is None:
            return None
        agg = rows.channel < 0
        out: list[Block] = []
        for stage, names in CONSTANT_METRICS.items():
            code = self._vocab.get(stage)
            if code is None:
                continue
            here = agg & (rows.stage == code)
            const = np.flatnonzero(here & self._is(names)[rows.metric])
            anchors = np.flatnonzero(here & (rows.metric == anchor))
            if not len(const) or not len(anchors):
                continue
            width = len(self._names)
            a_key = rows.rank[anchors] * width + rows.layer[anchors]
            a_step = rows.step[anchors]
            codes = rows.metric[const]
            by_metric = const[np.argsort(codes, kind="stable")]  # each metric's rows in order
            counts = np.bincount(codes)
            present = np.flatnonzero(counts)
            sizes = counts[present]
            ends = np.cumsum(sizes)
            for metric, end, k in zip(present.tolist(), ends.tolist(), sizes.tolist(), strict=True):
                at = by_metric[end - k : end]
                if _aligned(rows, at, anchors):
                    continue  # stored at every anchor (a digest fed by the recorder)
                key, step = rows.rank[at] * width + rows.layer[at], rows.step[at]
                order = np.lexsort((np.arange(len(at)), step, key))
                key, step, at = key[order], step[order], at[order]
                last = np.ones(len(at), dtype=bool)  # the last of equal (key, step)
                last[:-1] = (key[1:] != key[:-1]) | (step[1:] != step[:-1])
                key, step, at = key[last], step[last], at[last]
                _, dense = np.unique(np.concatenate([step, a_step]), return_inverse=True)
                span = int(dense.max()) + 1
                sorted_ = key * span + dense[: len(step)]
                wanted = a_key * span + dense[len(step) :]
                i = np.searchsorted(sorted_, wanted, side="right") - 1
                ok = i >= 0
                i = np.where(ok, i, 0)
                ok &= (key[i] == a_key) & (step[i] != a_step)
                if not ok.any():
                    continue
                src, dst = at[i[ok]], anchors[ok]
                n = len(dst)
                out.append(
                    Block(
                        rows.seq[dst], rows.step[dst], rows.epoch[dst], rows.stage[dst],
                        rows.rank[dst], rows.layer[dst], np.full(n, -1, dtype=np.int64),
                        np.full(n, metric, dtype=rows.metric.dtype), rows.value[src],
                    )
                )  # fmt: skip
        return concat(out) if out else None

    def table(self) -> pd.DataFrame:
        """The kept rows in arrival order, SPEC schema (:data:`bnprobe.store.COLUMNS`), with each
        constant's value in force at every kept step (:func:`bnprobe.store.fill_constants`)."""
        if self._cache is not None:
            return self._cache
        rows = self._rows()
        if rows is None:
            self._cache = store.empty_frame()
            return self._cache
        names = np.asarray(self._names, dtype=object)
        channel = pd.arrays.IntegerArray(rows.channel.copy(), rows.channel < 0)
        df = pd.DataFrame(
            {
                "step": rows.step,
                "epoch": rows.epoch,
                "stage": pd.Series(names[rows.stage], dtype=object),
                "rank": rows.rank,
                "layer": pd.Series(names[rows.layer], dtype=object),
                "channel": channel,
                "metric": pd.Series(names[rows.metric], dtype=object),
                "value": rows.value,
            }
        )
        # A store keeps a constant only when it changes: give every kept step the value in
        # force, as bnprobe.load does (a table fed whole is unchanged).
        df = store.fill_constants(df)
        self._cache = df
        return df

    def steps(self) -> dict[str, dict[str, int | None]]:
        """Per stage, over the layer aggregates of the lowest rank: ``count`` (measured steps),
        ``first`` and ``last`` step: exact, however long the run (steps that arrive in order)."""
        out: dict[str, dict[str, int | None]] = {}
        for stage in ("train", "val", "probe"):
            ranks = sorted(r for s, r in self._counts if s == stage)
            if ranks:
                n, first, last = self._counts[(stage, ranks[0])]
                out[stage] = {"count": n, "first": first, "last": last}
            else:
                out[stage] = {"count": 0, "first": None, "last": None}
        return out

    def diagnose(self, *, thresholds: Any = None) -> list[Any]:
        """:func:`bnprobe.diagnose` of the kept rows."""
        from bnprobe.diagnosis.engine import diagnose_columns

        return diagnose_columns(self.columns(), thresholds=thresholds)


def _aligned(rows: Block, at: np.ndarray, anchors: np.ndarray) -> bool:
    """Whether the ``at`` rows (of one constant metric) and the ``anchors`` rows are the same
    (rank, layer, step)s in the same order: then each anchor has the constant stored at its own
    step and nothing is filled (a check in O(rows), where the fill sorts)."""
    if len(at) != len(anchors):
        return False
    return bool(
        np.array_equal(rows.step[at], rows.step[anchors])
        and np.array_equal(rows.layer[at], rows.layer[anchors])
        and np.array_equal(rows.rank[at], rows.rank[anchors])
    )


def columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """A table's SPEC columns as numpy arrays (``channel`` -1 where NA)."""
    chan = df["channel"]
    return {
        "step": df["step"].to_numpy(dtype=np.int64),
        "epoch": df["epoch"].to_numpy(dtype=np.int64),
        "stage": df["stage"].to_numpy(dtype=object),
        "rank": df["rank"].to_numpy(dtype=np.int64),
        "layer": df["layer"].to_numpy(dtype=object),
        "channel": chan.fillna(-1).to_numpy(dtype=np.int64),
        "metric": df["metric"].to_numpy(dtype=object),
        "value": df["value"].to_numpy(dtype=np.float64),
    }


def _blocks(cols: dict[str, np.ndarray], digest: Digest) -> list[Block]:
    """Rows (string columns as codes) as blocks of one stage and step each, in order;
    per-channel rows filtered as in :meth:`Digest.add`; steps counted."""
    step, stage, rank, metric, value = (
        cols[c] for c in ("step", "stage", "rank", "metric", "value")
    )
    n = len(step)
    if n == 0:
        return []
    na = cols["channel"] < 0
    if digest._legacy and digest._is(_SMALL_FRAC)[metric[na]].any():
        digest._legacy = False
    keep = na
    if not na.all():
        ch = ~na
        keep = na.copy()
        keep[ch] = digest._channel_keep(metric[ch], value[ch])
        if digest._legacy:
            train = digest._vocab.get("train", -1)
            keep[ch] |= (stage[ch] == train) & digest._is(_BATCH_VAR)[metric[ch]]
    whole = bool(keep.all())
    change = np.zeros(n, dtype=bool)
    change[0] = True
    change[1:] = (step[1:] != step[:-1]) | (stage[1:] != stage[:-1])
    starts = np.flatnonzero(change).tolist()
    out = []
    for a, b in zip(starts, [*starts[1:], n], strict=True):
        ranks = rank[a:b][na[a:b]]
        if len(ranks):
            lo, hi = int(ranks.min()), int(ranks.max())
            for r in [lo] if lo == hi else np.unique(ranks).tolist():
                digest._count(digest._names[int(stage[a])], r, int(step[a]))
        k: slice | np.ndarray = slice(a, b) if whole else np.flatnonzero(keep[a:b]) + a
        m = b - a if whole else len(k)  # type: ignore[arg-type]
        if m:  # copies: a block must not hold the whole batch
            seq = np.zeros(m, dtype=np.int64)
            out.append(Block(seq, *(np.array(cols[c][k]) for c in store.COLUMNS)))
        digest.rows_seen += (b - a) - m
    return out


def diagnose_digests(digests: dict[str | None, Digest], *, thresholds: Any = None) -> list[Any]:
    """The findings of several runs' digests, as :func:`bnprobe.diagnose` gives them for a
    table with a ``run`` column (each run on its own, findings carry ``run``)."""
    from dataclasses import replace

    found: list[Any] = []
    for name, d in digests.items():
        found += [
            f if name is None else replace(f, run=name) for f in d.diagnose(thresholds=thresholds)
        ]
    return found


def digest_table(df: pd.DataFrame, **options: int) -> dict[str | None, Digest]:
    """A digest per run of a table (``None`` for a table without a ``run`` column), in table
    order, as :func:`bnprobe.diagnose` splits runs."""
    from bnprobe.diagnosis.table import runs

    out: dict[str | None, Digest] = {}
    for name, part in runs(df):
        d = out.setdefault(name, Digest(**options))
        d.add(part)
    return out


__all__ = [
    "BUCKET_STEPS",
    "EXTREMES",
    "HEAD_STEPS",
    "MAX_BUCKETS",
    "READ_METRICS",
    "TAIL_STEPS",
    "Digest",
    "diagnose_digests",
    "digest_table",
]
