"""What the BatchNorm tab shows, computed without TensorBoard: the heatmap columns, the layer
order, a run's findings and its per-channel rows (the colour scale is :mod:`bnprobe.figures`'s,
shared with the images).

Pure functions over numbers, tags and the run's store, tested without a server. Reads the store
through one function, :func:`read_store`, and diagnoses through :func:`run_findings`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnprobe import store
from bnprobe.tensorboard.tags import MODEL_TAG, Tag, _match_scalar

if TYPE_CHECKING:
    import pandas as pd

# --------------------------------------------------------------------------- tags and layers


def parse(tag: str) -> Tag | None:
    """A bnprobe scalar tag's parts, None for any other tag (epoch, histograms, figures)."""
    return _match_scalar(tag)


def natural_key(text: str) -> list[Any]:
    """``block2`` before ``block10``: the order when the store does not say."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text)]


def order_layers(layers: Iterable[str], model_order: Sequence[str]) -> list[str]:
    """``layers`` in model order (``model_order``: the store's first-appearance order), the
    ones it does not know after them in natural order, the whole model last."""
    rank = {name: i for i, name in enumerate(model_order)}
    known = sorted((x for x in set(layers) if x in rank), key=rank.__getitem__)
    rest = sorted((x for x in set(layers) if x not in rank and x != store.MODEL), key=natural_key)
    tail = [store.MODEL] if store.MODEL in set(layers) else []
    return known + rest + tail


def tag_layer(layer: str) -> str:
    """The tag spelling of a layer name (``<model>`` is ``_model_``)."""
    return MODEL_TAG if layer == store.MODEL else layer


# --------------------------------------------------------------------------- heatmap columns


def heatmap(
    series: dict[str, tuple[np.ndarray, np.ndarray]], layers: Sequence[str], cols: int
) -> tuple[list[int], np.ndarray]:
    """The layers x columns matrix of a heatmap and the first step of each column.

    ``series``: layer -> (steps, values). Columns are the distinct logged steps when there are
    at most ``cols`` of them, else ``cols`` groups of consecutive logged steps with equal counts
    (binning the step *range* would leave empty columns between logged steps). A cell holds the
    largest finite value of its group, so that a spike stays visible; NaN where none.
    """
    steps = [s for s, _ in series.values() if len(s)]
    if not steps:
        return [], np.full((len(layers), 0), np.nan)
    distinct = np.unique(np.concatenate(steps))
    n = min(max(1, cols), len(distinct))
    edges = distinct[(np.arange(n) * len(distinct)) // n]
    grid = np.full((len(layers), n), -np.inf)
    for i, layer in enumerate(layers):
        if layer not in series:
            continue
        st, va = series[layer]
        ok = np.isfinite(va)
        col = np.searchsorted(edges, st[ok], side="right") - 1
        np.maximum.at(grid[i], col, va[ok])
    grid[grid == -np.inf] = np.nan
    return [int(s) for s in edges], grid


# --------------------------------------------------------------------------- the store


def store_parts(run_dir: Path) -> list[Path]:
    """The part files of the store(s) of ``run_dir`` (empty when it has none): the default
    ``bnprobe_store`` folder and the one of stores written before 0.2 are one run, as for
    :func:`bnprobe.load`."""
    return [p for name in store.STORE_NAMES for p in sorted((run_dir / name).glob(store.PART_GLOB))]


def signature(parts: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """Changes when a part is added, rewritten or removed: a cache key for a run's store."""
    out = []
    for p in parts:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def model_order(parts: Sequence[Path]) -> list[str]:
    """The layers in the order the probe first wrote them (the tap's order, which is
    ``named_modules()`` order), from the ``layer`` column of the first readable part."""
    import pyarrow.parquet as pq

    for part in parts:
        try:
            column = pq.read_table(part, columns=["layer"]).column("layer")
        except Exception:  # a damaged part: try the next one
            continue
        return [str(x) for x in dict.fromkeys(column.to_pylist()) if x is not None]
    return []


def read_store(
    run_dir: Path,
    *,
    stages: Collection[str] | None = None,
    layers: Collection[str] | None = None,
    metrics: Collection[str] | None = None,
) -> pd.DataFrame:
    """The run's table, filtered: the tab's one way into the store (the filters go to the
    parquet reader, :func:`bnprobe.load`)."""
    return store.load(run_dir, stages=stages, layers=layers, metrics=metrics)


class FindingsCache:
    """The findings of each run's store, diagnosed once per state of the store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[Any, list[dict[str, Any]]]] = {}

    def get(self, run_dir: Path) -> list[dict[str, Any]] | None:
        """The findings as plain dicts (most severe first), None when the run has no store."""
        parts = store_parts(run_dir)
        if not parts:
            return None
        key = signature(parts)
        with self._lock:  # one diagnosis at a time: a reload does not start a second one
            hit = self._cache.get(run_dir)
            if hit is not None and hit[0] == key:
                return hit[1]
            found = run_findings(run_dir)
            self._cache[run_dir] = (key, found)
            return found


def run_findings(run_dir: Path) -> list[dict[str, Any]]:
    """``bnprobe.diagnose`` on the run's store, as JSON-ready dicts (severity, then step):
    streamed part by part into the bounded running diagnosis, as ``bnprobe report`` does, so a
    long run costs the tab no more memory than a short one."""
    from bnprobe.diagnosis.stream import digest_parts

    digest, _ = digest_parts(store.part_order(store_parts(run_dir)))
    findings = digest.diagnose()
    findings.sort(key=lambda f: (f.severity.rank, f.step if f.step is not None else -1))
    return [_json_ready(f.to_dict()) for f in findings]


def _json_ready(value: Any) -> Any:
    """NaN and inf as None (TensorBoard's JSON would turn them into strings)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def nan_to_none(values: np.ndarray) -> list[Any]:
    """A float array as a JSON list with None for NaN/inf (nested for 2-d)."""
    arr = np.asarray(values, dtype=np.float64)
    obj = arr.astype(object)
    obj[~np.isfinite(arr)] = None
    return list(obj.tolist())


__all__ = [
    "FindingsCache",
    "heatmap",
    "model_order",
    "nan_to_none",
    "natural_key",
    "order_layers",
    "parse",
    "read_store",
    "run_findings",
    "signature",
    "store_parts",
    "tag_layer",
]
