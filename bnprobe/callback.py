"""The Lightning adapter: :class:`BNProbe` drives a :class:`~bnprobe.tap.BNTap` from trainer hooks
and hands what it measures to a :class:`~bnprobe.recorder.Recorder`.

It owns the options, the schedule (which steps to measure), rank handling (only rank zero
writes; warnings once, on rank zero), the train/eval probe after validation, and resume
(``state_dict`` under a ``state_key`` of its options). It resolves the trainer's
``TensorBoardLogger`` objects by ``isinstance`` and hands the recorder bnprobe's own event writer
in each one's ``log_dir`` (never Lightning's ``SummaryWriter``: a disk error in bnprobe's events
must not reach the user's logging), and closes them at teardown; the sinks,
the flush policy and the failure isolation are the recorder's. Only this module and
:mod:`bnprobe.lightning` import Lightning. :class:`BNProbeBase` holds the logic with the logger
class as a class attribute, so the same body serves ``pytorch_lightning`` (here) and
``lightning.pytorch`` (:mod:`bnprobe.lightning`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from bnprobe import recorder as _recorder
from bnprobe.distributed import RankGather
from bnprobe.distributed import capacity as gather_capacity
from bnprobe.distributed.gather import BATCH as GATHER_BATCH
from bnprobe.drive import RECAL_HELD, check_hooks_fired, probe, sync_world_size
from bnprobe.options import (
    LOG_TO,
    NO_LOGGER_DIR,
    check_options,
    resolve_save_dir,
    scalar_metric_names,
)
from bnprobe.recorder import Recorder, summary_text, switched_off
from bnprobe.store import Store
from bnprobe.tap import BNTap, LayerSelection, Snapshot, find_layers
from bnprobe.tensorboard import EventWriter, tag_root

if TYPE_CHECKING:
    from bnprobe.diagnosis import Finding

FLUSH_EVERY_S = _recorder.FLUSH_EVERY_S
"""The store writes a part file at most this often while training (and always when it holds
``Store.spill_rows`` unsaved rows, at the end of each epoch, before a checkpoint, at the end of
fit and when fit fails); read at setup."""
LEGACY_STATE_KEY = "BNProbe"
"""The checkpoint key of every probe before probes had a :attr:`BNProbeBase.state_key`; such a
checkpoint resumes the one probe of a Trainer (:meth:`BNProbeBase.on_load_checkpoint`)."""


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
        gather_every: under DDP, bring the other ranks' train rows to rank 0 at every k-th
            measured step only (default 1: every measured step). Rank 0 keeps its own rows at
            every measured step; what it holds for the other ranks shrinks k-fold
            (docs/scaling.md). No effect in a single process.
        gather_batch: under DDP, the most gathered steps whose rows travel to rank 0 in one
            collective (default 32): the collective's fixed cost is paid once per that many
            steps, and rank 0 gets the other ranks' rows and ``rank_divergence`` up to that
            many gathered steps late (always before the end of each epoch, each checkpoint and
            the end of fit). 1: at every gathered step. No effect in a single process.

    Two probes with different options may share one Trainer: each keeps its own checkpoint
    state under :attr:`state_key` (give them different ``save_dir`` folders).

    TensorBoard loggers get these in bnprobe's own event file in their ``log_dir``
    (``events.out.tfevents.*.bnprobe``, read with Lightning's as one run), not through their
    ``SummaryWriter``: a full disk stops bnprobe's events with one warning, never the user's
    ``self.log`` or ``fit``.

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

    _tensorboard_logger: type[Any] = TensorBoardLogger
    """The trainer loggers in whose ``log_dir`` bnprobe writes its event file (by isinstance)."""
    _tap_class: type[BNTap] = BNTap
    """What measures the layers (a subclass may change how; the failure tests use one)."""
    _gather_class: type[RankGather] = RankGather
    """What brings the other ranks' rows to rank 0 under DDP."""

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
        gather_every: int = 1,
        gather_batch: int = GATHER_BATCH,
    ) -> None:
        for name, value in (("gather_every", gather_every), ("gather_batch", gather_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BNProbe({name}=...) must be a positive int; got {value!r}")
        self._scalar_metrics = check_options(
            every_n_steps=every_n_steps,
            layers=layers,
            flags=(
                ("histograms", histograms),
                ("per_channel", per_channel),
                ("summary", summary),
            ),
            save_dir=save_dir,
            log_to=log_to,
            scalars=scalars,
        )
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.histograms = histograms
        self.per_channel = per_channel
        self.probe_batch = probe_batch
        self.save_dir = save_dir
        self.summary = summary
        self.log_to = log_to
        self.scalars = scalars
        self.gather_every = gather_every
        self.gather_batch = gather_batch
        self.tap: BNTap | None = None
        self.recorder = Recorder(warn=self._warn)
        self._every = every_n_steps or 1
        self._measuring: int | None = None
        self._last_step = -1
        self._traced = False
        self._references: dict[str, dict[str, torch.Tensor]] = {}
        self._warned: set[str] = set()
        self._restored_dir: Path | None = None  # the store folder of the checkpointed run
        self._fallback_dir = False  # the store went to <default_root_dir>/bnprobe_logs
        self._world_size = 1
        self._writes = False
        self._gathered: list[tuple[int, int, str | None]] = []
        """Under DDP: the gathered steps not handed to the gather yet, as (step, epoch, why this
        rank has no rows of it), and :attr:`_taken` this rank's rows of them, as the tap gave
        them (steps processed in blocks, or one at a time): :meth:`_hand_over`."""
        self._taken: list[Snapshot] = []
        self._validating = False
        self._first_val_batch: Any = None
        self._recal_batches: list[Any] = []
        """Up to ``RECAL_HELD`` validation batches of this epoch for the probe's re-estimate
        (``recal_pred_change``), released after the probe."""
        self._ranks: RankGather | None = None
        self._why: str | None = None  # why this rank measures nothing at the current step
        self._told_failures = 0  # tap failures passed on to rank 0
        self._checked_hooks = False
        self._state_key: tuple[tuple[Any, ...], str] | None = None

    # -- public ----------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """The checkpoint key of this probe: its class and the options that shape what it
        measures and where it writes, so that two probes in one Trainer resume separately.
        Lightning reads it at every hook it calls (its profiler's label): the key is built
        again only when one of those options changed."""
        layers, scalars = self.layers, self.scalars
        options = (
            self.every_n_steps,
            tuple(layers) if isinstance(layers, list) else layers,  # a list changed in place too
            self.per_channel,
            self.save_dir,
            tuple(scalars) if isinstance(scalars, list) else scalars,
        )
        memo = self._state_key
        if memo is not None and memo[0] == options:
            return memo[1]
        if callable(layers):  # a predicate's repr holds its address: name it instead
            layers = f"{getattr(layers, '__module__', '')}.{getattr(layers, '__qualname__', '')}"
        key = f"{type(self).__qualname__}" + repr(
            {
                "every_n_steps": self.every_n_steps,
                "layers": layers,
                "per_channel": self.per_channel,
                "save_dir": None if self.save_dir is None else str(self.save_dir),
                "scalars": self.scalars,
            }
        )
        self._state_key = options, key
        return key

    @property
    def store(self) -> Store:
        """The rows collected so far (the recorder's store; the steps the tap keeps for a
        block are recorded first)."""
        self._drain()
        return self.recorder.store

    def to_dataframe(self, **filters: Any) -> pd.DataFrame:
        """Every row collected so far (SPEC schema), read back from the store's part files.
        Filters as :func:`bnprobe.load`: ``stages=``, ``layers=``, ``metrics=``,
        ``steps=(first, last)``, ``constants=``."""
        return self.store.to_dataframe(**filters)  # the store property drains the tap first

    def findings(self) -> list[Finding]:
        """What is wrong with the BN layers so far, in plain words (:func:`bnprobe.diagnose`,
        from the recorder's running state: the cost does not grow with the run)."""
        self._drain()
        return self.recorder.findings()

    def report(self) -> str:
        """A readable summary: latest key metrics per layer, then findings with advice."""
        self._drain()
        return self.recorder.report()

    @property
    def store_dir(self) -> Path | None:
        """The folder the parquet store is written to (None: not saved, or not set up yet)."""
        return self.store.save_dir

    @property
    def run_dir(self) -> Path | None:
        """The run folder to give ``bnprobe report`` or ``bnprobe.load``: the store folder's
        parent when it has the default name, else the store folder (None: not saved)."""
        return self.recorder.run_dir

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the BN layers being measured."""
        return [layer.name for layer in self.tap.layers] if self.tap is not None else []

    # -- trainer hooks ---------------------------------------------------------------------------
    # Every hook runs its body under the recorder's guard (a failure warns once, switches that
    # part off, and training goes on). Under DDP the collectives (:meth:`_exchange`) sit
    # outside the guarded bodies and depend on the schedule only (the measured steps, the
    # validation epochs, the end of fit), never on what happened inside the probe, so that every
    # rank calls them whatever failed on any rank.
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.tap is not None or self._ranks is not None:
            return
        self._every = self.every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if not find_layers(pl_module):
            self._warn(
                f"BNProbe: {type(pl_module).__name__} has no BatchNorm layer "
                "(no torch.nn.modules.batchnorm._BatchNorm); the probe does nothing."
            )
            return
        found = find_layers(pl_module, self.layers)  # a selection error is the user's: it raises
        self._world_size = int(getattr(trainer, "world_size", 1))
        self._writes = bool(trainer.is_global_zero)
        if self._world_size > 1:  # first, and whatever fails next: the collectives need it
            bound = partial(gather_capacity, [m.num_features for m in found.values()])
            self._ranks = self._gather_class(
                {}, warn=self._warn, capacity=bound, batch=self.gather_batch
            )
        self.recorder.guard("setting up", partial(self._setup, trainer, pl_module))

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        distributed = self._ranks is not None
        self.tap = self._tap_class(
            pl_module,
            self.layers,
            keep_channels=self.histograms or distributed,  # rank_divergence needs mu_R, var_R
            per_channel=self.per_channel,
            world_size=sync_world_size,
        )
        if self._ranks is not None:
            self._ranks.eps = {layer.name: layer.module.eps for layer in self.tap.layers}
        save_dir = self._resolve_save_dir(trainer)
        store = Store(save_dir if self._writes else None, rank=int(trainer.global_rank))
        loggers = list(trainer.loggers) if self._writes else []
        boards = [lg for lg in loggers if isinstance(lg, self._tensorboard_logger)]
        self.recorder = Recorder(
            store,
            writers=[(EventWriter(lg.log_dir), tag_root(_logger_prefix(lg))) for lg in boards],
            loggers=[lg for lg in loggers if lg not in boards] if self.log_to == "all" else [],
            histograms=self.histograms,
            scalars=self._scalar_metrics,
            flush_every_s=FLUSH_EVERY_S,
            warn=self._warn,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tap is not None:
            self.recorder.guard("starting", self._fit_start)

    def _fit_start(self) -> None:
        assert self.tap is not None
        self.tap.load_references(self._references)
        self.tap.attach()
        if self._fallback_dir and self._restored_dir is not None and self._writes:
            self.store.save_dir = self._restored_dir  # a resumed run appends to its own store
        if self._writes:
            self.recorder.start(self.recorder.charts(self._world_size))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if (self.tap is None and self._ranks is None) or step == self._last_step:
            return
        if step % self._every:
            return
        self._measuring = step  # by the schedule alone: every rank gathers at this step
        self._why = None
        if self.tap is None:
            self._why = self._setup_failed()
            return
        tap = self.tap

        def start() -> None:
            try:
                tap.start(trace=not self._traced)
            except Exception:
                tap.active = False  # a half-started tap measures nothing
                raise
            self._traced = True

        self._why = self._guarded("starting a measurement", start)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._measuring is None:
            return
        step, self._measuring = self._measuring, None
        self._last_step = step
        epoch = int(trainer.current_epoch)
        taken: list[Snapshot | None] = []
        why = self._why
        if why is None and self.tap is not None:
            tap = self.tap

            def measure() -> None:
                taken.append(self._collect(tap, trainer, step, epoch))

            why = self._guarded("collecting measurements", measure)
        snap = taken[0] if taken else None
        if why is None and taken and not self._checked_hooks and self.tap is not None:
            self._checked_hooks = True
            check = partial(check_hooks_fired, self.tap, pl_module, self._warn)
            self.recorder.guard("checking that the hooks run", check)
        if snap is not None:
            self.recorder.guard("recording measurements", partial(self._record, snap))
        if self._ranks is not None and self._gathers(step):
            self._exchange(snap, why, step, epoch)  # every rank: never skip it

    def _collect(self, tap: BNTap, trainer: pl.Trainer, step: int, epoch: int) -> Snapshot | None:
        """This step's measurements, kept for a block of steps
        (:meth:`~bnprobe.tap.BNTap.keep`; the rows of a block when one ends, else None); at
        once (:meth:`~bnprobe.tap.BNTap.collect`) under DDP with ``gather_every`` > 1, where
        only some steps go to the gather."""
        rank = int(trainer.global_rank)
        if self._ranks is not None and self.gather_every > 1:
            return tap.collect(step=step, epoch=epoch, rank=rank)
        return tap.keep(step=step, epoch=epoch, rank=rank)

    def _drain(self) -> None:
        """Record the measured steps the tap keeps for a block (:meth:`BNTap.drain`): wherever
        anyone needs the rows (validation, the end of an epoch, a checkpoint, the end of fit,
        a failure, every read of the table)."""
        tap = self.tap
        if tap is not None and tap.pending:
            self.recorder.guard("recording measurements", partial(self._record_drained, tap))

    def _record_drained(self, tap: BNTap) -> None:
        snap = tap.drain()
        if snap is not None:
            self._record(snap)
            if self._ranks is not None:  # steps kept only with gather_every 1: all gathered
                self._taken.append(snap)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.tap is None and self._ranks is None) or trainer.sanity_checking:
            return
        self._validating = True  # by the schedule alone: every rank gathers at its end
        self._drain()
        tap = self.tap
        if tap is not None:
            self.recorder.guard("measuring validation", partial(tap.start, pool=True))

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._validating:
            return
        if self._first_val_batch is None and batch_idx == dataloader_idx == 0:
            self._first_val_batch = batch  # kept as is: the default probe batch
        if dataloader_idx == 0 and len(self._recal_batches) < RECAL_HELD:
            self._recal_batches.append(batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validating:
            return
        self._validating = False
        step, tap = int(trainer.global_step), self.tap
        if tap is not None:

            def pooled() -> None:
                epoch, rank = int(trainer.current_epoch), int(trainer.global_rank)
                self._record(tap.collect(step=step, epoch=epoch, rank=rank, stage="val"))

            self.recorder.guard("measuring validation", pooled)
        batch = self.probe_batch if self.probe_batch is not None else self._first_val_batch
        self._probe_agreed(trainer, pl_module, batch)
        self._recal_batches = []
        if self._ranks is not None:  # what the other ranks could not say, said by rank 0
            self._flush_ranks(step, int(trainer.current_epoch))

    def _probe_agreed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """The train/eval probe; under DDP with SyncBatchNorm layers its forwards are
        collectives (the layers all-reduce their moments), so the ranks agree first whether
        every one of them runs it and on how many held batches, and after whether it failed
        anywhere: then it is off on every rank, not just on the rank that failed (which would
        leave the others waiting in SyncBatchNorm's all-reduce at the next validation). What
        cannot be made safe: a rank failing *between* two of the probe's SyncBatchNorm forwards
        (docs/scaling.md)."""
        what = "the train/eval probe"
        ranks, tap = self._ranks, self.tap
        ready = batch is not None and tap is not None and what not in self.recorder.failures
        held = [b for b in self._recal_batches if b is not batch]
        if ranks is None:
            if ready:
                self.recorder.guard(what, partial(self._probe, trainer, pl_module, batch, held))
            return
        collective = self._collective_probe(pl_module)
        agreed = self._agree(len(held) if ready else -1, "min")
        if collective:
            if agreed < 0:
                return
            held = held[:agreed]
        if ready:
            self.recorder.guard(what, partial(self._probe, trainer, pl_module, batch, held))
        failed = self._agree(int(what in self.recorder.failures), "max")
        if collective and failed and what not in self.recorder.failures:
            self.recorder.failures[what] = "it failed on another rank (SyncBatchNorm)"

    def _collective_probe(self, pl_module: pl.LightningModule) -> bool:
        return any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain()
        if self._ranks is not None:  # the other ranks' rows of this epoch, before the figures
            self._flush_ranks(int(trainer.global_step), int(trainer.current_epoch))
        if self._writes:
            self.recorder.draw_figures(int(trainer.global_step))
        self.recorder.flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain()
        if self._ranks is not None:  # the other ranks' last rows and warnings
            self._flush_ranks(int(trainer.global_step), int(trainer.current_epoch))
        self.recorder.flush()
        if self.summary and self._writes and self.tap is not None:
            self.recorder.guard("summarizing findings", self._print_summary)

    def _print_summary(self) -> None:
        print(self.summary_text())

    def summary_text(self) -> str:
        """What the end-of-fit summary prints: what was watched and for how long, what was
        switched off and why, the findings of severity warning or error, and where to look."""
        self._drain()
        return summary_text(
            self.recorder.steps(),
            self.findings(),
            layers=len(self.layer_names),
            every=self._every,
            off=switched_off(self.recorder.failures, self.tap),
            run_dir=self.run_dir,
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.recorder.guard("closing", self._close)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.recorder.guard("closing", self._close)

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

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Save the store before the checkpoint is written, so that the store is at least as
        recent as any checkpoint: a run resumed from it re-measures from there and has no hole
        (rows measured after the last save would otherwise be lost with the process); under
        DDP the other ranks' rows waiting for their exchange come first (every rank saves the
        same checkpoints: Lightning calls this on every rank)."""
        self._drain()
        if self._ranks is not None:
            self._flush_ranks(int(trainer.global_step), int(trainer.current_epoch))
        self.recorder.flush()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume from a checkpoint saved before probes had a ``state_key``: its probe state is
        under ``"BNProbe"``. With exactly one probe in the Trainer it is this probe's (Lightning
        then finds nothing under :attr:`state_key` and loads nothing more); with several,
        which one it belongs to is unknown, so none takes it (one warning)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or LEGACY_STATE_KEY not in states:
            return
        probes = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, BNProbeBase)]
        if len(probes) == 1:
            self.load_state_dict(copy.deepcopy(states[LEGACY_STATE_KEY]))
        else:
            self._warn(
                f"BNProbe: the checkpoint holds the state of one probe under the old key "
                f"{LEGACY_STATE_KEY!r}, and this Trainer has {len(probes)} probes, so none "
                "resumes from it: each starts its store and drift references afresh."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._references = dict(state_dict.get("references", {}))
        self._last_step = int(state_dict.get("last_step", -1))
        self._traced = bool(state_dict.get("traced", False))
        folder = state_dict.get("store_dir")
        self._restored_dir = Path(folder) if isinstance(folder, str) else None
        if self.tap is not None:
            self.tap.load_references(self._references)

    # -- internals -------------------------------------------------------------------------------
    def _gathers(self, step: int) -> bool:
        """Whether this measured step is gathered to rank 0 (``gather_every``): a function of
        the step alone, so every rank answers the same."""
        return (step // self._every) % self.gather_every == 0

    def _exchange(self, snap: Snapshot | None, why: str | None, step: int, epoch: int) -> None:
        """Note this gathered step (``why``: why this rank has no rows of it) and the rows the
        tap gave now (``snap``: this step's, or a block's that ends here, or None while the tap
        keeps the step for a block), and exchange with the other ranks when a batch is full: by
        the count of gathered steps alone, the same on every rank."""
        ranks = self._ranks
        assert ranks is not None
        if snap is not None:
            self._taken.append(snap)
        self._gathered.append((step, epoch, why))
        if ranks.fills(len(self._gathered)):
            self._flush_ranks(step, epoch)

    def _hand_over(self, ranks: RankGather) -> None:
        """Add every gathered step noted since the last exchange to the gather, in step order,
        exactly once each whatever failed: a block of the tap as one block
        (:meth:`RankGather.add` counts its steps), a step without rows with why."""
        gathered, taken = self._gathered, self._taken
        self._gathered, self._taken = [], []
        epochs = {step: epoch for step, epoch, _ in gathered}
        starts: dict[int, tuple[Snapshot, list[int]]] = {}
        covered: set[int] = set()
        for snap in taken:
            steps = _train_steps(snap)
            if steps and covered.isdisjoint(steps) and all(s in epochs for s in steps):
                starts[steps[0]] = snap, steps
                covered.update(steps)
        for step, epoch, why in gathered:
            if step in starts:
                snap, steps = starts[step]
                if len(steps) == 1:
                    ranks.add(snap, step=step, epoch=epoch)
                else:
                    ranks.add(_per_step(snap, steps), step=steps, epoch=[epochs[s] for s in steps])
            elif step not in covered:
                ranks.add(None, step=step, epoch=epoch, error=why)

    def _flush_ranks(self, step: int, epoch: int) -> None:
        """Exchange the gathered steps not sent yet (a collective every rank calls at the same
        points, with or without steps) and record, on rank 0, the other ranks' rows and the
        rank_divergence they bring. Only a broken process group raises in the exchange: then
        gathering stops on this rank with a warning (the other ranks see the same error, or
        time out once, and stop too)."""
        ranks = self._ranks
        assert ranks is not None
        self._drain()  # the steps the tap keeps, then every gathered step to the gather
        self._hand_over(ranks)
        if not self._writes and self.tap is not None:
            for line in self.tap.failures[self._told_failures :]:
                ranks.tell(line)  # a layer switched off on this rank: rank 0 says so
            self._told_failures = len(self.tap.failures)
        try:
            others = ranks.exchange(step=step, epoch=epoch)
        except Exception as err:
            self._ranks = None
            self._warn(
                f"BNProbe: gathering the rows of every rank failed with {type(err).__name__}: "
                f"{err}. Rank 0's table now holds its own rows only; training goes on."
            )
            return
        if others:
            self.recorder.guard("recording measurements", partial(self._record, Snapshot(others)))

    def _agree(self, value: int, op: str) -> int:
        """:meth:`RankGather.agree`, or ``value`` once gathering stopped (see :meth:`_exchange`)."""
        ranks = self._ranks
        if ranks is None:
            return value
        try:
            return ranks.agree(value, op)
        except Exception as err:
            self._ranks = None
            self._warn(
                f"BNProbe: agreeing with the other ranks failed with {type(err).__name__}: "
                f"{err}. Rank 0's table now holds its own rows only; training goes on."
            )
            return value

    def _guarded(self, what: str, fn: Any) -> str | None:
        """Run ``fn`` under the recorder's guard; why it failed (now or before), or None."""
        self.recorder.guard(what, fn)
        why = self.recorder.failures.get(what)
        return None if why is None else f"{what} failed with {why}"

    def _setup_failed(self) -> str:
        why = self.recorder.failures.get("setting up", "the probe was not set up")
        return f"setting up failed with {why}"

    def _record(self, snap: Snapshot) -> None:
        if self._writes:
            self.recorder.record(snap)

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, held: list[Any]
    ) -> None:
        assert self.tap is not None
        epoch, rank = int(trainer.current_epoch), int(trainer.global_rank)
        snap = probe(
            self.tap, pl_module, self.layers, batch, held, int(trainer.global_step), epoch, rank
        )
        self._record(snap)

    def _close(self) -> None:
        self._measuring, self._validating, self._first_val_batch = None, False, None
        self._recal_batches = []
        self._drain()
        self.recorder.close()
        for writer, _ in self.recorder.writers:
            self.recorder.guard("writing TensorBoard events", writer.close)
        if self.tap is not None:
            self.tap.detach()

    def _resolve_save_dir(self, trainer: pl.Trainer) -> Path | None:
        """The store folder (:func:`bnprobe.options.resolve_save_dir`) with the log_dir of the
        trainer's first logger."""
        loggers = list(getattr(trainer, "loggers", []))
        log_dir = getattr(loggers[0], "log_dir", None) if loggers else None
        folder, self._fallback_dir = resolve_save_dir(
            self.save_dir, log_dir, trainer.default_root_dir
        )
        return folder

    def _warn(self, message: str) -> None:
        """Warn once per message, on rank zero only (``rank_zero_warn``); under DDP another
        rank's message goes to rank 0 with the next gather, which warns naming that rank."""
        if message in self._warned:
            return
        self._warned.add(message)
        if self._ranks is not None and not self._writes:
            self._ranks.tell(message)
        _warn(message, stacklevel=4)


class BNProbe(BNProbeBase, pl.Callback):
    __doc__ = BNProbeBase.__doc__
    _tensorboard_logger = TensorBoardLogger


def _train_steps(snap: Snapshot) -> list[int]:
    """The steps of a snapshot's layer rows of stage train, in order."""
    steps: set[int] = set()
    for part in snap.parts:
        if part.channels is None and part.stage == "train":
            if not part.multi:
                steps.add(int(part.step))
                continue
            step = np.asarray(part.step)  # a block's rows come step by step: read run starts
            if len(step):
                starts = np.flatnonzero(step[1:] != step[:-1]) + 1
                steps.update(step[[0, *starts.tolist()]].tolist())
    return sorted(steps)


def _per_step(snap: Snapshot, steps: list[int]) -> Snapshot:
    """A snapshot of several steps as :meth:`RankGather.add` takes a block: its channels one
    mapping per step (empty where the step has none)."""
    by_step = {step: ch for stage, step, ch in snap.step_channels() if stage == "train"}
    return Snapshot(snap.parts, cast(Any, [by_step.get(step, {}) for step in steps]))


def _logger_prefix(logger: TensorBoardLogger) -> str:
    """The ``prefix`` a TensorBoardLogger puts before its keys. Lightning keeps it in the private
    ``_prefix`` and offers no public accessor, so this is read with getattr (empty when absent)."""
    return str(getattr(logger, "_prefix", "") or "")


def _warn(message: str, stacklevel: int = 3) -> None:
    """``rank_zero_warn`` attributed to the bnprobe frame ``stacklevel`` calls up."""
    rank_zero_warn(message, stacklevel=stacklevel + 3, category=UserWarning)


__all__ = [
    "FLUSH_EVERY_S",
    "LEGACY_STATE_KEY",
    "LOG_TO",
    "NO_LOGGER_DIR",
    "BNProbe",
    "BNProbeBase",
    "scalar_metric_names",
]
