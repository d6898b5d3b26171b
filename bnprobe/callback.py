"""The Lightning adapter: :class:`BNProbe` drives a :class:`~bnprobe.tap.BNTap` from trainer hooks
and hands what it measures to a :class:`~bnprobe.recorder.Recorder`.

It owns the options, the schedule (which steps to measure), rank handling (only rank zero
writes; warnings once, on rank zero), the train/eval probe after validation, and resume
(``state_dict`` under a ``state_key`` of its options). It resolves the trainer's
``TensorBoardLogger`` objects by ``isinstance`` and hands their ``SummaryWriter`` down; the sinks,
the flush policy and the failure isolation are the recorder's. Only this module and
:mod:`bnprobe.lightning` import Lightning. :class:`BNProbeBase` holds the logic with the logger
class as a class attribute, so the same body serves ``pytorch_lightning`` (here) and
``lightning.pytorch`` (:mod:`bnprobe.lightning`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from bnprobe import recorder as _recorder
from bnprobe import store as _store
from bnprobe.distributed import RankGather
from bnprobe.recorder import Recorder, summary_text, switched_off
from bnprobe.store import STORE_NAME, Store
from bnprobe.tap import BNTap, LayerSelection, Snapshot, find_layers
from bnprobe.tensorboard import tag_root

if TYPE_CHECKING:
    from bnprobe.diagnosis import Finding

RECAL_HELD = 3
"""Validation batches (the first of each epoch) that the probe also re-estimates the running
statistics on for ``recal_pred_change``/``recal_logits_shift`` (docs/mismatch.md)."""

FLUSH_EVERY_S = _recorder.FLUSH_EVERY_S
"""The store writes a part file at most this often while training (and always at the end of each
epoch, at the end of fit and when fit fails); read at setup."""

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
        fast_checksums: during fit, have TensorBoard checksum its event records with the C
            library ``google-crc32c`` (``pip install "bnprobe[fast-crc]"``) instead of its
            pure-Python loop; put back at teardown. Off by default (docs/performance.md).

    Two probes with different options may share one Trainer: each keeps its own checkpoint
    state under :attr:`state_key` (give them different ``save_dir`` folders).

    Logged keys (scalars, through the TensorBoard loggers, or every logger with
    ``log_to="all"``; rank zero only), one per BN layer:

    - ``bnprobe/train/<metric>/<layer>`` for ``batch_mean``, ``batch_var``, ``running_mean``,
      ``running_var``, ``mean_shift``, ``mean_shift_max``, ``var_shift``, ``var_shift_max``,
      ``kl``, ``kl_max``, ``outlier_frac``, ``mean_shift_excess``, ``mean_shift_excess_max``,
      ``var_shift_excess``, ``var_shift_excess_max``, ``running_invalid``,
      ``num_batches_tracked``, ``warmup_residual``, ``samples_per_channel``, ``nonfinite``,
      ``gamma_mean``, ``gamma_std``, ``beta_mean``, ``beta_std``, ``gamma_drift``,
      ``beta_drift``, ``gamma_small_frac``, and the structural ``forward_calls``, ``train_mode``,
      ``model_train_mode``, ``momentum``, ``has_running_stats`` (``input_bias`` and
      ``input_dropout`` at the first measured step);
    - ``bnprobe/val/<metric>/<layer>`` and ``bnprobe/probe/<metric>/<layer>`` after each
      validation, ``bnprobe/<stage>/epoch`` with every logging step;
    - histograms ``bnprobe/train/hist/{gamma,beta,d,v}/<layer>`` and figures
      ``bnprobe/<stage>/figure/<name>`` (TensorBoard only).

    With a logger made with ``prefix="exp"`` every key starts with ``exp-bnprobe/`` instead,
    histograms, figures and the Custom Scalars layout included.
    docs/metrics.md defines each metric.
    """

    _tensorboard_logger: type[Any] = TensorBoardLogger
    """The trainer loggers whose ``SummaryWriter`` the recorder writes into (by isinstance)."""

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
        fast_checksums: bool = False,
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
        flags = (
            ("histograms", histograms),
            ("per_channel", per_channel),
            ("summary", summary),
            ("fast_checksums", fast_checksums),
        )
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
        self.fast_checksums = fast_checksums
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
            world_size=_sync_world_size,
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
            writers=[(lg.experiment, tag_root(_logger_prefix(lg))) for lg in boards],
            loggers=[lg for lg in loggers if lg not in boards] if self.log_to == "all" else [],
            histograms=self.histograms,
            scalars=self._scalar_metrics,
            flush_every_s=FLUSH_EVERY_S,
            fast_checksums=self.fast_checksums,
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
            check = partial(_check_hooks_fired, tap, pl_module, self._warn)
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
        self._record(Snapshot([rows]))

    def _close(self) -> None:
        self._measuring, self._validating, self._first_val_batch = None, False, None
        self._recal_batches = []
        self.recorder.close()
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

    def _warn(self, message: str) -> None:
        """Warn once per message, on rank zero only (``rank_zero_warn``)."""
        if message in self._warned:
            return
        self._warned.add(message)
        _warn(message, stacklevel=4)


class BNProbe(BNProbeBase, pl.Callback):
    __doc__ = BNProbeBase.__doc__
    _tensorboard_logger = TensorBoardLogger


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


def _logger_prefix(logger: TensorBoardLogger) -> str:
    """The ``prefix`` a TensorBoardLogger puts before its keys. Lightning keeps it in the private
    ``_prefix`` and offers no public accessor, so this is read with getattr (empty when absent)."""
    return str(getattr(logger, "_prefix", "") or "")


def _next_version(base: Path) -> int:
    found = [re.fullmatch(r"version_(\d+)", p.name) for p in base.glob("version_*")]
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


def _check_hooks_fired(tap: BNTap, pl_module: nn.Module, warn: Callable[[str], None]) -> None:
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
    warn(
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


def _warn(message: str, stacklevel: int = 3) -> None:
    """``rank_zero_warn`` attributed to the bnprobe frame ``stacklevel`` calls up."""
    rank_zero_warn(message, stacklevel=stacklevel + 3, category=UserWarning)


__all__ = ["FLUSH_EVERY_S", "LOG_TO", "BNProbe", "BNProbeBase", "scalar_metric_names"]
