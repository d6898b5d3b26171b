"""What bnprobe costs per training step, against no probe and against the usual alternatives.

One run measures every (model, configuration) pair several times, interleaved in rounds: round 1
runs each configuration of each model once, round 2 again, and so on, so slow drift of a shared
machine hits every configuration alike. Ratios are taken *within* a round (configuration time /
no-probe time of the same model in the same round) and summarised over rounds: the median, and
min..max as the spread.

Each run is a real ``Trainer.fit`` in a fresh process (forked from a server that has already
imported torch and Lightning), with a ``TensorBoardLogger`` writing to a temporary folder so the
logging cost is real, and ``torch.set_num_threads`` fixed. Step time is the wall time between
consecutive ``on_train_batch_end`` calls of a timing callback placed *last*, so it covers the data
loader, forward, backward, optimizer, every callback (the probe's collection and logging
included) and Lightning's own logging. The first ``--warmup`` steps are excluded; the measured
window holds whole multiples of the trainer's ``log_every_n_steps`` (50), so logging steps weigh
in the mean exactly as often as in a real run.

Memory: ``peak RSS growth`` is the process's peak resident set size during ``fit`` (VmHWM, reset
through ``/proc/self/clear_refs`` just before ``fit``) minus its resident set size at that moment;
``kept`` is what the monitor itself holds at the end (bnprobe: its store's row buffers,
``Store.memory_bytes``: the rows not yet saved, the rest being on disk; the fastai-style
monitor: its record list).

Configurations:

- ``none``: no probe (the baseline);
- ``none_again``: no probe again, as its own configuration: its ratio to ``none`` shows how far
  the machine's noise alone moves a ratio (an A/A control);
- ``defaults``: ``BNProbe()`` (every ``log_every_n_steps`` = 50 steps, histograms on);
- ``every_step``: ``BNProbe(every_n_steps=1, histograms=False)``;
- ``every_step_hist``: ``BNProbe(every_n_steps=1, histograms=True)``;
- ``every_step_hist_pc``: ``BNProbe(every_n_steps=1, histograms=True, per_channel=True)``;
- ``bolts_hist``: a reference written here, like Lightning Bolts' data monitors: a forward hook
  on every BN layer that, on each logging step of the trainer (every 50 steps), writes TensorBoard
  histograms of the layer's full input and output (``logger.experiment.add_histogram``);
- ``fastai_item``: a reference written here, like fastai's ``ActivationStats`` / Composer's
  activation monitor: a forward hook on every BN layer that computes the output's mean and std
  with ``.item()`` at every step and keeps the records.

After the runs, one extra process per model times the train/eval probe
(``bnprobe.check_mismatch`` on one validation batch; it runs once per validation epoch, not per
step) and a PreciseBN recalibration over 20 batches (``bnprobe.recalibrate(apply=False)``),
each against the median training step of that model.

``--targets`` checks the targets of docs/performance.md on nets of 4 and 256 BN layers
(``bn4``, ``bn256``: residual ``x + Linear(ReLU(BatchNorm1d(x)))`` blocks of 32 channels, cheap
enough that bnprobe's cost is not hidden under the model's), in CPU time per step against no
probe, taken within each round:

- every step without histograms <= 1.05x at 4 and at 256 layers;
- every step with histograms <= 1.10x at 256 layers;
- the defaults within the A/A noise at 256 layers: their median ratio no higher than the highest
  ratio of the second no-probe run (``none_again``) over the rounds.

It prints PASS or FAIL per target with the A/A spread and writes benchmarks/results_targets.md.

Usage::

    .venv/bin/python benchmarks/overhead.py            # full run, writes benchmarks/results.md
    .venv/bin/python benchmarks/overhead.py --quick    # a short run while iterating
    .venv/bin/python benchmarks/overhead.py --targets  # the targets (make bench runs it)
    .venv/bin/python benchmarks/overhead.py --targets --rounds 1 --steps 2 --warmup 1  # smoke
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

import bnprobe
from bnprobe.callback import BNProbe
from bnprobe.demo import DemoModule, DemoNet, SyntheticImages
from bnprobe.mismatch import check_mismatch, recalibrate

LOG_EVERY = 50
BATCH = 64
CONFIGS = (
    "none",
    "none_again",
    "defaults",
    "every_step",
    "every_step_hist",
    "every_step_hist_pc",
    "bolts_hist",
    "fastai_item",
)
CONFIG_LABELS = {
    "none": "no probe",
    "none_again": "no probe, a second run (the noise floor)",
    "defaults": "bnprobe defaults (every 50 steps, histograms)",
    "every_step": "bnprobe every step (no histograms)",
    "every_step_hist": "bnprobe every step + histograms",
    "every_step_hist_pc": "bnprobe every step + histograms + per_channel",
    "bolts_hist": "Bolts-style activation histograms (every 50 steps)",
    "fastai_item": "fastai-style mean/std .item() (every step)",
}
MODELS = ("demo", "resnet", "mlp", "bn4", "bn256")
MODEL_LABELS = {
    "demo": "DemoNet (2 BN2d)",
    "resnet": "ResNet-20-style (21 BN2d)",
    "mlp": "MLP (3 BN1d)",
    "bn4": "Deep MLP, 4 BN1d of 32 channels",
    "bn256": "Deep MLP, 256 BN1d of 32 channels",
}
TARGET_MODELS = ("bn4", "bn256")
TARGET_CONFIGS = ("none", "none_again", "every_step", "every_step_hist", "defaults")
TARGETS: tuple[tuple[str, str, float | None], ...] = (
    ("bn4", "every_step", 1.05),
    ("bn256", "every_step", 1.05),
    ("bn256", "every_step_hist", 1.10),
    ("bn256", "defaults", None),  # None: within the A/A noise
)
"""(model, configuration, highest CPU-time ratio to no probe) of docs/performance.md."""


# --------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 with narrow channels: a stem and 3 stages of 3 basic blocks.

    21 BN layers (stem, 9 blocks x 2, 2 projection shortcuts); 3x28x28 -> 10 logits.
    """

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        blocks: list[nn.Module] = []
        c_in = w
        for stage, c_out in enumerate((w, 2 * w, 4 * w)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.blocks(torch.relu(self.stem(x))))
        return out


def mlp() -> nn.Module:
    """Flatten -> 3 x (Linear, BatchNorm1d, ReLU) -> Linear; 3x28x28 -> 10 logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    c_in = 3 * 28 * 28
    for c_out in (512, 256, 128):
        layers += [nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.ReLU()]
        c_in = c_out
    layers.append(nn.Linear(c_in, 10))
    return nn.Sequential(*layers)


def deep_mlp(depth: int, width: int = 32) -> nn.Module:
    """Flatten -> Linear stem -> ``depth`` pre-activation residual blocks
    ``x + Linear(ReLU(BatchNorm1d(x)))`` of ``width`` channels (host_cost.PreActBlock: a plain
    stack this deep trains on NaN) -> Linear; 3x28x28 -> 10 logits. Many BN layers, little
    arithmetic each."""
    from host_cost import mlp as residual_mlp  # benchmarks/ is on sys.path when run as a script

    return nn.Sequential(nn.Flatten(), residual_mlp(depth, width, 3 * 28 * 28, 10))


def build_model(name: str) -> nn.Module:
    if name in ("bn4", "bn256"):
        return deep_mlp(int(name[2:]))
    if name == "demo":
        return DemoNet()
    if name == "resnet":
        return ResNet20()
    if name == "mlp":
        return mlp()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


# --------------------------------------------------------------------------- callbacks


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls (put it last in the list)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.ends: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())


class BoltsStyleHistograms(pl.Callback):
    """Reference: full-activation histograms of every BN input and output, every logging step.

    Hooks are registered once; on a logging step of the trainer the hook hands the whole input
    and output tensors to ``SummaryWriter.add_histogram`` (default binning), like Lightning Bolts'
    ``ModuleDataMonitor``.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.step: int | None = None
        self.writer: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.writer = trainer.logger.experiment if trainer.logger is not None else None
        for name, module in bn_layers(pl_module):
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.step is None or self.writer is None:
                return
            self.writer.add_histogram(f"monitor/{name}/input", args[0].detach(), self.step)
            self.writer.add_histogram(f"monitor/{name}/output", output.detach(), self.step)

        return hook

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        self.step = step if step % trainer.log_every_n_steps == 0 else None

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.step = None

    def on_fit_end(self, *args: Any) -> None:
        for h in self.handles:
            h.remove()


class FastaiStyleStats(pl.Callback):
    """Reference: per-layer output mean and std with ``.item()`` at every step, kept forever
    (fastai's ``ActivationStats``; Composer's activation monitor works the same way)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.records: list[tuple[str, float, float]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in bn_layers(pl_module):
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module.training:
                out = output.detach()
                self.records.append((name, out.mean().item(), out.std().item()))

        return hook

    def on_fit_end(self, *args: Any) -> None:
        for h in self.handles:
            h.remove()


def make_callbacks(config: str) -> list[pl.Callback]:
    if config in ("none", "none_again"):
        return []
    if config == "defaults":
        return [BNProbe()]
    if config == "every_step":
        return [BNProbe(every_n_steps=1, histograms=False)]
    if config == "every_step_hist":
        return [BNProbe(every_n_steps=1, histograms=True)]
    if config == "every_step_hist_pc":
        return [BNProbe(every_n_steps=1, histograms=True, per_channel=True)]
    if config == "bolts_hist":
        return [BoltsStyleHistograms()]
    if config == "fastai_item":
        return [FastaiStyleStats()]
    raise ValueError(f"unknown configuration {config!r}; choose from {CONFIGS}")


# --------------------------------------------------------------------------- one run


@dataclass
class Job:
    model: str
    config: str
    steps: int
    warmup: int
    threads: int
    device: str
    seed: int = 0


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def loader(size: int, seed: int, shuffle: bool) -> DataLoader[tuple[Tensor, Tensor]]:
    data = SyntheticImages(size, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=BATCH, shuffle=shuffle, generator=gen, drop_last=True)


def run_job(job: Job) -> dict[str, Any]:
    """One ``Trainer.fit`` in this (fresh) process; returns step times and memory."""
    quiet()
    torch.set_num_threads(job.threads)
    pl.seed_everything(job.seed, verbose=False)
    total = job.warmup + job.steps + 1
    train = loader(total * BATCH, job.seed, shuffle=True)
    module = DemoModule(build_model(job.model))
    callbacks = [*make_callbacks(job.config), StepTimer(cuda=job.device == "cuda")]
    with tempfile.TemporaryDirectory(prefix="bnprobe-bench-") as tmp:
        trainer = pl.Trainer(
            accelerator="gpu" if job.device == "cuda" else "cpu",
            devices=1,
            max_steps=total,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=LOG_EVERY,
            logger=TensorBoardLogger(tmp, name="run"),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        peak_ok = reset_peak_rss()
        rss0 = proc_status_kb("VmRSS")
        if job.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, train_dataloaders=train)
        peak_kb = proc_status_kb("VmHWM") if peak_ok else rss0
        cuda_peak = torch.cuda.max_memory_allocated() if job.device == "cuda" else 0
    timer = callbacks[-1]
    assert isinstance(timer, StepTimer)
    times = [(b - a) * 1e3 for a, b in itertools.pairwise(timer.ends)]
    cpu = [(b - a) * 1e3 for a, b in itertools.pairwise(timer.cpu)]
    kept = 0.0
    cb = callbacks[0] if len(callbacks) > 1 else None
    if isinstance(cb, BNProbe):
        kept = float(cb.recorder.store.memory_bytes)  # rows not yet saved (the rest is on disk)
    elif isinstance(cb, FastaiStyleStats):
        kept = float(sys.getsizeof(cb.records) + sum(sys.getsizeof(r) for r in cb.records))
    # times[i] is the step that ended at ends[i+1], i.e. global step i+1
    measured = times[job.warmup : job.warmup + job.steps]
    return {
        "times": measured,
        "cpu": cpu[job.warmup : job.warmup + job.steps],
        "peak_mb": (peak_kb - rss0) / 1024 if peak_ok else float("nan"),
        "cuda_peak_mb": cuda_peak / 2**20,
        "kept_mb": kept / 2**20,
    }


def run_probe_costs(job: Job) -> dict[str, float]:
    """Time check_mismatch on one validation batch and recalibrate over 20 batches."""
    quiet()
    torch.set_num_threads(job.threads)
    pl.seed_everything(job.seed, verbose=False)
    device = torch.device(job.device)
    model = DemoModule(build_model(job.model)).to(device)
    opt = model.configure_optimizers()
    batches = [(x.to(device), y.to(device)) for x, y in loader(40 * BATCH, job.seed, True)]
    val = next(iter(loader(BATCH, job.seed + 1, False)))

    def sync() -> None:
        if job.device == "cuda":
            torch.cuda.synchronize()

    step_ms: list[float] = []
    model.train()
    for i, batch in enumerate(batches[:30]):  # plain training steps as the yardstick
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        sync()
        if i >= 5:
            step_ms.append((time.perf_counter() - t0) * 1e3)

    def timed(fn: Callable[[], object], repeats: int) -> float:
        out = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)

    mismatch_ms = timed(lambda: check_mismatch(model, val), 5)
    recal_ms = timed(lambda: recalibrate(model, batches[:20], apply=False, progress=False), 3)
    return {
        "step_ms": statistics.median(step_ms),
        "mismatch_ms": mismatch_ms,
        "recalibrate_ms": recal_ms,
    }


# --------------------------------------------------------------------------- orchestration


def summarize(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt_ratio(values: list[float]) -> str:
    mid, lo, hi = summarize(values)
    return f"{mid:.3f} ({lo:.3f}..{hi:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 50 steps")
    parser.add_argument(
        "--targets",
        action="store_true",
        help="check the targets on bn4 and bn256 (default 10 rounds; results_targets.md)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 6 (quick: 2)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (x50)")
    parser.add_argument("--warmup", type=int, default=9, help="steps excluded at the start")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=None)
    parser.add_argument("--out", type=Path, default=None, help="Markdown table")
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    if args.targets:
        args.models = args.models or list(TARGET_MODELS)
        args.configs = args.configs or list(TARGET_CONFIGS)
        args.out = args.out or here / "results_targets.md"
    args.models = args.models or [m for m in MODELS if m not in TARGET_MODELS]
    args.configs = args.configs or [c for c in CONFIGS if c != "every_step_hist"]
    args.out = args.out or here / "results.md"
    rounds = args.rounds or (2 if args.quick else 10 if args.targets else 6)
    steps = args.steps or (50 if args.quick else 150)
    if steps % LOG_EVERY and steps > LOG_EVERY:  # under 50: a smoke run
        parser.error(f"--steps must be a multiple of log_every_n_steps={LOG_EVERY}; got {steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    configs = ["none", *[c for c in args.configs if c != "none"]]

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__"])
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    started = time.perf_counter()
    n_jobs = rounds * len(args.models) * len(configs)
    done = 0
    with ctx.Pool(processes=1, maxtasksperchild=1) as pool:
        for r in range(rounds):
            for model in args.models:
                order = configs if r % 2 == 0 else configs[::-1]  # alternate the order, too
                for config in order:
                    job = Job(model, config, steps, args.warmup, args.threads, args.device)
                    res = pool.apply(run_job, (job,))
                    results.setdefault((model, config), []).append(res)
                    done += 1
                    mean = statistics.fmean(res["times"])
                    print(
                        f"[{done}/{n_jobs} {time.perf_counter() - started:6.0f}s] round {r + 1} "
                        f"{model:6s} {config:20s} mean {mean:7.2f} ms "
                        f"median {statistics.median(res['times']):7.2f} ms",
                        flush=True,
                    )
        probe = {
            model: pool.apply(
                run_probe_costs, (Job(model, "none", 0, 0, args.threads, args.device),)
            )
            for model in args.models
            if not args.targets  # the targets need step times only
        }
    elapsed = time.perf_counter() - started

    lines = report(results, probe, args, rounds, steps, configs, elapsed)
    if args.targets:
        lines += check_targets(results)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def cpu_ratios(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[float]:
    """CPU time per step of each round's run over that round's no-probe run."""
    return [
        statistics.fmean(r["cpu"]) / statistics.fmean(b["cpu"])
        for r, b in zip(runs, base, strict=True)
    ]


def check_targets(results: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """PASS/FAIL per target of :data:`TARGETS` (median CPU-time ratio over rounds), with the
    A/A spread of the same model; printed and appended to the report."""
    lines = [
        "## Targets (CPU-time ratio to no probe, median over rounds)",
        "",
        "| target | ratio (min..max) | limit | A/A ratio (min..max) | result |",
        "|---|---:|---:|---:|---|",
    ]
    verdicts = []
    for model, config, limit in TARGETS:
        if (model, config) not in results or (model, "none_again") not in results:
            continue
        base = results[(model, "none")]
        ratio = cpu_ratios(results[(model, config)], base)
        aa = cpu_ratios(results[(model, "none_again")], base)
        bound = max(1.0, max(aa)) if limit is None else limit
        ok = statistics.median(ratio) <= bound
        verdicts.append(ok)
        what = f"{CONFIG_LABELS[config]}, {MODEL_LABELS[model]}"
        shown = f"{bound:.3f} (A/A max)" if limit is None else f"{limit:.2f}"
        lines.append(
            f"| {what} | {fmt_ratio(ratio)} | {shown} | {fmt_ratio(aa)} "
            f"| {'PASS' if ok else 'FAIL'} |"
        )
        print(
            f"{'PASS' if ok else 'FAIL'}: {what}: {fmt_ratio(ratio)} <= {shown}; "
            f"A/A {fmt_ratio(aa)}"
        )
    if verdicts:
        lines += ["", f"{sum(verdicts)} of {len(verdicts)} targets met.", ""]
    return lines


def report(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    probe: dict[str, dict[str, float]],
    args: argparse.Namespace,
    rounds: int,
    steps: int,
    configs: list[str],
    elapsed: float,
) -> list[str]:
    cmd = "python benchmarks/overhead.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# bnprobe overhead",
        "",
        f"- command: `{cmd}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, "
        f"bnprobe {getattr(bnprobe, '__version__', '?')}, Python {platform.python_version()}",
        f"- device {args.device}, torch.set_num_threads({args.threads}), batch {BATCH}, "
        f"log_every_n_steps={LOG_EVERY}",
        f"- {rounds} interleaved rounds; per run {args.warmup} warm-up steps excluded, then "
        f"{steps} measured steps ({steps // LOG_EVERY} of them logging steps at the defaults)",
        f"- total wall time {elapsed / 60:.1f} min",
        "",
        "Ratios are configuration / no probe, taken within each round, then the median over "
        "rounds with min..max. *mean ratio* compares mean step times (logging steps included): "
        "that is the cost of a run. *median ratio* compares median step times: the cost of a "
        "typical (non-logging, at the defaults) step. *CPU-time ratio* compares the process's "
        "CPU time per step (all threads), which other load on a shared machine disturbs less "
        "than wall time.",
        "",
    ]
    for model in args.models:
        base = results[(model, "none")]
        lines += [
            f"## {MODEL_LABELS[model]}",
            "",
            "| configuration | mean ms | median ms | mean ratio | median ratio | CPU-time ratio "
            "| peak RSS growth MB | kept MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for config in configs:
            runs = results[(model, config)]
            means = [statistics.fmean(r["times"]) for r in runs]
            medians = [statistics.median(r["times"]) for r in runs]
            base_means = [statistics.fmean(b["times"]) for b in base]
            mean_ratio = [m / b for m, b in zip(means, base_means, strict=True)]
            cpu_ratio = cpu_ratios(runs, base)
            median_ratio = [
                m / statistics.median(b["times"]) for m, b in zip(medians, base, strict=True)
            ]
            peak = statistics.median(r["peak_mb"] for r in runs)
            kept = statistics.median(r["kept_mb"] for r in runs)
            lines.append(
                f"| {CONFIG_LABELS[config]} | {statistics.median(means):.2f} "
                f"| {statistics.median(medians):.2f} | {fmt_ratio(mean_ratio)} "
                f"| {fmt_ratio(median_ratio)} | {fmt_ratio(cpu_ratio)} | {peak:.1f} | {kept:.3f} |"
            )
        p = probe.get(model)
        if p is None:
            lines.append("")
            continue
        lines += [
            "",
            f"Train/eval probe (`check_mismatch`, one validation batch of {BATCH}): "
            f"{p['mismatch_ms']:.1f} ms = {p['mismatch_ms'] / p['step_ms']:.2f} training steps "
            f"(plain step {p['step_ms']:.1f} ms); it runs once per validation epoch. "
            f"`recalibrate` over 20 batches: {p['recalibrate_ms']:.0f} ms = "
            f"{p['recalibrate_ms'] / p['step_ms']:.1f} training steps.",
            "",
        ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
