"""bnprobe's own host work per measured step, against the number of BN layers (no Lightning).

For nets of ``--depths`` BN layers (pre-activation residual blocks
``x + Linear(ReLU(BatchNorm1d(x)))``, width 32, batch 32: cheap, so bnprobe's cost is not
hidden under the model's), one process runs
``BNTap`` and :class:`bnprobe.recorder.Recorder` directly, the way both drivers do: every step
``tap.start()``, forward, backward, optimizer step, then ``tap.keep`` and ``recorder.record``
into a :class:`bnprobe.store.Store` on disk and bnprobe's own
:class:`~bnprobe.tensorboard.EventWriter`, with and without histograms.

What it times (process CPU time, ``time.process_time``, with ``torch.set_num_threads(1)``):

- *host ms*: ``keep`` + ``record`` per measured step, the mean over whole blocks of 16 steps
  (the probe's host work after the forward: packing, metrics, rows, store, events);
- *hooks ms*: what ``tap.start()`` and the hooks add to a measured step: ``start`` and the same
  forward and backward with the tap started, minus them with it idle, interleaved step by step
  (a difference of two noisy times: the median over steps).

A least-squares line over the depths gives the per-layer cost and the fixed cost per measured
step of *host + hooks* (the issue's targets: ~30 us a layer, ~0.3 ms fixed).

Usage::

    .venv/bin/python benchmarks/host_cost.py                   # 4, 16, 64, 256 layers
    .venv/bin/python benchmarks/host_cost.py --steps 5 --depths 4 16   # a smoke run
    .venv/bin/python benchmarks/host_cost.py --profile 256     # cProfile of 50 measured steps
    .venv/bin/python benchmarks/host_cost.py --compare-blocks 4 --repeats 5   # blocks 1 vs 16
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnprobe.recorder import Recorder
from bnprobe.store import Store
from bnprobe.tap import BNTap
from bnprobe.tensorboard import EventWriter

WIDTH = 32
BATCH = 32


class PreActBlock(nn.Module):
    """``x + Linear(ReLU(BatchNorm1d(x)))``: a pre-activation residual block. A plain stack of
    ``Linear, BatchNorm1d, ReLU`` this deep overflows its gradients to inf at the first step
    (BatchNorm's gradient explosion in deep plain nets) and then trains on NaN: every layer's
    recovery is ill-conditioned and the probe would be timed on a path no real run takes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width)
        self.linear = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.linear(torch.relu(self.bn(x)))
        return out


def mlp(depth: int, width: int = WIDTH, inputs: int = WIDTH, outputs: int = 1) -> nn.Sequential:
    """A linear stem, ``depth`` :class:`PreActBlock` (one BatchNorm1d each), a linear head."""
    blocks = [PreActBlock(width) for _ in range(depth)]
    return nn.Sequential(nn.Linear(inputs, width, bias=False), *blocks, nn.Linear(width, outputs))


class Bench:
    """One net, its tap and recorder, and a training step."""

    def __init__(self, depth: int, histograms: bool, folder: Path) -> None:
        torch.manual_seed(0)
        self.model = mlp(depth)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(BATCH, WIDTH)
        self.tap = BNTap(self.model, keep_channels=histograms).attach()
        self.writer = EventWriter(folder)
        self.recorder = Recorder(
            Store(folder / "bnprobe"), writers=[self.writer], histograms=histograms
        )
        self.step = 0

    def train(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()
        self.opt.step()

    def started_train(self) -> None:
        """A measured step's training: ``tap.start()`` and the forward, backward and update with
        the hooks measuring."""
        self.tap.start()
        self.train()

    def record(self) -> None:
        """What a driver does after a measured training step: ``tap.keep`` (the step kept for
        a block of up to 16, as the callback and ``bnprobe.watch`` do) and ``recorder.record``
        of a block when one ends."""
        snap = self.tap.keep(step=self.step)
        if snap is not None:
            self.recorder.record(snap)
        self.step += 1

    def measured_step(self) -> None:
        self.tap.start()
        self.train()
        self.record()

    def close(self) -> None:
        snap = self.tap.drain()
        if snap is not None:
            self.recorder.record(snap)
        self.tap.detach()
        self.recorder.close()
        self.writer.close()


def cpu(fn: Callable[[], None]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure(depth: int, histograms: bool, steps: int, warmup: int) -> dict[str, float]:
    """CPU ms per step of host work (keep + record: the mean, as most steps are only kept and
    the step that ends a block pays for it) and of the hooks (the median)."""
    with tempfile.TemporaryDirectory(prefix="bnprobe-host-") as tmp:
        bench = Bench(depth, histograms, Path(tmp))
        for _ in range(warmup):
            bench.measured_step()
            bench.train()
        snap = bench.tap.drain()  # the measured steps start a block
        if snap is not None:
            bench.recorder.record(snap)
        host, plain, hooked = [], [], []
        for _ in range(steps):
            plain.append(cpu(bench.train))
            hooked.append(cpu(bench.started_train))
            host.append(cpu(bench.record))
        bench.close()
    hooks = [h - p for h, p in zip(hooked, plain, strict=True)]
    return {
        "host_ms": 1e3 * statistics.fmean(host),
        "hooks_ms": 1e3 * statistics.median(hooks),
        "plain_ms": 1e3 * statistics.median(plain),
    }


def fit(depths: list[int], ms: list[float]) -> tuple[float, float]:
    """Least squares ``ms = fixed + per_layer * depth``: (us a layer, ms fixed)."""
    slope, intercept = np.polyfit(np.array(depths, float), np.array(ms, float), 1)
    return 1e3 * float(slope), float(intercept)


def profile(depth: int, histograms: bool, steps: int, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bnprobe-host-") as tmp:
        bench = Bench(depth, histograms, Path(tmp))
        for _ in range(5):
            bench.measured_step()
        prof = cProfile.Profile()
        for _ in range(steps):
            bench.tap.start()
            bench.train()
            prof.enable()
            bench.record()
            prof.disable()
        bench.close()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def compare_blocks(depth: int, histograms: bool, rounds: int, steps: int = 32) -> None:
    """Host work per measured step (``keep`` + ``record``, process CPU time, the mean of
    ``steps``) with blocks of 1 and of 16 (``BNTap.block``), two nets interleaved in one
    process, ``rounds`` times."""
    benches = {}
    for block in (1, 16):
        bench = Bench(depth, histograms, Path(tempfile.mkdtemp(prefix="bnprobe-host-")))
        bench.tap.block = block
        for _ in range(20):
            bench.measured_step()
        snap = bench.tap.drain()
        if snap is not None:
            bench.recorder.record(snap)
        benches[block] = bench
    ms: dict[int, list[float]] = {1: [], 16: []}
    for _ in range(rounds):
        for block, bench in benches.items():
            spent = 0.0
            for _ in range(steps):
                bench.started_train()
                spent += cpu(bench.record)
            ms[block].append(1e3 * spent / steps)
    for block, bench in benches.items():
        bench.close()
        shown = " ".join(f"{m:.2f}" for m in ms[block])
        print(f"{depth} layers, blocks of {block:2d}: host ms a measured step by round: {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument(
        "--steps", type=int, default=64, help="measured steps per net (whole blocks of 16)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="passes over every net")
    parser.add_argument("--profile", type=int, metavar="DEPTH", help="cProfile collect+record")
    parser.add_argument("--histograms", action="store_true", help="with --profile")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--compare-blocks", type=int, metavar="DEPTH", help="blocks of 1 against 16, interleaved"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.compare_blocks:
        compare_blocks(args.compare_blocks, args.histograms, args.repeats)
        return 0
    if args.profile:
        profile(args.profile, args.histograms, args.steps, args.top)
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} on {os.cpu_count()} cores; CPU ms per measured step")
    print(f"{'histograms':>10} {'layers':>6} {'host ms':>8} {'hooks ms':>8} {'plain ms':>8}")
    results: dict[bool, dict[int, list[dict[str, float]]]] = {False: {}, True: {}}
    for _ in range(args.repeats):
        for depth in args.depths:
            for hist in (False, True):
                res = measure(depth, hist, args.steps, args.warmup)
                results[hist].setdefault(depth, []).append(res)
                print(
                    f"{hist!s:>10} {depth:6d} {res['host_ms']:8.3f} {res['hooks_ms']:8.3f} "
                    f"{res['plain_ms']:8.3f}",
                    flush=True,
                )
    print()
    for hist in (False, True):
        depths = sorted(results[hist])
        med = {
            key: [statistics.median(r[key] for r in results[hist][d]) for d in depths]
            for key in ("host_ms", "hooks_ms")
        }
        total = [h + k for h, k in zip(med["host_ms"], med["hooks_ms"], strict=True)]
        label = "with histograms" if hist else "without histograms"
        if len(depths) > 1:
            for name, ms in (("host", med["host_ms"]), ("host + hooks", total)):
                per_layer, fixed = fit(depths, ms)
                print(f"{label:>18}, {name:>12}: {per_layer:6.1f} us a layer + {fixed:.3f} ms")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
