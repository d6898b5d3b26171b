"""Where the time of one bnprobe logging step goes, part by part (no Trainer; not a test).

For one model (default: the 21-BN ResNet-20-style net of ``overhead.py``) this times, as the
minimum over repeats (the least disturbed figure on a shared machine):

- the forward+backward+optimizer step without hooks, with the probe's hooks attached but idle
  (a non-logging step: a flag check per hook), and with the hooks measuring;
- ``BNTap.collect`` (one host transfer, every metric of every layer, the table rows);
- turning a snapshot into TensorBoard tags: ``tensorboard.scalar_metrics(rows)`` (pandas) and
  ``tensorboard.snapshot_metrics`` (the snapshot's columns);
- keeping the rows: ``Store.append`` of the snapshot's columns;
- writing the scalars: Lightning's ``TensorBoardLogger.log_metrics`` (one ``add_scalar`` per
  key), ``tensorboard.write_scalars`` (one event from a dict) and
  ``tensorboard.write_snapshot`` (one event straight from the snapshot's columns, what the
  recorder does);
- writing the histograms: ``SummaryWriter.add_histogram`` per vector and
  ``tensorboard.write_histograms`` (one event, what the recorder does);
- the CRC-32C of each record, which TensorBoard's writer thread computes: TensorBoard's
  pure-Python ``masked_crc32c`` and, when ``google-crc32c`` is installed,
  ``tensorboard.events.masked_crc32c`` (bnprobe's own event file's
  checksum when google-crc32c is installed).
  ``crc.py`` measures the checksum per logging step of a real run.

Usage: ``.venv/bin/python benchmarks/logging_step.py [--model resnet|demo|mlp]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))

from overhead import BATCH, MODELS, build_model, quiet

from bnprobe import tensorboard as tb
from bnprobe.store import Store
from bnprobe.tap import BNTap
from bnprobe.tensorboard import events


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` calls, in ms."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="resnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model)
    opt = torch.optim.Adam(model.parameters())
    x, y = torch.randn(BATCH, 3, 28, 28), torch.randint(10, (BATCH,))
    tap = BNTap(model, keep_channels=True)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def measured_step() -> None:
        tap.start()
        step()
        tap.active = False

    for _ in range(5):
        step()
    n = args.repeats
    plain = best_ms(step, n)
    tap.attach()
    idle = best_ms(step, n)
    measured = best_ms(measured_step, n)
    tap.start()
    step()
    snap = tap.collect(step=0)

    def collect() -> None:
        tap.start()
        model(x)
        tap.collect(step=0)

    with torch.no_grad():
        forward = best_ms(lambda: model(x), n)
        tap.detach()
        forward_bare = best_ms(lambda: model(x), n)
        tap.attach()
        collect_ms = best_ms(collect, n) - forward
    rows_tags = best_ms(lambda: tb.scalar_metrics(snap.rows), n)
    list_tags = best_ms(lambda: tb.snapshot_metrics(snap), n)
    store = Store(None)
    keep_rows = best_ms(lambda: [store.append(part) for part in snap.parts], n)
    metrics = tb.snapshot_metrics(snap)[0]
    with tempfile.TemporaryDirectory() as tmp:
        logger = TensorBoardLogger(tmp, name="slow")
        fast_logger = TensorBoardLogger(tmp, name="fast")
        per_key = best_ms(lambda: logger.log_metrics(metrics, 0), n)
        one_event = best_ms(lambda: tb.write_scalars(fast_logger.experiment, metrics, 0), n)
        from_columns = best_ms(lambda: tb.write_snapshot(fast_logger.experiment, snap), n)

        def hist_per_vector() -> None:
            for layer, per in snap.channels.items():
                for k in tb.HIST_NAMES:
                    if k in per:
                        tag = tb.hist_tag("train", k, layer)
                        logger.experiment.add_histogram(tag, per[k], 0)

        hist_slow = best_ms(hist_per_vector, n)
        hist_fast = best_ms(
            lambda: tb.write_histograms(fast_logger.experiment, "train", 0, snap.channels), n
        )
        logger.finalize("success")
        fast_logger.finalize("success")
    # TensorBoard's writer thread checksums every record with a pure-Python CRC32C
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    scalars = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in metrics.items()])
    protos = tb.histogram_protos(
        {
            f"{layer}/{k}": per[k]
            for layer, per in snap.channels.items()
            for k in tb.HIST_NAMES
            if k in per
        }
    )
    hists = Summary(value=[Summary.Value(tag=t, histo=h) for t, h in protos.items()])
    scalar_bytes, hist_bytes = scalars.SerializeToString(), hists.SerializeToString()
    crc_scalars = best_ms(lambda: masked_crc32c(scalar_bytes), n)
    crc_hists = best_ms(lambda: masked_crc32c(hist_bytes), n)
    fast = events.fast_crc()
    nan = float("nan")
    fast_crc_scalars = best_ms(lambda: events.masked_crc32c(scalar_bytes), n) if fast else nan
    fast_crc_hists = best_ms(lambda: events.masked_crc32c(hist_bytes), n) if fast else nan
    tap.detach()
    layers = len(tap.layers)
    n_hists = len(protos)
    print(f"model {args.model}: {layers} BN layers, {len(metrics)} scalars, {n_hists} histograms")
    print(f"| part | ms (min of {n}) |")
    print("|---|---:|")
    for label, value in [
        ("training step, no hooks", plain),
        ("training step, hooks attached, idle", idle),
        ("training step, hooks measuring", measured),
        ("forward only, no hooks", forward_bare),
        ("forward only, hooks idle", forward),
        ("forward with hooks measuring + `BNTap.collect`, minus idle forward", collect_ms),
        ("tags from rows (`tensorboard.scalar_metrics`)", rows_tags),
        ("tags from columns (`tensorboard.snapshot_metrics`)", list_tags),
        ("rows into the store (`Store.append` of the columns)", keep_rows),
        ("scalars, `TensorBoardLogger.log_metrics` (one event per key)", per_key),
        ("scalars, `tensorboard.write_scalars` (one event from a dict)", one_event),
        ("scalars, `tensorboard.write_snapshot` (one event from the columns)", from_columns),
        ("histograms, `SummaryWriter.add_histogram` per vector", hist_slow),
        ("histograms, `tensorboard.write_histograms` (one event)", hist_fast),
        (f"CRC-32C of the scalars ({len(scalar_bytes) / 1e3:.0f} KB), TensorBoard", crc_scalars),
        ("CRC-32C of the scalars, google-crc32c (nan: not installed)", fast_crc_scalars),
        (f"CRC-32C of the histograms ({len(hist_bytes) / 1e3:.0f} KB), TensorBoard", crc_hists),
        ("CRC-32C of the histograms, google-crc32c", fast_crc_hists),
    ]:
        print(f"| {label} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
