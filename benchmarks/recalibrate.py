"""What ``bnprobe.recalibrate`` costs and how exact it is, against a plain forward and its peers.

Cost: one in-process run times, interleaved in rounds, a plain forward pass over the batches
(``torch.no_grad()``, BN on batch statistics, as every PreciseBN pass runs it), the same forward
again (an A/A control: its ratio is the machine's noise), ``bnprobe.recalibrate``,
``torch.optim.swa_utils.update_bn`` and fvcore's ``update_bn_stats`` (when fvcore is importable).
Ratios are taken within a round against the first forward and summarised over rounds (median,
min..max), in process CPU time and in wall time.

Exactness: three cases where the peers are known to differ, each against a float64 pooled
reference of the layer's own inputs: unequal batch sizes, inputs with a large mean, and dropout
right before a BN layer. The figure is the largest relative error of ``running_var`` over
channels (``running_mean`` is exact for every tool except where noted in docs/mismatch.md).

Usage::

    .venv/bin/python benchmarks/recalibrate.py    # writes benchmarks/results_recalibrate.md
    PYTHONPATH=/path/to/fvcore .venv/bin/python benchmarks/recalibrate.py --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from bnprobe.mismatch import recalibrate

try:  # optional peer
    from fvcore.nn.precise_bn import update_bn_stats
except ImportError:  # pragma: no cover - depends on the environment
    update_bn_stats = None


def conv_net(width: int = 32) -> nn.Module:
    """Three conv-BN-ReLU blocks at 28x28, the activation size quoted in the issue (32x32x28x28)."""
    layers: list[nn.Module] = []
    c_in = 3
    for _ in range(3):
        layers += [
            nn.Conv2d(c_in, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def plain_forward(model: nn.Module, batches: list[Tensor]) -> None:
    model.train()
    state = copy.deepcopy(model.state_dict())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # batch statistics, no update: the PreciseBN pass
    with torch.no_grad():
        for x in batches:
            model(x)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = True
    model.load_state_dict(state)


def tools() -> dict[str, Callable[[nn.Module, list[Tensor]], Any]]:
    out: dict[str, Callable[[nn.Module, list[Tensor]], Any]] = {
        "forward": plain_forward,
        "forward_again": plain_forward,
        "bnprobe": lambda m, b: recalibrate(m, b, progress=False),
        "update_bn": lambda m, b: update_bn(b, m),
    }
    if update_bn_stats is not None:
        out["fvcore"] = lambda m, b: update_bn_stats(m, b, num_iters=len(b))
    return out


def time_tools(rounds: int, batches: int, batch_size: int) -> dict[str, dict[str, list[float]]]:
    torch.manual_seed(0)
    model = conv_net()
    data = [torch.randn(batch_size, 3, 28, 28) for _ in range(batches)]
    fns = tools()
    ratios: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in fns}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        got: dict[str, tuple[float, float]] = {}
        for name, fn in fns.items():
            m = copy.deepcopy(model)
            c0, w0 = time.process_time(), time.perf_counter()
            fn(m, data)
            got[name] = (time.process_time() - c0, time.perf_counter() - w0)
        if _ == 0:
            continue
        for name, (cpu, wall) in got.items():
            ratios[name]["cpu"].append(cpu / got["forward"][0])
            ratios[name]["wall"].append(wall / got["forward"][1])
    return ratios


# --------------------------------------------------------------------------- exactness


def pooled_var(inputs: Iterable[Tensor]) -> Tensor:
    """Unbiased pooled variance per channel, in float64."""
    h = torch.cat([x.double() for x in inputs])
    dims = [0, *range(2, h.dim())]
    return h.var(dims, unbiased=True)


BIASED = {"fvcore"}
"""Tools that write the biased variance M2/n: compared in their own convention."""


def case_unequal() -> tuple[nn.Module, list[Tensor], Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    sizes = (2, 64, 3, 40)
    data = [torch.randn(n, 4) * (1 + i) + 2 * i for i, n in enumerate(sizes)]
    with torch.no_grad():
        ref = pooled_var(model[0](x) for x in data)
    return model, data, ref


def case_offset() -> tuple[nn.Module, list[Tensor], Tensor]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        model[0].bias.fill_(1000.0)
    data = [torch.randn(32, 4) for _ in range(6)]
    with torch.no_grad():
        ref = pooled_var(model[0](x) for x in data)
    return model, data, ref


def case_dropout() -> tuple[nn.Module, list[Tensor], Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    data = [torch.randn(32, 4) + 1 for _ in range(6)]
    with torch.no_grad():  # at inference dropout is off: the BN input eval mode will see
        ref = pooled_var(model[0](x) for x in data)
    return model, data, ref


def case_conv() -> tuple[nn.Module, list[Tensor], Tensor]:
    """A conv layer before BatchNorm2d, mean 1000, unequal batches: recalibrate reads BN's own
    kernel moments here (contiguous CPU input) and refines the mean (far from zero)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[0].bias.add_(1000.0)
    data = [torch.randn(n, 3, 12, 12) for n in (3, 32, 7, 20)]
    with torch.no_grad():
        ref = pooled_var(model[0](x) for x in data)
    return model, data, ref


def exactness() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for case, build in {
        "unequal batch sizes": case_unequal,
        "mean 1000, sd about 0.3": case_offset,
        "dropout before BN": case_dropout,
        "conv, mean 1000, unequal batches": case_conv,
    }.items():
        out[case] = {}
        for name, fn in tools().items():
            if name.startswith("forward"):
                continue
            model, data, ref = build()
            if name in BIASED:
                n = sum(x[:, :1].numel() for x in data)  # samples per channel (N·H·W)
                ref = ref * (n - 1) / n
            fn(model, data)
            bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
            rel = ((bn.running_var.double() - ref).abs() / ref).max().item()
            out[case][name] = rel
    return out


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "-o", "--output", default=str(Path(__file__).with_name("results_recalibrate.md"))
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios = time_tools(args.rounds, args.batches, args.batch_size)
    exact = exactness()
    lines = [
        "# recalibrate against a plain forward and its peers",
        "",
        f"`python benchmarks/recalibrate.py --rounds {args.rounds} --batches {args.batches} "
        f"--batch-size {args.batch_size} --threads {args.threads}`: 3 conv-BN-ReLU blocks, "
        f"{args.batch_size}x32x28x28 activations, {args.batches} batches; time / plain forward "
        "time in the same round, median (min..max) over rounds.",
        "",
        "| tool | CPU time ratio | wall time ratio |",
        "|---|---|---|",
    ]
    for name, r in ratios.items():
        lines.append(f"| {name} | {fmt(r['cpu'])} | {fmt(r['wall'])} |")
    lines += [
        "",
        "Largest relative error of `running_var` against the float64 pooled variance of the",
        "layer's inputs, in each tool's own convention (unbiased as PyTorch's running update",
        "stores it; biased for fvcore); for dropout, of the inputs with dropout off, as eval",
        "mode sees them:",
        "",
        "| case | " + " | ".join(next(iter(exact.values()))) + " |",
        "|---|" + "---|" * len(next(iter(exact.values()))),
    ]
    for case, row in exact.items():
        lines.append(f"| {case} | " + " | ".join(f"{v:.1e}" for v in row.values()) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
