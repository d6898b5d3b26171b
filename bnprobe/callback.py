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
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from bnprobe import recorder as _recorder
from bnprobe.distributed import RankGather
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
"""The store writes a part file at most this often while training (and always at the end of each
epoch, at the end of fit and when fit fails); read at setup."""
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
        self._validating = False
        self._first_val_batch: Any = None
        self._recal_batches: list[Any] = []
        """Up to ``RECAL_HELD`` validation batches of this epoch for the probe's re-estimate
        (``recal_pred_change``), released after the probe."""
        self._ranks: RankGather | None = None
        self._checked_hooks = False

    # -- public ----------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """The checkpoint key of this probe: its class and the options that shape what it
        measures and where it writes, so that two probes in one Trainer resume separately."""
        layers = self.layers
        if callable(layers):  # a predicate's repr holds its address: name it instead
            layers = f"{getattr(layers, '__module__', '')}.{getattr(layers, '__qualname__', '')}"
        return f"{type(self).__qualname__}" + repr(
            {
                "every_n_steps": self.every_n_steps,
                "layers": layers,
                "per_channel": self.per_channel,
                "save_dir": None if self.save_dir is None else str(self.save_dir),
                "scalars": self.scalars,
            }
        )

    @property
    def store(self) -> Store:
        """The rows collected so far (the recorder's store)."""
        return self.recorder.store

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
        return self.recorder.run_dir

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
            self._warn(
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
            world_size=sync_world_size,
        )
        if distributed:
            self._ranks = RankGather({layer.name: layer.module.eps for layer in self.tap.layers})
        self._writes = bool(trainer.is_global_zero)
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
        if self.tap is None:
            return
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

        self.recorder.guard("collecting measurements", measure)
        snap = taken[0] if taken else None
        if snap is not None and not self._checked_hooks:
            self._checked_hooks = True
            check = partial(check_hooks_fired, tap, pl_module, self._warn)
            self.recorder.guard("checking that the hooks run", check)
        if self._ranks is not None:  # every rank, every measured step: never skip a collective
            others = self._gather(snap, step, epoch)
            if snap is not None and others is not None:
                snap = Snapshot([*snap.parts, others], snap.channels)
        if snap is not None:
            self.recorder.guard("recording measurements", partial(self._record, snap))

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
            self._record(tap.collect(step=step, epoch=epoch, rank=rank, stage="val"))

        self.recorder.guard("measuring validation", pooled)
        batch = self.probe_batch if self.probe_batch is not None else self._first_val_batch
        if batch is not None:
            probe = partial(self._probe, trainer, pl_module, batch)
            self.recorder.guard("the train/eval probe", probe)
        self._recal_batches = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writes:
            self.recorder.draw_figures(int(trainer.global_step))
        self.recorder.flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.flush()
        if self.summary and self._writes and self.tap is not None:
            self.recorder.guard("summarizing findings", self._print_summary)

    def _print_summary(self) -> None:
        print(self.summary_text())

    def summary_text(self) -> str:
        """What the end-of-fit summary prints: what was watched and for how long, what was
        switched off and why, the findings of severity warning or error, and where to look."""
        return summary_text(
            self.to_dataframe(),
            self.findings(),
            layers=len(self.layer_names),
            every=self._every,
            off=switched_off(self.recorder.failures, self.tap),
            run_dir=self.run_dir,
        )

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
    def _gather(self, snap: Snapshot | None, step: int, epoch: int) -> pd.DataFrame | None:
        """Rows of the other ranks and rank_divergence (rank 0), through a collective that every
        rank calls. If the collective itself fails, gathering stops on this rank with a warning."""
        ranks = self._ranks
        assert ranks is not None
        try:
            return ranks.gather(snap, step=step, epoch=epoch)
        except Exception as err:
            self._ranks = None
            self._warn(
                f"BNProbe: gathering the rows of every rank failed with {type(err).__name__}: "
                f"{err}. Rank 0's table now holds its own rows only; training goes on."
            )
            return None

    def _record(self, snap: Snapshot) -> None:
        if self._writes:
            self.recorder.record(snap)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        assert self.tap is not None
        held = [b for b in self._recal_batches if b is not batch]
        epoch, rank = int(trainer.current_epoch), int(trainer.global_rank)
        snap = probe(
            self.tap, pl_module, self.layers, batch, held, int(trainer.global_step), epoch, rank
        )
        self._record(snap)

    def _close(self) -> None:
        self._measuring, self._validating, self._first_val_batch = None, False, None
        self._recal_batches = []
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
        """Warn once per message, on rank zero only (``rank_zero_warn``)."""
        if message in self._warned:
            return
        self._warned.add(message)
        _warn(message, stacklevel=4)


class BNProbe(BNProbeBase, pl.Callback):
    __doc__ = BNProbeBase.__doc__
    _tensorboard_logger = TensorBoardLogger


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
