"""The plain-PyTorch driver: the same tap and recorder as the Lightning callback, from a loop.

::

    with bnprobe.watch(model, "runs/plain") as probe:   # TensorBoard + store in runs/plain
        for step, (x, y) in enumerate(loader):
            with probe.step(step, epoch):                 # measures every n-th step
                train_step(x, y)
        probe.end_epoch(step + 1, epoch, val_loader)      # validation, probe, figures, save
    print(probe.report())

Owns the schedule of a hand-written loop; the sinks are :class:`~bnprobe.recorder.Recorder`'s.
It may not import Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from bnprobe.drive import RECAL_HELD, probe
from bnprobe.recorder import MetricsLogger, Recorder, summary_text, switched_off
from bnprobe.store import STORE_NAME, Store
from bnprobe.tap import BNTap, LayerSelection
from bnprobe.tensorboard import EventWriter


class Watcher:
    """A :class:`~bnprobe.tap.BNTap` and a :class:`~bnprobe.recorder.Recorder` for a plain loop
    (made by :func:`watch`); a context manager that attaches the hooks and saves at exit."""

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        every_n_steps: int = 50,
        layers: LayerSelection = None,
        histograms: bool = True,
        per_channel: bool = False,
        scalars: frozenset[str] | None = None,
        writer: Any = None,
        loggers: Sequence[MetricsLogger] = (),
        save_dir: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"watch(every_n_steps=...) must be a positive int; got {every_n_steps!r}"
            )
        self.model = model
        self.every_n_steps = every_n_steps
        self.layers = layers
        folder_of_events = _log_dir(writer) if writer is not None else log_dir
        events = None if folder_of_events is None else EventWriter(folder_of_events)
        if save_dir is None and log_dir is not None:
            save_dir = Path(os.fspath(log_dir)) / STORE_NAME
        folder = None if save_dir is None or save_dir is False else Path(os.fspath(save_dir))  # type: ignore[arg-type]
        self.writer = events
        """bnprobe's own event writer (None: no TensorBoard)."""
        self.tap = BNTap(model, layers, keep_channels=histograms, per_channel=per_channel)
        self.recorder = Recorder(
            Store(folder),
            writers=[] if events is None else [events],
            loggers=loggers,
            histograms=histograms,
            scalars=scalars,
        )
        self._last_step = -1
        self._traced = False
        self._probe_batch: Any = None

    def __enter__(self) -> Watcher:
        self.tap.attach()
        self.recorder.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Save the store, remove the hooks, close bnprobe's event file."""
        self._drain()
        self.recorder.close()
        self.tap.detach()
        if self.writer is not None:
            self.recorder.guard("writing TensorBoard events", self.writer.close)

    @contextmanager
    def step(self, step: int, epoch: int = 0) -> Iterator[None]:
        """Wrap one optimizer step (forward, backward, update): measured when ``step`` is a
        multiple of ``every_n_steps``. Measured steps are processed in blocks of a few steps
        (:meth:`bnprobe.tap.BNTap.keep`; at ``every_n_steps`` above 32, each one at once), and
        recorded when their block ends or when anything reads the rows."""
        measure = step % self.every_n_steps == 0 and step != self._last_step
        if measure:
            self.tap.start(trace=not self._traced)
            self._traced = True
        yield
        if measure:
            self._last_step = step
            snap = self.tap.keep(step=step, epoch=epoch)
            if snap is not None:
                self.recorder.record(snap)

    def validate(self, batches: Iterable[Any], *, step: int, epoch: int = 0) -> None:
        """Run the model in eval mode on ``batches`` (a tuple or list batch: its first element),
        pooling the BN statistics (stage ``val``), then the train/eval probe
        (:func:`bnprobe.check_mismatch`, stage ``probe``) on the first validation batch ever
        seen, with this validation's first batches as held batches, as BNProbe does. Module
        modes are restored after."""
        self._drain()
        modes = [(m, m.training) for m in self.model.modules()]
        held: list[Any] = []
        try:
            self.model.eval()
            self.tap.start(pool=True)
            with torch.no_grad():
                for batch in batches:
                    if len(held) < RECAL_HELD:
                        held.append(batch)
                    self.model(batch[0] if isinstance(batch, tuple | list) else batch)
            self.recorder.record(self.tap.collect(step=step, epoch=epoch, stage="val"))
            if self._probe_batch is None and held:
                self._probe_batch = held[0]  # kept: every probe on the same batch (as BNProbe)
            if self._probe_batch is not None:
                held = [b for b in held if b is not self._probe_batch]
                snap = probe(
                    self.tap, self.model, self.layers, self._probe_batch, held, step, epoch
                )
                self.recorder.record(snap)
        finally:
            for module, training in modes:
                module.training = training

    def end_epoch(self, step: int, epoch: int = 0, validation: Iterable[Any] | None = None) -> None:
        """End an epoch at ``step`` (the optimizer steps done): :meth:`validate` on
        ``validation`` if given, draw the figures, save the store."""
        self._drain()
        if validation is not None:
            self.validate(validation, step=step, epoch=epoch)
        self.recorder.draw_figures(step)
        self.recorder.flush()

    def to_dataframe(self, **filters: Any) -> pd.DataFrame:
        """Every row recorded so far (SPEC schema); filters as :func:`bnprobe.load`."""
        self._drain()
        return self.recorder.to_dataframe(**filters)

    def report(self) -> str:
        """Latest key metrics per layer, then findings with advice (:func:`bnprobe.diagnose`)."""
        self._drain()
        return self.recorder.report()

    def summary(self) -> str:
        """What was watched, what was switched off, the serious findings (as the callback)."""
        self._drain()
        return summary_text(
            self.recorder.steps(),
            self.recorder.findings(),
            layers=len(self.tap.layers),
            every=self.every_n_steps,
            off=switched_off(self.recorder.failures, self.tap),
            run_dir=self.recorder.run_dir,
            report_call="report()",
        )

    def _drain(self) -> None:
        """Record the measured steps the tap keeps for a block (:meth:`BNTap.drain`)."""
        if self.tap.pending:
            self.recorder.guard("recording measurements", self._record_drained)

    def _record_drained(self) -> None:
        snap = self.tap.drain()
        if snap is not None:
            self.recorder.record(snap)


def _log_dir(writer: Any) -> str | None:
    """The folder of a ``SummaryWriter`` (or anything with ``log_dir`` / ``get_logdir()``)."""
    if writer is None:
        return None
    folder = getattr(writer, "log_dir", None)
    if folder is None and callable(getattr(writer, "get_logdir", None)):
        folder = writer.get_logdir()
    if folder is None:
        raise TypeError(
            f"watch(writer=...) takes a SummaryWriter (bnprobe writes its own event file in its "
            f"log_dir); got {type(writer).__name__}, which has no log_dir"
        )
    return str(os.fspath(folder))


def watch(
    model: nn.Module, log_dir: str | os.PathLike[str] | None = None, **options: Any
) -> Watcher:
    """Watch the BN layers of ``model`` from a plain loop; TensorBoard event files and the store
    go to ``log_dir`` (``<log_dir>/bnprobe_store``). Options as :class:`Watcher`."""
    return Watcher(model, log_dir, **options)


__all__ = ["Watcher", "watch"]
