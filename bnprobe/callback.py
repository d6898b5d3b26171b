"""The Lightning adapter: :class:`BNProbe` drives a :class:`~bnprobe.tap.BNTap` from trainer hooks.

All the logic lives in :class:`BNProbeBase`, which uses only duck-typed trainer attributes, so the
same class body serves ``pytorch_lightning`` (here) and ``lightning.pytorch``
(:mod:`bnprobe.lightning`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn

from bnprobe import store as _store
from bnprobe import tbfast
from bnprobe import tensorboard as tb
from bnprobe.distributed import RankGather
from bnprobe.store import STORE_NAME, Store
from bnprobe.tap import BNTap, LayerSelection, Snapshot, find_layers

if TYPE_CHECKING:
    from bnprobe.diagnosis import Finding

RECAL_HELD = 3
"""Validation batches (the first of each epoch) that the probe also re-estimates the running
statistics on for ``recal_pred_change``/``recal_logits_shift`` (docs/mismatch.md)."""

FLUSH_EVERY_S = 30.0
"""The store writes a part file at most this often while training (and always at the end of each
epoch, at the end of fit and when fit fails)."""

LOG_TO: tuple[str, ...] = ("tensorboard", "all")
"""Values of ``BNProbe(log_to=...)``."""
NO_LOGGER_DIR = "bnprobe_logs"
"""Where the store goes when the trainer has no logger with a ``log_dir``:
``<default_root_dir>/bnprobe_logs/version_<N>/bnprobe_store``."""


def scalar_metric_names() -> tuple[str, ...]:
    """Every metric name ``BNProbe(scalars=...)`` may name, in the store's order."""
    names = (
        *_store.MOMENT_METRICS,
        *_store.SHIFT_METRICS,
        *_store.COUNT_METRICS,
        *_store.AFFINE_METRICS,
        *_store.STRUCTURE_METRICS,
        *_store.TRACE_METRICS,
        *_store.PROBE_METRICS,
        "rank_divergence",
    )
    return tuple(dict.fromkeys(names))


class BNProbeBase:
    r"""Watch every BatchNorm layer while a model trains.

    Args:
        every_n_steps: measure every n-th optimizer step (steps 0, n, 2n, ...). Default: the
            trainer's ``log_every_n_steps``.
        layers: which BN layers: None (every ``torch.nn.modules.batchnorm._BatchNorm``), a
            qualified name or glob pattern, a list of them, or a predicate
            ``(name, module) -> bool``.
        histograms: log per-channel histograms of gamma, beta, d and v to TensorBoard.
        per_channel: also keep one row per channel in the table.
        probe_batch: the batch for the train/eval probe (default: the first validation batch).
        save_dir: where the parquet store goes. Default: ``<log_dir>/bnprobe_store`` of the
            trainer's first logger when it has a ``log_dir`` (TensorBoardLogger, CSVLogger),
            else ``<default_root_dir>/bnprobe_logs/version_<N>/bnprobe_store`` (a new N per
            run; a resumed run keeps its folder). False: no store.
        summary: at the end of fit, print what was watched and the findings of severity
            warning or error (rank 0).
        log_to: which loggers get bnprobe's scalars: ``"tensorboard"`` (default: the
            trainer's TensorBoard loggers only; a layer-by-metric flood of keys is what
            TensorBoard's Custom Scalars charts are made for, and what a CSV file, W&B or
            MLflow is not) or ``"all"`` (every logger of the trainer).
        scalars: which metrics are logged as scalars: None (every metric), or metric names and
            glob patterns (``["mean_shift*", "kl"]``). The table and the store keep every
            metric whatever this says.

    Logged keys (scalars, through the TensorBoard loggers, or every logger with ``log_to="all"``;
    rank zero only), one per BN layer and metric:

    - ``bnprobe/train/<metric>/<layer>`` at each measured training step: ``batch_mean``,
      ``batch_var``, ``nonfinite``, ``var_small_frac``, ``forward_calls``, ``train_mode``,
      ``model_train_mode``, ``momentum``, ``has_running_stats``, ``samples_per_channel``,
      ``batch_size``, ``eps``; with running statistics: ``running_mean``, ``running_var``,
      ``mean_shift``, ``var_shift``, ``kl``, ``mean_shift_max``, ``var_shift_max``, ``kl_max``,
      ``outlier_frac``, ``mean_shift_excess``, ``var_shift_excess``, ``mean_shift_excess_max``,
      ``var_shift_excess_max``, ``running_invalid``; with running statistics and a
      ``num_batches_tracked`` buffer: ``num_batches_tracked``, ``warmup_residual``; with
      ``affine=True``: ``gamma_mean``, ``gamma_std``, ``beta_mean``, ``beta_std``, ``gamma_drift``,
      ``beta_drift``, ``gamma_small_frac``; at the first measured step only: ``input_bias``,
      ``input_dropout``; with running statistics and several processes (DDP): ``rank_divergence``;
    - ``bnprobe/val/<metric>/<layer>`` after each validation epoch (pooled over it): ``batch_mean``,
      ``batch_var``, ``nonfinite``, ``var_small_frac``, ``samples_per_channel``; with running
      statistics: ``running_mean``, ``running_var``, ``mean_shift``, ``var_shift``, ``kl``,
      ``mean_shift_max``, ``var_shift_max``, ``kl_max``, ``outlier_frac``, ``mean_shift_excess``,
      ``var_shift_excess``, ``mean_shift_excess_max``, ``var_shift_excess_max``,
      ``running_invalid``; with running statistics and a ``num_batches_tracked`` buffer:
      ``num_batches_tracked``, ``warmup_residual``;
    - ``bnprobe/probe/<metric>/<layer>`` after each validation epoch (the train/eval probe):
      ``output_gap``, ``local_gap``, ``num_batches_tracked``, ``warmup_residual``,
      ``running_invalid``; and for the whole model, ``bnprobe/probe/<metric>/_model_``:
      ``logits_gap``, ``pred_agreement``, ``recal_pred_change``, ``recal_logits_shift``;
    - ``bnprobe/<stage>/epoch`` with every logging step of a stage;
    - histograms ``bnprobe/train/hist/{gamma,beta,d,v}/<layer>`` and figures
      ``bnprobe/<stage>/figure/<name>`` (TensorBoard only).

    With a logger made with ``prefix="exp"`` every key starts with ``exp-bnprobe/`` instead,
    histograms, figures and the Custom Scalars layout included. docs/metrics.md defines each metric.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        layers: LayerSelection = None,
        histograms: bool = True,
        per_channel: bool = False,
        probe_batch: Any = None,
        save_dir: str | os.PathLike[str] | bool | None = None,
        summary: bool = True,
        log_to: str = "tensorboard",
        scalars: str | Sequence[str] | None = None,
    ) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                "BNProbe(every_n_steps=...) must be a positive int, or None for the trainer's "
                f"log_every_n_steps; got {every_n_steps!r}"
            )
        _check_layers(layers)
        flags = (("histograms", histograms), ("per_channel", per_channel), ("summary", summary))
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
        self._scalar_metrics = _check_scalars(scalars)
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.histograms = histograms
        self.per_channel = per_channel
        self.probe_batch = probe_batch
        self.save_dir = save_dir
        self.summary = summary
        self.log_to = log_to
        self.scalars = scalars
        self.tap: BNTap | None = None
        self.store = Store(None)
        self._every = every_n_steps or 1
        self._measuring: int | None = None
        self._last_step = -1
        self._traced = False
        self._references: dict[str, dict[str, torch.Tensor]] = {}
        self._broken: set[str] = set()
        self._failures: dict[str, str] = {}  # part of the probe switched off -> why
        self._restored_dir: Path | None = None  # the store folder of the checkpointed run
        self._fallback_dir = False  # the store went to <default_root_dir>/bnprobe_logs
        self._world_size = 1
        self._last_flush = time.monotonic()
        self._writes = False
        self._validating = False
        self._first_val_batch: Any = None
        self._recal_batches: list[Any] = []
        """Up to ``RECAL_HELD`` validation batches of this epoch for the probe's re-estimate
        (``recal_pred_change``), released after the probe."""
        self._ranks: RankGather | None = None
        self._checked_hooks = False

    # -- public ----------------------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """Every row collected so far (SPEC schema)."""
        return self.store.to_dataframe()

    def findings(self) -> list[Finding]:
        """What is wrong with the BN layers so far, in plain words (:func:`bnprobe.diagnose`)."""
        from bnprobe.diagnosis import diagnose

        return diagnose(self.to_dataframe())

    def report(self) -> str:
        """A readable summary: latest key metrics per layer, then findings with advice."""
        from bnprobe.diagnosis import diagnose, format_report

        df = self.to_dataframe()
        return format_report(df, diagnose(df))

    @property
    def store_dir(self) -> Path | None:
        """The folder the parquet store is written to (None: not saved, or not set up yet)."""
        return self.store.save_dir

    @property
    def run_dir(self) -> Path | None:
        """The run folder to give ``bnprobe report`` or ``bnprobe.load``: the store folder's
        parent when it has the default name, else the store folder (None: not saved)."""
        folder = self.store.save_dir
        if folder is None:
            return None
        return folder.parent if folder.name == STORE_NAME else folder

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the BN layers being measured."""
        return [layer.name for layer in self.tap.layers] if self.tap is not None else []

    # -- trainer hooks ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.tap is not None:
            return
        self._every = self.every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if not find_layers(pl_module):
            _warn(
                f"BNProbe: {type(pl_module).__name__} has no BatchNorm layer "
                "(no torch.nn.modules.batchnorm._BatchNorm); the probe does nothing."
            )
            return
        self._world_size = int(getattr(trainer, "world_size", 1))
        distributed = self._world_size > 1
        self.tap = BNTap(
            pl_module,
            self.layers,
            keep_channels=self.histograms or distributed,  # rank_divergence needs mu_R, var_R
            per_channel=self.per_channel,
            world_size=_sync_world_size,
        )
        if distributed:
            self._ranks = RankGather({layer.name: layer.module.eps for layer in self.tap.layers})
        self._writes = bool(trainer.is_global_zero)
        save_dir = self._resolve_save_dir(trainer)
        self.store = Store(save_dir if self._writes else None, rank=int(trainer.global_rank))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tap is None:
            return
        self.tap.load_references(self._references)
        self.tap.attach()
        if self._fallback_dir and self._restored_dir is not None and self._writes:
            self.store.save_dir = self._restored_dir  # a resumed run appends to its own store
        if self._writes:
            writers = _tensorboard_writers(trainer)
            if any(tbfast.summary_writer(writer) is not None for writer, _ in writers):
                self._guard("speeding up TensorBoard's checksums", tbfast.speed_up_checksums)
            charts = self._charts(trainer)
            for writer, root in writers:
                write = partial(tb.write_layout, writer, tuple(charts), charts, root)
                self._guard("writing the TensorBoard layout", write)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self.tap is None or step == self._last_step or step % self._every:
            return
        self._measuring = step
        self.tap.start(trace=not self._traced)
        self._traced = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.tap is None or self._measuring is None:
            return
        step, self._measuring = self._measuring, None
        self._last_step = step
        tap, epoch = self.tap, int(trainer.current_epoch)
        taken: list[Snapshot] = []

        def measure() -> None:
            taken.append(tap.collect(step=step, epoch=epoch, rank=int(trainer.global_rank)))

        self._guard("collecting measurements", measure)
        snap = taken[0] if taken else None
        if snap is not None and not self._checked_hooks:
            self._checked_hooks = True
            self._guard("checking that the hooks run", partial(_check_hooks_fired, tap, pl_module))
        if self._ranks is not None:  # every rank, every measured step: never skip a collective
            others = self._gather(snap, step, epoch)
            if snap is not None and others is not None:
                snap = Snapshot([*snap.parts, others], snap.channels)
        if snap is not None:
            record = partial(self._record, trainer, snap, step, "train")
            self._guard("recording measurements", record)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tap is None or trainer.sanity_checking:
            return
        self._validating = True
        self.tap.start(pool=True)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._validating and self._first_val_batch is None and batch_idx == dataloader_idx == 0:
            self._first_val_batch = batch  # kept as is: the default probe batch
        if self._validating and dataloader_idx == 0 and len(self._recal_batches) < RECAL_HELD:
            self._recal_batches.append(batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tap is None or not self._validating:
            return
        self._validating = False
        step, tap = int(trainer.global_step), self.tap

        def pooled() -> None:
            epoch, rank = int(trainer.current_epoch), int(trainer.global_rank)
            self._record(
                trainer, tap.collect(step=step, epoch=epoch, rank=rank, stage="val"), step, "val"
            )

        self._guard("measuring validation", pooled)
        batch = self.probe_batch if self.probe_batch is not None else self._first_val_batch
        if batch is not None:
            self._guard("the train/eval probe", partial(self._probe, trainer, pl_module, batch))
        self._recal_batches = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._guard("drawing figures", partial(self._figures, trainer))
        self._flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()
        if self.summary and self._writes and self.tap is not None:
            self._guard("summarizing findings", self._print_summary)

    def _print_summary(self) -> None:
        print(self.summary_text())

    def summary_text(self) -> str:
        """What the end-of-fit summary prints: what was watched and for how long, what was
        switched off and why, the findings of severity warning or error, and where to look."""
        df = self.to_dataframe()
        steps = df.loc[df["stage"] == "train", "step"]
        layers = len(self.layer_names)
        watched = f"bnprobe watched {_plural(layers, 'BatchNorm layer')}"
        if steps.empty:
            lines = [f"{watched} but measured no training step, so there is nothing to judge."]
        else:
            first, last = int(steps.min()), int(steps.max())
            span = f"step {first}" if first == last else f"steps {first}..{last}"
            lines = [
                f"{watched} at {_plural(steps.nunique(), 'training step')} ({span}, every "
                f"{self._every})"
                + "".join(
                    f", {_plural(df.loc[df['stage'] == stage, 'step'].nunique(), what)}"
                    for stage, what in (("val", "validation"), ("probe", "train/eval probe"))
                    if (df["stage"] == stage).any()
                )
                + "."
            ]
        off = self._switched_off()
        for what, why in off.items():
            lines.append(f"  switched off after an error: {what} ({why})")
        serious = [f for f in self.findings() if f.severity in ("warning", "error")]
        if serious:
            lines.append(f"{_plural(len(serious), 'BatchNorm problem')} found:")
            lines += [f"  - {finding}" for finding in serious]
        elif not steps.empty:
            partly = " in what was measured" if off else ""
            lines.append(f"No BatchNorm problem of severity warning or error found{partly}.")
        run = self.run_dir
        where = f"run `bnprobe report {shlex.quote(str(run))}`" if run is not None else ""
        if serious or off:
            lines.append(
                "  Call BNProbe.report()" + (f" or {where}" if where else "") + " for advice."
            )
        return "\n".join(lines)

    def _switched_off(self) -> dict[str, str]:
        """Parts of the probe switched off after an error, and why (layers included)."""
        off = dict(self._failures)
        if self.tap is not None:
            why = {}
            for line in self.tap.failures:  # "... layer 'x' (Type) failed with Error: msg. ..."
                found = re.search(r"layer '(.*?)' .*? failed with (.*?)\. This layer", line)
                if found:
                    why[found.group(1)] = found.group(2)
            for layer in self.tap.layers:
                if layer.failed:
                    reason = why.get(layer.name, "its hook failed")
                    off.setdefault(f"measuring layer {layer.name!r}", reason)
        return off

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        refs = self.tap.references() if self.tap is not None else self._references
        folder = self.store.save_dir
        return {
            "references": refs,
            "last_step": self._last_step,
            "traced": self._traced,
            "store_dir": None if folder is None else str(folder),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._references = dict(state_dict.get("references", {}))
        self._last_step = int(state_dict.get("last_step", -1))
        self._traced = bool(state_dict.get("traced", False))
        folder = state_dict.get("store_dir")
        self._restored_dir = Path(folder) if isinstance(folder, str) else None
        if self.tap is not None:
            self.tap.load_references(self._references)

    # -- internals -------------------------------------------------------------------------------
    def _gather(self, snap: Snapshot | None, step: int, epoch: int) -> pd.DataFrame | None:
        """Rows of the other ranks and rank_divergence (rank 0), through a collective that every
        rank calls. If the collective itself fails, gathering stops on this rank with a warning."""
        ranks = self._ranks
        assert ranks is not None
        try:
            return ranks.gather(snap, step=step, epoch=epoch)
        except Exception as err:
            self._ranks = None
            _warn(
                f"BNProbe: gathering the rows of every rank failed with {type(err).__name__}: "
                f"{err}. Rank 0's table now holds its own rows only; training goes on."
            )
            return None

    def _record(self, trainer: pl.Trainer, snap: Snapshot, step: int, stage: str) -> None:
        if not self._writes:
            return
        for part in snap.parts:
            self.store.append(part)
        # One TensorBoard event per logging step for all scalars and one for all histograms:
        # add_scalar per key costs ~60 us each (bnprobe.tbfast).
        keep = self._scalar_metrics
        for logger in trainer.loggers:
            if self.log_to == "tensorboard" and not _is_tensorboard(logger):
                continue
            name = f"logging to {type(logger).__name__}"
            self._guard(name, partial(tbfast.log_snapshot, logger, snap, keep))
        if self.histograms and snap.channels:
            for writer, root in _tensorboard_writers(trainer):
                channels = snap.channels
                write = partial(tbfast.add_histograms, writer, stage, step, channels, root=root)
                self._guard("writing TensorBoard histograms", write)
        if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self._flush()

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        from bnprobe.mismatch import check_mismatch

        assert self.tap is not None
        step = int(trainer.global_step)
        paused, self.tap.active = self.tap.active, False  # the probe's forwards are not data
        try:
            rows = check_mismatch(
                pl_module,
                batch,
                layers=self.layers,
                step=step,
                epoch=int(trainer.current_epoch),
                rank=int(trainer.global_rank),
                recal_batches=[b for b in self._recal_batches if b is not batch],
                frozen=self.tap.frozen_layers(),  # the model is in eval mode after validation
            )
        finally:
            self.tap.active = paused
        self._record(trainer, Snapshot([rows]), step, "probe")

    def _figures(self, trainer: pl.Trainer) -> None:
        writers = _tensorboard_writers(trainer) if self._writes else []
        if writers:
            df = self.store.select(tb.FIGURE_METRICS)
            with warnings.catch_warnings():  # matplotlib's, on odd data: the figure says it
                warnings.simplefilter("ignore", RuntimeWarning)
                for writer, root in writers:
                    tb.add_figures(writer, df, int(trainer.global_step), root)

    def _charts(self, trainer: pl.Trainer) -> dict[str, tuple[str, ...]]:
        """The Custom Scalars charts per stage: the metrics logged as scalars; rank_divergence
        only in a multi-process run (the only kind that has it)."""
        charts: dict[str, tuple[str, ...]] = {}
        for stage in ("train", "val", "probe"):
            metrics = tb.METRICS_BY_STAGE[stage]
            if self._world_size <= 1:
                metrics = tuple(m for m in metrics if m != "rank_divergence")
            if self._scalar_metrics is not None:
                metrics = tuple(m for m in metrics if m in self._scalar_metrics)
            if metrics:
                charts[stage] = metrics
        return charts

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        self._guard("saving the store", self.store.flush)

    def _close(self) -> None:
        self._measuring, self._validating, self._first_val_batch = None, False, None
        self._recal_batches = []
        self._flush()
        if self.tap is not None:
            self.tap.detach()

    def _resolve_save_dir(self, trainer: pl.Trainer) -> Path | None:
        """``save_dir``, or ``<log_dir>/bnprobe_store`` of the first logger that has a log_dir,
        or a new ``<default_root_dir>/bnprobe_logs/version_<N>/bnprobe_store``: never a folder
        named like the package, which Python would import in its place."""
        self._fallback_dir = False
        if self.save_dir is False:
            return None
        if self.save_dir is not None:
            return Path(os.fspath(self.save_dir))
        loggers = list(getattr(trainer, "loggers", []))
        log_dir = getattr(loggers[0], "log_dir", None) if loggers else None
        if isinstance(log_dir, str | os.PathLike):
            return Path(os.fspath(log_dir)) / STORE_NAME
        self._fallback_dir = True
        base = Path(os.fspath(trainer.default_root_dir)) / NO_LOGGER_DIR
        return base / f"version_{_next_version(base)}" / STORE_NAME

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        """Run one part of the probe; on error warn once, switch that part off, never raise."""
        if what in self._broken:
            return
        try:
            fn()
        except Exception as err:
            self._broken.add(what)
            self._failures[what] = f"{type(err).__name__}: {err}"
            _warn(
                f"BNProbe: {what} failed with {type(err).__name__}: {err}. "
                "That part of the probe is now off; training goes on."
            )


class BNProbe(BNProbeBase, pl.Callback):
    __doc__ = BNProbeBase.__doc__


def _check_layers(layers: object) -> None:
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


def _check_scalars(scalars: object) -> frozenset[str] | None:
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


def _is_tensorboard(logger: Any) -> bool:
    """A logger that writes TensorBoard event files (Lightning's, or one around tensorboardX)."""
    return hasattr(getattr(logger, "experiment", None), "add_histogram")


def _tensorboard_writers(trainer: pl.Trainer) -> list[tuple[Any, str]]:
    """(writer, tag root) of every TensorBoard logger: the root carries the logger's prefix."""
    return [
        (getattr(logger, "experiment", None), tbfast.logger_root(logger))
        for logger in trainer.loggers
        if _is_tensorboard(logger)
    ]


def _next_version(base: Path) -> int:
    found = [re.fullmatch(r"version_(\d+)", p.name) for p in base.glob("version_*")]
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _check_hooks_fired(tap: BNTap, pl_module: nn.Module) -> None:
    """Warn when no BN hook ran in a measured training step although the model has BN layers:
    the usual cause is a module compiled (and run once) before the probe registered its hooks,
    whose compiled code dynamo keeps reusing without them."""
    live = [layer for layer in tap.layers if not layer.failed]
    if not live or any(layer.calls for layer in live):
        return
    compiled = [
        name or type(pl_module).__name__
        for name, m in pl_module.named_modules()
        if type(m).__name__ == "OptimizedModule" or getattr(m, "_compiler_ctx", None)
    ]
    where = f" ({', '.join(compiled)} is torch.compile'd)" if compiled else ""
    _warn(
        "BNProbe: no BatchNorm layer ran its forward in the first measured training step, so "
        f"nothing is measured{where}. If part of the model was compiled with torch.compile and "
        "called before BNProbe registered its hooks (at fit start), dynamo reuses the compiled "
        "code without them. Compile after the probe attached: pass the compiled module to "
        "trainer.fit, compile inside LightningModule.configure_model, or call "
        "torch._dynamo.reset() before trainer.fit; or set "
        "torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling so that dynamo "
        "recompiles when hooks are added. If the BN layers are simply not used in "
        "training_step, this warning is expected."
    )


def _sync_world_size(module: nn.Module) -> int:
    group = getattr(module, "process_group", None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size(group))
    return 1


def _warn(message: str, category: type[Warning] = UserWarning) -> None:
    warnings.warn(message, category, stacklevel=3)


__all__ = ["FLUSH_EVERY_S", "LOG_TO", "BNProbe", "BNProbeBase", "scalar_metric_names"]
