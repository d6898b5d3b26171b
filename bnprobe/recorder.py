"""The sinks of a run: what happens to a :class:`~bnprobe.tap.Snapshot` once the tap took it.

:class:`Recorder` owns the store (rows in memory, part files on disk, the flush policy), the
TensorBoard writers it is handed (scalars, histograms, the Custom Scalars layout, figures), any
``log_metrics`` loggers (CSV, W&B, MLflow), and the failure isolation around each of them: a
part that fails warns once, is switched off, and training goes on. Both drivers use it: the
Lightning callback (:mod:`bnprobe.callback`) and the plain-loop driver (:mod:`bnprobe.loop`).

It may not import Lightning (the adapter resolves Lightning's loggers and hands down bnprobe's
own :class:`~bnprobe.tensorboard.EventWriter` for each one's ``log_dir``), nor drive the tap: it
only records what it is given.
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
from bnprobe.diagnosis.digest import Digest
from bnprobe.store import STORE_NAME, Store

if TYPE_CHECKING:
    from bnprobe.diagnosis import Finding
    from bnprobe.figures import FigureRows
    from bnprobe.tap import BNTap, Snapshot

FLUSH_EVERY_S = 30.0
"""The store writes a part file at most this often while training (and always when it holds
``Store.spill_rows`` unsaved rows, at the end of each epoch, before a checkpoint, at the end of
fit and when fit fails)."""

log = logging.getLogger("bnprobe")


class MetricsLogger(Protocol):
    """Anything with Lightning's ``log_metrics(metrics, step)``: CSV, W&B, MLflow loggers."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class Recorder:
    """Write snapshots to the store, TensorBoard and loggers, each part guarded.

    Args:
        store: where the rows go (default: in memory only).
        writers: TensorBoard writers, or ``(writer, root)`` pairs where ``root`` is
            :func:`bnprobe.tensorboard.tag_root` of a logger's prefix: bnprobe's own
            :class:`~bnprobe.tensorboard.EventWriter` (what both drivers hand it: a disk error
            there stops bnprobe's events, never the user's logging) or a
            ``torch.utils.tensorboard.SummaryWriter``. The recorder writes into them, flushes
            them with the store, and never closes them: their owner does.
        loggers: ``log_metrics`` loggers that get every scalar as ``{tag: value}`` per step.
        histograms: write per-channel histograms (when the snapshot has channels).
        scalars: the metric names written as scalars (None: all); the store keeps every metric.
        flush_every_s: write a part file at most this often from :meth:`record`.
        warn: how a failing part is reported (default: ``warnings.warn``); the Lightning adapter
            passes one that warns once, on rank zero.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        writers: Iterable[tb.Writer | tuple[tb.Writer, str]] = (),
        loggers: Sequence[MetricsLogger] = (),
        histograms: bool = True,
        scalars: frozenset[str] | None = None,
        flush_every_s: float = FLUSH_EVERY_S,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store if store is not None else Store(None)
        self.writers: list[tuple[tb.Writer, str]] = [
            w if isinstance(w, tuple) else (w, tb.PREFIX) for w in writers
        ]
        self.loggers = list(loggers)
        self.histograms = histograms
        self.scalars = scalars
        self.flush_every_s = flush_every_s
        self.failures: dict[str, str] = {}
        """Parts switched off after an error -> why."""
        self._warn = warn or _warn
        self._last_flush = time.monotonic()
        self._said_no_figures = False
        self.digest = Digest()
        """The running diagnosis: what the rules need of every recorded row, bounded."""
        self._figure_rows: FigureRows | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, charts: dict[str, tuple[str, ...]] | None = None) -> None:
        """Write the Custom Scalars layout (``charts``: stage -> metrics; default: every stage
        of :data:`bnprobe.tensorboard.METRICS_BY_STAGE` that the recorder's ``scalars`` keep,
        without ``rank_divergence``)."""
        layout = self.charts() if charts is None else charts
        for writer, root in self.writers:
            write = partial(tb.write_layout, writer, tuple(layout), layout, root)
            self.guard("writing the TensorBoard layout", write)

    def close(self) -> None:
        """Save what is not saved yet (idempotent)."""
        self.flush()

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
        and one ``log_metrics`` call per step, its channels as one histogram event per step
        (a block of steps from :meth:`bnprobe.tap.BNTap.keep` is one snapshot), and save the
        store if the last save is older than ``flush_every_s`` or the store holds its
        ``spill_rows`` unsaved rows (so memory stays bounded however long the run)."""
        for part in snapshot.parts:
            self.store.append(part)
        self.guard(DIGEST, partial(_digest, self.digest, snapshot.parts))
        keep = self.scalars
        for writer, root in self.writers:
            write = partial(tb.write_snapshot, writer, snapshot, keep, root)
            self.guard("writing TensorBoard scalars", write)
        for logger in self.loggers:
            send = partial(_log_metrics, logger, snapshot, keep)
            self.guard(f"logging to {type(logger).__name__}", send)
        if self.histograms and snapshot.channels and snapshot.parts:
            for writer, root in self.writers:
                hist = partial(_histograms, writer, snapshot, root)
                self.guard("writing TensorBoard histograms", hist)
        if self.store.must_spill or time.monotonic() - self._last_flush > self.flush_every_s:
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
        for figures, with the metrics and the steps pushed down to the parquet reader, so it
        reads only what is new (the same cost at epoch 1 and at epoch 100)."""
        first = min(kept.last_step.values()) + 1 if kept.last_step else None
        rows = self.store.to_dataframe(metrics=list(tb.FIGURE_METRICS), steps=(first, None))
        return kept.new(rows)

    def flush(self) -> None:
        """Save the rows not saved yet as one part file, and put bnprobe's buffered TensorBoard
        events into their file (each guarded): while training, at the end of each epoch, before
        each checkpoint, at the end of fit and when fit fails."""
        self._last_flush = time.monotonic()
        self.guard("saving the store", self.store.flush)
        for writer, _ in self.writers:
            if isinstance(writer, tb.EventWriter):
                self.guard("writing TensorBoard events", writer.flush)

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

    # -- diagnosis -------------------------------------------------------------------------------
    def findings(self) -> list[Finding]:
        """:func:`bnprobe.diagnose` of what was recorded, from the running state (its cost does
        not grow with the run); from the whole table if that state was switched off."""
        from bnprobe.diagnosis import diagnose

        if DIGEST in self.failures:
            return diagnose(self.to_dataframe())
        return self.digest.diagnose()

    def report(self) -> str:
        """:func:`bnprobe.diagnosis.format_report` of what was recorded (as :meth:`findings`)."""
        from bnprobe.diagnosis import diagnose, format_report

        if DIGEST in self.failures:
            df = self.to_dataframe()
            return format_report(df, diagnose(df))
        steps: dict[str | None, dict[str, dict[str, int | None]]] = {None: self.digest.steps()}
        return format_report(self.digest.table(), self.digest.diagnose(), steps=steps)

    def steps(self) -> dict[str, dict[str, int | None]]:
        """Per stage: measured steps ``count``, ``first`` and ``last`` (:meth:`Digest.steps`)."""
        if DIGEST in self.failures:
            from bnprobe.diagnosis.report import stage_steps

            return stage_steps(self.to_dataframe())
        return self.digest.steps()

    # -- reading ---------------------------------------------------------------------------------
    def to_dataframe(self, **filters: Any) -> pd.DataFrame:
        """Every row recorded so far (SPEC schema), read from the store's part files; filters
        as :meth:`bnprobe.store.Store.to_dataframe`."""
        return self.store.to_dataframe(**filters)

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
    steps: dict[str, dict[str, int | None]],
    findings: list[Finding],
    *,
    layers: int,
    every: int,
    off: dict[str, str],
    run_dir: Path | None,
    report_call: str = "BNProbe.report()",
) -> str:
    """What was watched and for how long (``steps``: per stage, the ``count``, ``first`` and
    ``last`` measured step, :meth:`Recorder.steps`), what was switched off and why, the findings
    of severity warning or error, and where to look."""
    train = steps.get("train", {})
    watched = f"bnprobe watched {_plural(layers, 'BatchNorm layer')}"
    measured = bool(train.get("count"))
    if not measured:
        lines = [f"{watched} but measured no training step, so there is nothing to judge."]
    else:
        first, last = train["first"], train["last"]
        span = f"step {first}" if first == last else f"steps {first}..{last}"
        lines = [
            f"{watched} at {_plural(int(train['count'] or 0), 'training step')} ({span}, "
            f"every {every})"
            + "".join(
                f", {_plural(int(steps[stage]['count'] or 0), what)}"
                for stage, what in (("val", "validation"), ("probe", "train/eval probe"))
                if steps.get(stage, {}).get("count")
            )
            + "."
        ]
    for what, why in off.items():
        lines.append(f"  switched off after an error: {what} ({why})")
    serious = [f for f in findings if f.severity in ("warning", "error")]
    if serious:
        lines.append(f"{_plural(len(serious), 'BatchNorm problem')} found:")
        lines += [f"  - {finding}" for finding in serious]
    elif measured:
        partly = " in what was measured" if off else ""
        lines.append(f"No BatchNorm problem of severity warning or error found{partly}.")
    where = f"run `bnprobe report {shlex.quote(str(run_dir))}`" if run_dir is not None else ""
    if serious or off:
        lines.append(f"  Call {report_call}" + (f" or {where}" if where else "") + " for advice.")
    return "\n".join(lines)


DIGEST = "keeping the running diagnosis"
"""The part name of the running diagnosis state in :attr:`Recorder.failures`."""


def _digest(digest: Digest, parts: Sequence[Any]) -> None:
    for part in parts:
        digest.add(part)


def _log_metrics(logger: MetricsLogger, snapshot: Snapshot, keep: frozenset[str] | None) -> None:
    for step, metrics in tb.snapshot_metrics(snapshot, keep).items():
        logger.log_metrics(metrics, step)


def _histograms(writer: tb.Writer, snapshot: Snapshot, root: str) -> None:
    """One histogram event per step whose channels the snapshot holds, in step order."""
    for stage, step, channels in snapshot.step_channels():
        tb.write_histograms(writer, stage, step, channels, root=root)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


__all__ = ["FLUSH_EVERY_S", "MetricsLogger", "Recorder", "summary_text", "switched_off"]
