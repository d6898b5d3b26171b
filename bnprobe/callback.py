"""The Lightning adapter: :class:`BNProbe` drives a :class:`~bnprobe.tap.BNTap` from trainer hooks.

All the logic lives in :class:`BNProbeBase`, which uses only duck-typed trainer attributes, so the
same class body serves ``pytorch_lightning`` (here) and ``lightning.pytorch``
(:mod:`bnprobe.lightning`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn

from bnprobe import tbfast
from bnprobe import tensorboard as tb
from bnprobe.distributed import RankGather
from bnprobe.store import Store
from bnprobe.tap import BNTap, LayerSelection, Snapshot, find_layers

if TYPE_CHECKING:
    from bnprobe.diagnosis import Finding

RECAL_HELD = 3
"""Validation batches (the first of each epoch) that the probe also re-estimates the running
statistics on for ``recal_pred_change``/``recal_logits_shift`` (docs/mismatch.md)."""

FLUSH_EVERY_S = 30.0
"""The store writes a part file at most this often while training (and always at the end of each
epoch, at the end of fit and when fit fails)."""


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
        save_dir: where the parquet store goes; default ``<trainer.log_dir>/bnprobe``;
            False: no store.
        summary: at the end of fit, print the findings of severity warning or error (rank 0).

    Logged keys (scalars, through every logger of the trainer, rank zero only), one per BN layer:

    - ``bnprobe/train/<metric>/<layer>`` for ``batch_mean``, ``batch_var``, ``running_mean``,
      ``running_var``, ``mean_shift``, ``mean_shift_max``, ``var_shift``, ``var_shift_max``,
      ``kl``, ``kl_max``, ``outlier_frac``, ``mean_shift_excess``, ``mean_shift_excess_max``,
      ``var_shift_excess``, ``var_shift_excess_max``, ``running_invalid``,
      ``num_batches_tracked``, ``warmup_residual``, ``samples_per_channel``, ``nonfinite``,
      ``gamma_mean``, ``gamma_std``, ``beta_mean``, ``beta_std``, ``gamma_drift``,
      ``beta_drift``, ``gamma_small_frac``, and the structural ``forward_calls``, ``train_mode``,
      ``model_train_mode``, ``momentum``, ``has_running_stats`` (``input_bias`` and
      ``input_dropout`` at the first measured step);
    - histograms ``bnprobe/train/hist/{gamma,beta,d,v}/<layer>`` (TensorBoard only).

    docs/metrics.md defines each metric.
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
                "BNProbe(save_dir=...) must be a folder path, None (<trainer.log_dir>/bnprobe) "
                f"or False (do not save); got {save_dir!r}"
            )
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.histograms = histograms
        self.per_channel = per_channel
        self.probe_batch = probe_batch
        self.save_dir = save_dir
        self.summary = summary
        self.tap: BNTap | None = None
        self.store = Store(None)
        self._every = every_n_steps or 1
        self._measuring: int | None = None
        self._last_step = -1
        self._traced = False
        self._references: dict[str, dict[str, torch.Tensor]] = {}
        self._broken: set[str] = set()
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
        distributed = int(getattr(trainer, "world_size", 1)) > 1
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
        if self._writes:
            writers = _tensorboard_writers(trainer)
            if any(tbfast.summary_writer(writer) is not None for writer in writers):
                self._guard("speeding up TensorBoard's checksums", tbfast.speed_up_checksums)
            for writer in writers:
                self._guard("writing the TensorBoard layout", partial(tb.write_layout, writer))

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
        serious = [f for f in self.findings() if f.severity in ("warning", "error")]
        if not serious:
            print("bnprobe: no BatchNorm problem of severity warning or error found.")
            return
        print(f"bnprobe: {len(serious)} BatchNorm problem(s) found:")
        for finding in serious:
            print(f"  - {finding}")
        print("  Call BNProbe.report() or run `bnprobe report <run folder>` for advice.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        refs = self.tap.references() if self.tap is not None else self._references
        return {"references": refs, "last_step": self._last_step, "traced": self._traced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._references = dict(state_dict.get("references", {}))
        self._last_step = int(state_dict.get("last_step", -1))
        self._traced = bool(state_dict.get("traced", False))
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
        for logger in trainer.loggers:
            name = f"logging to {type(logger).__name__}"
            self._guard(name, partial(tbfast.log_snapshot, logger, snap))
        if self.histograms and snap.channels:
            for writer in _tensorboard_writers(trainer):
                write = partial(tbfast.add_histograms, writer, stage, step, snap.channels)
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
            )
        finally:
            self.tap.active = paused
        self._record(trainer, Snapshot([rows]), step, "probe")

    def _figures(self, trainer: pl.Trainer) -> None:
        writers = _tensorboard_writers(trainer) if self._writes else []
        if writers:
            df = self.store.select(tb.FIGURE_METRICS)
            for writer in writers:
                tb.add_figures(writer, df, int(trainer.global_step))

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
        if self.save_dir is False:
            return None
        if self.save_dir is not None:
            return Path(os.fspath(self.save_dir))
        return Path(trainer.log_dir or trainer.default_root_dir) / "bnprobe"

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        """Run one part of the probe; on error warn once, switch that part off, never raise."""
        if what in self._broken:
            return
        try:
            fn()
        except Exception as err:
            self._broken.add(what)
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


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    writers = (getattr(lg, "experiment", None) for lg in trainer.loggers)
    return [w for w in writers if hasattr(w, "add_histogram")]


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


__all__ = ["FLUSH_EVERY_S", "BNProbe", "BNProbeBase"]
