"""The options of :class:`~bnprobe.callback.BNProbe`: checking them, and where the store goes.

Owns the checks that ``BNProbe.__init__`` runs (each error names the option, the allowed values
and the bad value), the metric names ``scalars=`` may pick from, and the resolution of
``save_dir`` (``<log_dir>/bnprobe_store``, or a new numbered folder under the trainer's
``default_root_dir``). Pure functions of plain values: it may not import Lightning, torch or the
tap, so the checks read the same for every driver.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path

from bnprobe import metrics
from bnprobe.store import STORE_NAME

LOG_TO: tuple[str, ...] = ("tensorboard", "all")
"""Values of ``BNProbe(log_to=...)``."""
NO_LOGGER_DIR = "bnprobe_logs"
"""Where the store goes when the trainer has no logger with a ``log_dir``:
``<default_root_dir>/bnprobe_logs/version_<N>/bnprobe_store``."""


def scalar_metric_names() -> tuple[str, ...]:
    """Every metric name ``BNProbe(scalars=...)`` may name, in the store's order."""
    return metrics.scalar_names()


def check_options(
    *,
    every_n_steps: object,
    layers: object,
    flags: Sequence[tuple[str, object]],
    save_dir: object,
    log_to: object,
    scalars: object,
) -> frozenset[str] | None:
    """Raise ``ValueError`` naming the option for any bad value; return the metric names
    ``scalars`` selects (None: every metric). ``flags``: ``(option, value)`` pairs that must
    be True or False."""
    if every_n_steps is not None and (
        isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
    ):
        raise ValueError(
            "BNProbe(every_n_steps=...) must be a positive int, or None for the trainer's "
            f"log_every_n_steps; got {every_n_steps!r}"
        )
    check_layers(layers)
    for option, value in flags:
        if not isinstance(value, bool):
            raise ValueError(
                f"BNProbe({option}=...) must be True or False; got {value!r} "
                f"of type {type(value).__name__}"
            )
    if save_dir is True or not (
        save_dir is None or save_dir is False or isinstance(save_dir, str | os.PathLike)
    ):
        raise ValueError(
            "BNProbe(save_dir=...) must be a folder path, None (<log_dir>/bnprobe_store) "
            f"or False (do not save); got {save_dir!r}"
        )
    if not isinstance(log_to, str) or log_to not in LOG_TO:
        raise ValueError(
            f"BNProbe(log_to=...) must be one of {', '.join(map(repr, LOG_TO))}; got {log_to!r}"
        )
    return check_scalars(scalars)


def check_layers(layers: object) -> None:
    ok = (
        layers is None
        or isinstance(layers, str)
        or callable(layers)
        or (isinstance(layers, Sequence) and all(isinstance(p, str) for p in layers))
    )
    if not ok:
        raise ValueError(
            "BNProbe(layers=...) must be None (every BatchNorm layer), a layer name or glob "
            "pattern, a list of them, or a predicate (name, module) -> bool; "
            f"got {layers!r}"
        )


def check_scalars(scalars: object) -> frozenset[str] | None:
    """The metric names ``BNProbe(scalars=...)`` selects (None: every metric)."""
    if scalars is None:
        return None
    known = scalar_metric_names()
    patterns = [scalars] if isinstance(scalars, str) else scalars
    if not isinstance(patterns, Collection) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            "BNProbe(scalars=...) must be None (every metric) or metric names / glob patterns "
            f"from: {', '.join(known)}; got {scalars!r}"
        )
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(known, pattern)
        if not hits:
            raise ValueError(
                f"BNProbe(scalars=...) names no metric with {pattern!r}; the metrics are: "
                f"{', '.join(known)}"
            )
        chosen.update(hits)
    return frozenset(chosen)


def resolve_save_dir(
    save_dir: str | os.PathLike[str] | bool | None,
    log_dir: object,
    default_root_dir: str | os.PathLike[str],
) -> tuple[Path | None, bool]:
    """The store folder, and whether it is the no-logger fallback: ``save_dir``, or
    ``<log_dir>/bnprobe_store`` (``log_dir``: the trainer's first logger's, when it has one), or
    a new ``<default_root_dir>/bnprobe_logs/version_<N>/bnprobe_store``: never a folder named
    like the package, which Python would import in its place. ``save_dir=False``: no store."""
    if save_dir is False:
        return None, False
    if save_dir is not None and save_dir is not True:
        return Path(os.fspath(save_dir)), False
    if isinstance(log_dir, str | os.PathLike):
        return Path(os.fspath(log_dir)) / STORE_NAME, False
    base = Path(os.fspath(default_root_dir)) / NO_LOGGER_DIR
    return base / f"version_{next_version(base)}" / STORE_NAME, True


def next_version(base: Path) -> int:
    """One more than the highest ``version_<N>`` folder in ``base`` (0 when there is none)."""
    found = [re.fullmatch(r"version_(\d+)", p.name) for p in base.glob("version_*")]
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


__all__ = [
    "LOG_TO",
    "NO_LOGGER_DIR",
    "check_layers",
    "check_options",
    "check_scalars",
    "next_version",
    "resolve_save_dir",
    "scalar_metric_names",
]
