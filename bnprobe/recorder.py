"""The sinks of a run: what happens to a :class:`~bnprobe.tap.Snapshot` once the tap took it.

:class:`Recorder` owns the store (rows in memory, part files on disk, the flush policy), the
TensorBoard writers it is handed (scalars, histograms, the Custom Scalars layout, figures), any
``log_metrics`` loggers (CSV, W&B, MLflow), and the failure isolation around each of them: a
part that fails warns once, is switched off, and training goes on. Both drivers use it: the
Lightning callback (:mod:`bnprobe.callback`) and the plain-loop driver (:mod:`bnprobe.loop`).

It may not import Lightning (the adapter resolves Lightning's loggers and hands down their
``SummaryWriter``), nor drive the tap: it only records what it is given.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from bnprobe import tensorboard as tb
from bnprobe.store import STORE_NAME, Store
from bnprobe.tensorboard import checksum

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from bnprobe.diagnosis import Finding
    from bnprobe.figures import FigureRows
    from bnprobe.tap import BNTap, Snapshot

FLUSH_EVERY_S = 30.0
"""The store writes a part file at most this often while training (and always at the end of each
epoch, at the end of fit and when fit fails)."""

log = logging.getLogger("bnprobe")


class MetricsLogger(Protocol):
    """Anything with Lightning's ``log_metrics(metrics, step)``: CSV, W&B, MLflow loggers."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class Recorder:
    """Write snapshots to the store, TensorBoard and loggers, each part guarded.

    Args:
        store: where the rows go (default: in memory only).
        writers: ``torch.utils.tensorboard.SummaryWriter`` objects, or ``(writer, root)`` pairs
            where ``root`` is :func:`bnprobe.tensorboard.tag_root` of a logger's prefix. The
            recorder writes into them and never closes them: their owner does.
        loggers: ``log_metrics`` loggers that get every scalar as ``{tag: value}`` per step.
        histograms: write per-channel histograms (when the snapshot has channels).
        scalars: the metric names written as scalars (None: all); the store keeps every metric.
        flush_every_s: write a part file at most this often from :meth:`record`.
        fast_checksums: have TensorBoard checksum records with ``google-crc32c`` between
            :meth:`start` and :meth:`close` (:mod:`bnprobe.tensorboard.checksum`; off by default).
        warn: how a failing part is reported (default: ``warnings.warn``); the Lightning adapter
            passes one that warns once, on rank zero.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        writers: Iterable[SummaryWriter | tuple[SummaryWriter, str]] = (),
        loggers: Sequence[MetricsLogger] = (),
        histograms: bool = True,
        scalars: frozenset[str] | None = None,
        flush_every_s: float = FLUSH_EVERY_S,
        fast_checksums: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store if store is not None else Store(None)
        self.writers: list[tuple[SummaryWriter, str]] = [
            w if isinstance(w, tuple) else (w, tb.PREFIX) for w in writers
        ]
        self.loggers = list(loggers)
        self.histograms = histograms
        self.scalars = scalars
        self.flush_every_s = flush_every_s
        self.fast_checksums = fast_checksums
        self.failures: dict[str, str] = {}
        """Parts switched off after an error -> why."""
        self._warn = warn or _warn
        self._last_flush = time.monotonic()
        self._checksums = False
        self._said_no_figures = False
        self._figure_rows: FigureRows | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, charts: dict[str, tuple[str, ...]] | None = None) -> None:
        """Write the Custom Scalars layout (``charts``: stage -> metrics; default: every stage
        of :data:`bnprobe.tensorboard.METRICS_BY_STAGE` that the recorder's ``scalars`` keep,
        without ``rank_divergence``) and, if asked, switch to the C checksum."""
        if self.fast_checksums and not self._checksums and self.writers:
            self._checksums = checksum.install()
            if not self._checksums:
                self._warn(
                    "bnprobe: fast_checksums=True needs the google-crc32c package "
                    '(pip install "bnprobe[fast-crc]"); TensorBoard\'s own checksum is used.'
                )
        layout = self.charts() if charts is None else charts
        for writer, root in self.writers:
            write = partial(tb.write_layout, writer, tuple(layout), layout, root)
            self.guard("writing the TensorBoard layout", write)

    def close(self) -> None:
        """Save what is not saved yet and put TensorBoard's checksum back (idempotent)."""
        self.flush()
        if self._checksums:
            self._checksums = False
            checksum.uninstall()

    def charts(self, world_size: int = 1) -> dict[str, tuple[str, ...]]:
        """The Custom Scalars charts per stage: the metrics written as scalars; rank_divergence
        only in a multi-process run (the only kind that has it)."""
        charts: dict[str, tuple[str, ...]] = {}
        for stage in ("train", "val", "probe"):
            metrics = tb.METRICS_BY_STAGE[stage]
            if world_size <= 1:
                metrics = tuple(m for m in metrics if m != "rank_divergence")
            if self.scalars is not None:
                metrics = tuple(m for m in metrics if m in self.scalars)
            if metrics:
                charts[stage] = metrics
        return charts

    # -- recording -------------------------------------------------------------------------------
    def record(self, snapshot: Snapshot) -> None:
        """Keep the snapshot's rows, write its layer aggregates (rank 0) as one TensorBoard event
        and one ``log_metrics`` call per step, its channels as one histogram event, and save the
        store if the last save is older than ``flush_every_s``."""
        for part in snapshot.parts:
            self.store.append(part)
        keep = self.scalars
        for writer, root in self.writers:
            write = partial(tb.write_snapshot, writer, snapshot, keep, root)
            self.guard("writing TensorBoard scalars", write)
        for logger in self.loggers:
            send = partial(_log_metrics, logger, snapshot, keep)
            self.guard(f"logging to {type(logger).__name__}", send)
        if self.histograms and snapshot.channels and snapshot.parts:
            stage, step = _stage_and_step(snapshot.parts[0])
            for writer, root in self.writers:
                hist = partial(
                    tb.write_histograms, writer, stage, step, snapshot.channels, root=root
                )
                self.guard("writing TensorBoard histograms", hist)
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def draw_figures(self, step: int) -> None:
        """Draw the figures (:func:`bnprobe.tensorboard.add_figures`) into every writer; skipped
        with one info line when matplotlib is missing (``figures.available()``)."""
        if not self.writers:
            return
        from bnprobe import figures

        if not getattr(figures, "available", lambda: True)():
            if not self._said_no_figures:
                self._said_no_figures = True
                log.info("bnprobe: matplotlib is not installed, so no figures are drawn.")
            return
        self.guard("drawing figures", partial(self._figures, step))

    def _figures(self, step: int) -> None:
        from bnprobe import figures

        if self._figure_rows is None:
            self._figure_rows = figures.FigureRows()
        df = self._figure_rows.add(self._new_figure_rows(self._figure_rows))
        with warnings.catch_warnings():  # matplotlib's, on odd data: the figure says it
            warnings.simplefilter("ignore", RuntimeWarning)
            for writer, root in self.writers:
                tb.add_figures(writer, df, int(step), root)

    def _new_figure_rows(self, kept: FigureRows) -> pd.DataFrame:
        """The figure metrics' rows recorded since the last figures: the one read of the store
        for figures (a ``steps=`` filter pushed down to the store makes it read only those)."""
        return kept.new(self.store.select(tb.FIGURE_METRICS))

    def flush(self) -> None:
        """Save the rows not saved yet as one part file (guarded)."""
        self._last_flush = time.monotonic()
        self.guard("saving the store", self.store.flush)

    def guard(self, what: str, fn: Callable[[], object]) -> None:
        """Run one part; on error warn once, switch that part off, never raise."""
        if what in self.failures:
            return
        try:
            fn()
        except Exception as err:
            self.failures[what] = f"{type(err).__name__}: {err}"
            self._warn(
                f"BNProbe: {what} failed with {type(err).__name__}: {err}. "
                "That part of the probe is now off; training goes on."
            )

    # -- reading ---------------------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """Every row recorded so far (SPEC schema)."""
        return self.store.to_dataframe()

    @property
    def run_dir(self) -> Path | None:
        """The run folder to give ``bnprobe report`` or ``bnprobe.load``: the store folder's
        parent when it has the default name, else the store folder (None: not saved)."""
        folder = self.store.save_dir
        if folder is None:
            return None
        return folder.parent if folder.name == STORE_NAME else folder


def switched_off(failures: dict[str, str], tap: BNTap | None) -> dict[str, str]:
    """Parts switched off after an error, and why, the tap's failed layers included."""
    off = dict(failures)
    if tap is not None:
        why = {}
        for line in tap.failures:  # "... layer 'x' (Type) failed with Error: msg. ..."
            found = re.search(r"layer '(.*?)' .*? failed with (.*?)\. This layer", line)
            if found:
                why[found.group(1)] = found.group(2)
        for layer in tap.layers:
            if layer.failed:
                reason = why.get(layer.name, "its hook failed")
                off.setdefault(f"measuring layer {layer.name!r}", reason)
    return off


def summary_text(
    df: pd.DataFrame,
    findings: list[Finding],
    *,
    layers: int,
    every: int,
    off: dict[str, str],
    run_dir: Path | None,
    report_call: str = "BNProbe.report()",
) -> str:
    """What was watched and for how long, what was switched off and why, the findings of
    severity warning or error, and where to look."""
    steps = df.loc[df["stage"] == "train", "step"]
    watched = f"bnprobe watched {_plural(layers, 'BatchNorm layer')}"
    if steps.empty:
        lines = [f"{watched} but measured no training step, so there is nothing to judge."]
    else:
        first, last = int(steps.min()), int(steps.max())
        span = f"step {first}" if first == last else f"steps {first}..{last}"
        lines = [
            f"{watched} at {_plural(steps.nunique(), 'training step')} ({span}, every {every})"
            + "".join(
                f", {_plural(df.loc[df['stage'] == stage, 'step'].nunique(), what)}"
                for stage, what in (("val", "validation"), ("probe", "train/eval probe"))
                if (df["stage"] == stage).any()
            )
            + "."
        ]
    for what, why in off.items():
        lines.append(f"  switched off after an error: {what} ({why})")
    serious = [f for f in findings if f.severity in ("warning", "error")]
    if serious:
        lines.append(f"{_plural(len(serious), 'BatchNorm problem')} found:")
        lines += [f"  - {finding}" for finding in serious]
    elif not steps.empty:
        partly = " in what was measured" if off else ""
        lines.append(f"No BatchNorm problem of severity warning or error found{partly}.")
    where = f"run `bnprobe report {shlex.quote(str(run_dir))}`" if run_dir is not None else ""
    if serious or off:
        lines.append(f"  Call {report_call}" + (f" or {where}" if where else "") + " for advice.")
    return "\n".join(lines)


def _log_metrics(logger: MetricsLogger, snapshot: Snapshot, keep: frozenset[str] | None) -> None:
    for step, metrics in tb.snapshot_metrics(snapshot, keep).items():
        logger.log_metrics(metrics, step)


def _stage_and_step(part: Any) -> tuple[str, int]:
    """The stage and step of a snapshot's first block of rows (the tap's own)."""
    if isinstance(part, pd.DataFrame):
        return str(part["stage"].iloc[0]), int(part["step"].iloc[0])
    return str(part.stage), int(part.step)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


__all__ = ["FLUSH_EVERY_S", "MetricsLogger", "Recorder", "summary_text", "switched_off"]
