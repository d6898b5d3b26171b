"""What TensorBoard's event checksum costs bnprobe per logging step (CPU time; not a test).

TensorBoard frames every event record with a masked CRC-32C of its length header and of its
data, computed in pure Python on the writer thread. This script records real snapshots of one
model (default: the 21-BN ResNet-20-style net of ``overhead.py``) through a
:class:`bnprobe.Recorder` into a ``SummaryWriter``, reads back the records each logging step
added to the event file, and times both checksums of exactly those records: TensorBoard's
``masked_crc32c`` and ``google-crc32c``'s (``bnprobe.tensorboard.events``, what
bnprobe's own event file uses; skipped when the package is missing). It prints bytes and ms
per logging step, with and without histograms, the same per training step at every 50 steps
(the defaults) and every step, and a training step of the model for scale.

Usage: ``.venv/bin/python benchmarks/crc.py [--model resnet|demo|mlp]`` (about 10 s)
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from overhead import BATCH, MODELS, build_model, quiet

from bnprobe.recorder import Recorder
from bnprobe.tensorboard import events


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` calls, in ms."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def records(blob: bytes) -> list[bytes]:
    """What TensorBoard checksums for each TFRecord in ``blob``: the 8-byte length header, then
    the data (``[len u64][crc u32][data][crc u32]`` per record)."""
    out, at = [], 0
    while at < len(blob):
        (size,) = struct.unpack("<Q", blob[at : at + 8])
        out += [blob[at : at + 8], blob[at + 12 : at + 12 + size]]
        at += 12 + size + 4
    return out


def step_records(model: torch.nn.Module, histograms: bool, steps: int) -> list[list[bytes]]:
    """The checksummed pieces of each of ``steps`` measured training steps."""
    from torch.utils.tensorboard import SummaryWriter

    from bnprobe.tap import BNTap

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(BATCH, 3, 28, 28), torch.randint(10, (BATCH,))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        recorder = Recorder(writers=[writer], histograms=histograms)
        tap = BNTap(model, keep_channels=histograms)
        tap.attach()
        recorder.start()
        writer.flush()
        (path,) = Path(tmp).glob("events.out.tfevents.*")
        seen = path.stat().st_size
        for step in range(steps):
            tap.start(trace=step == 0)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            recorder.record(tap.collect(step=step))
            writer.flush()
            blob = path.read_bytes()
            if step > 0:  # step 0 adds the one-off trace metrics
                out.append(records(blob[seen:]))
            seen = len(blob)
        tap.detach()
        recorder.close()
        writer.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="resnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    model = build_model(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(BATCH, 3, 28, 28), torch.randint(10, (BATCH,))

    def train_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    train_step()
    train_ms = best_ms(train_step, args.repeats)
    fast = events.fast_crc()
    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    print(f"model {args.model}: {layers} BN layers; a training step takes {train_ms:.1f} ms")
    print(f"google-crc32c: {'installed (C)' if fast else 'not installed'}")
    print()
    print(
        "| logging step | KB written | records | CRC ms, TensorBoard | CRC ms, google-crc32c "
        "| per training step at every 50 / every 1, TensorBoard | same, google-crc32c |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for histograms in (True, False):
        steps = step_records(model, histograms, 4)
        pieces = steps[-1]
        records_n = len(pieces) // 2
        size = sum(len(p) for p in pieces[1::2]) + 16 * records_n  # + length, 2 CRCs

        def python_crc(pieces: list[bytes] = pieces) -> None:
            for piece in pieces:
                masked_crc32c(piece)

        def c_crc(pieces: list[bytes] = pieces) -> None:
            for piece in pieces:
                events.masked_crc32c(piece)

        slow = best_ms(python_crc, max(3, args.repeats // 4))
        quick = best_ms(c_crc, args.repeats) if fast else float("nan")
        label = "scalars + histograms (default)" if histograms else "scalars only"
        print(
            f"| {label} | {size / 1e3:.1f} | {records_n} "
            f"| {slow:.2f} | {quick:.3f} | {slow / 50:.3f} / {slow:.2f} "
            f"| {quick / 50:.4f} / {quick:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
