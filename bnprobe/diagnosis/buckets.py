"""Rows of a :class:`~bnprobe.diagnosis.digest.Digest` as integer columns, and the choice of the
rows of a middle bucket that a rule could be decided by (:func:`select`).

Strings (stage, layer, metric) are codes into the digest's names, so that grouping is integer
arithmetic and ``numpy.minimum.at``, not hashing of Python strings: a bucket of ~40,000 rows is
chosen in about a millisecond. This module imports no torch and no Lightning.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd


class Block(NamedTuple):
    """Rows as parallel columns; ``seq`` is the arrival order, ``channel`` -1 for aggregates;
    ``stage``, ``layer`` and ``metric`` are codes into the digest's names."""

    seq: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    stage: np.ndarray
    rank: np.ndarray
    layer: np.ndarray
    channel: np.ndarray
    metric: np.ndarray
    value: np.ndarray

    def take(self, idx: np.ndarray | slice) -> Block:
        return Block(*(c[idx] for c in self))

    @property
    def n(self) -> int:
        return len(self.seq)


def concat(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return Block(*(np.concatenate(cols) for cols in zip(*blocks, strict=True)))


def select(rows: Block, extreme: np.ndarray) -> Block:
    """The rows of a middle bucket a rule could be decided by (the digest's docstring): per
    (stage, rank, layer, metric) of the layer rows, the first and last row, the first row whose
    value differs from the key's first non-NaN value, the first non-finite row, and for the
    metrics whose code is True in ``extreme`` the first smallest and first largest finite value;
    then every row of the (stage, layer, step) of a chosen row, and of the per-channel rows the
    first of each key. Rows keep their order."""
    if rows.n == 0:
        return rows
    agg = rows.channel < 0
    ia = np.flatnonzero(agg)
    keep = np.zeros(rows.n, dtype=bool)
    if len(ia):
        chosen = ia[_chosen(rows if len(ia) == rows.n else rows.take(ia), extreme)]
        # whole (stage, layer, step) rows, every rank and metric, of the chosen rows
        where, size = group_codes(rows.stage, rows.layer, rows.step)
        mark = np.zeros(size, dtype=bool)
        mark[where[chosen]] = True
        keep = mark[where]
    if len(ia) < rows.n:  # per-channel rows: those of kept steps, and the first of each key
        ch = np.flatnonzero(~agg)
        key, size = group_codes(
            rows.stage[ch], rows.rank[ch], rows.layer[ch], rows.channel[ch], rows.metric[ch]
        )
        keep[ch[first_of(key, size)]] = True
    return rows.take(np.flatnonzero(keep))


def _chosen(rows: Block, extreme: np.ndarray) -> np.ndarray:
    """Positions in ``rows`` (layer rows) of the rows :func:`select` picks (repeats allowed)."""
    group, size = group_codes(rows.stage, rows.rank, rows.layer, rows.metric)
    value = rows.value
    firsts = first_of(group, size)
    picked = [firsts, last_of(group, size)]
    finite = np.isfinite(value)
    whole = bool(finite.all())  # the usual case: no NaN, nothing non-finite to pick
    known = np.flatnonzero(~np.isnan(value)) if not whole else None
    at = firsts if known is None else known[first_of(group[known], size)]
    first = np.full(size, np.nan)
    first[group[at]] = value[at]
    ref = first[group]
    same = value == ref
    if not whole:
        same |= np.isnan(value) & np.isnan(ref)
    for mask in (~same,) if whole else (~same, ~finite):
        where = np.flatnonzero(mask)
        picked.append(where[first_of(group[where], size)])
    ext = np.flatnonzero(finite & extreme[rows.metric])
    if len(ext):
        g, key = group[ext], _ordered(value[ext])
        for bound, start in ((np.minimum, _MAX), (np.maximum, _MIN)):  # first row at the bound
            best = np.full(size, start, dtype=np.int64)
            bound.at(best, g, key)
            hit = np.flatnonzero(key == best[g])
            picked.append(ext[hit[first_of(g[hit], size)]])
    return np.concatenate(picked)


_MAX, _MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def _ordered(value: np.ndarray) -> np.ndarray:
    """Finite floats as int64 in the same order, -0.0 equal to 0.0 (integer ``minimum.at`` is
    several times faster than on floats)."""
    bits = (value + 0.0).view(np.int64)
    return bits ^ ((bits >> 63) & _MAX)


def group_codes(*columns: np.ndarray) -> tuple[np.ndarray, int]:
    """One int64 code in ``[0, size)`` per distinct combination of the integer ``columns``
    (equal lengths), and ``size``: mixed-radix arithmetic, made dense (a column in order by a
    cumulative sum, else by a factorize) where the radix product would exceed a few times the
    number of rows."""
    n = len(columns[0])
    limit = max(4 * n, 1 << 16)
    key, size = np.zeros(n, dtype=np.int64), 1
    for col in columns:
        lo = int(col.min()) if n else 0
        span = int(col.max()) - lo + 1 if n else 1
        if span == 1:
            continue
        code = np.asarray(col, dtype=np.int64) - lo
        if size * span > limit:  # steps: dense by their order where they arrive in order
            up = np.diff(code)
            if (up >= 0).all():
                code = np.concatenate([[0], np.cumsum(up > 0)])
                span = int(code[-1]) + 1
        if span > limit:
            code, span = _dense(code)
        if size * span > limit:
            key, size = _dense(key)
        key, size = key * span + code, size * span
    if size > limit:
        key, size = _dense(key)
    return key, size


def _dense(key: np.ndarray) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(key)
    return codes.astype(np.int64), max(len(uniques), 1)


def first_of(group: np.ndarray, size: int) -> np.ndarray:
    """Positions of the first occurrence of each code (codes in ``[0, size)``) in ``group``."""
    n = len(group)
    first = np.full(size, n, dtype=np.int64)
    np.minimum.at(first, group, np.arange(n, dtype=np.int64))
    return first[first < n]


def last_of(group: np.ndarray, size: int) -> np.ndarray:
    """Positions of the last occurrence of each code (codes in ``[0, size)``) in ``group``."""
    last = np.full(size, -1, dtype=np.int64)
    np.maximum.at(last, group, np.arange(len(group), dtype=np.int64))
    return last[last >= 0]


def select_steps(blocks: list[Block], extreme: np.ndarray) -> Block:
    """``select(concat(blocks))``, faster where the rows are steps in increasing order of layer
    rows in one layout (the same stage, rank, layer and metric in the same order, each once):
    then they are a steps x keys matrix and every pick is an argmin down a column (a bucket's
    close in ``bnprobe report``: a few times faster than the general path)."""
    rows = concat(blocks)
    width = _layout_width(rows)
    if not width:
        return select(rows, extreme)
    steps = rows.n // width
    v = rows.value.reshape(steps, width)
    cols = np.arange(width)
    picks = np.zeros(v.shape, dtype=bool)
    picks[0] = picks[-1] = True

    def pick(rows_at: np.ndarray, where: np.ndarray) -> None:
        picks[rows_at[where], cols[where]] = True

    finite = np.isfinite(v)
    nan = np.isnan(v)
    known = (~nan).argmax(axis=0)  # first non-NaN row of each column
    ref = v[known, cols]  # NaN where the column is all NaN
    differs = ~((v == ref) | (nan & np.isnan(ref)))
    for mask in (differs, ~finite):
        at = mask.argmax(axis=0)
        pick(at, mask[at, cols])
    ext = extreme[rows.metric[:width]] & finite.any(axis=0)
    if ext.any():
        pick(np.where(finite, v, np.inf).argmin(axis=0), ext)
        pick(np.where(finite, v, -np.inf).argmax(axis=0), ext)
    # whole (stage, layer, step) rows of the picks: a step's columns of a picked layer
    layer, n_layers = group_codes(rows.layer[:width])
    kept = np.zeros((steps, n_layers), dtype=bool)
    s, c = np.nonzero(picks)
    kept[s, layer[c]] = True
    return rows.take(np.flatnonzero(kept[:, layer].ravel()))


def _layout_width(rows: Block) -> int:
    """The rows of each step of ``rows`` where they are a steps x keys matrix (see
    :func:`select_steps`), else 0."""
    if rows.n == 0 or (rows.channel >= 0).any():
        return 0
    new = np.flatnonzero(rows.step[1:] != rows.step[:-1])
    width = int(new[0]) + 1 if len(new) else rows.n
    if rows.n % width:
        return 0
    step = rows.step.reshape(-1, width)
    if (step != step[:, :1]).any() or (np.diff(step[:, 0]) <= 0).any():
        return 0
    for col in (rows.stage, rows.rank, rows.layer, rows.metric):
        if (col.reshape(-1, width) != col[:width]).any():
            return 0
    if (rows.stage[:width] != rows.stage[0]).any():
        return 0
    key, size = group_codes(rows.rank[:width], rows.layer[:width], rows.metric[:width])
    return width if len(first_of(key, size)) == width else 0
