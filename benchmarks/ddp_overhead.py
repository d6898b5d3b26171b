"""What measuring every step costs rank 0 under DDP, against what one process pays for it.

Issue 16 item 4's target: under 2-process DDP (gloo, CPU) the probe's cost per step on rank 0
is no more than 1.2x its cost in a single process for the same layers. Configurations, each a
real ``Trainer.fit`` in fresh processes, run interleaved in rounds (round 1 runs each once, then
round 2, ...), so slow drift of a shared machine hits all alike:

- ``single_none`` / ``single_none_again``: one process, no probe (the second is an A/A control:
  its ratio to the first shows the noise);
- ``single_probe``: one process, ``BNProbe(every_n_steps=1, histograms=False)``
  (``--gather-batch K``: its ``gather_batch``, which only DDP uses; default the probe's own);
- ``ddp_none`` / ``ddp_none_again`` / ``ddp_probe``: the same on two gloo processes (rank 0
  timed).

The measure is rank 0's **process CPU time** per training step (``time.process_time`` between
consecutive ``on_train_batch_end`` of a callback placed last), the median over the steps after
``--warmup``; per round, the probe's cost is ``probe - none`` of the same setting, and the
ratio reported is ``(ddp_probe - ddp_none) / (single_probe - single_none)`` (median and range
over rounds), with ``ddp_probe / ddp_none`` and ``single_probe / single_none`` beside it.

Usage::

    .venv/bin/python benchmarks/ddp_overhead.py                  # the real run (quiet machine)
    .venv/bin/python benchmarks/ddp_overhead.py --rounds 1 --steps 30 --layers 4   # smoke run
    .venv/bin/python benchmarks/ddp_overhead.py --micro --layers 8   # rank 0's exchange parts

``--busy-core`` runs each single-process configuration beside a second process training the
same net without the probe, so that the other core is busy as under DDP (on a 2-core machine a
single process alone runs the same code faster than a DDP rank, whose twin works on the other
core: ``--parts`` shows it with a fixed control workload).

``--parts`` runs ``single_probe`` and ``ddp_probe`` alternated and prints rank 0's thread CPU
ms a step in each piece of the probe (the tap's block, recording its own and the other ranks'
rows, ``add``, the exchange, ``rank_divergence``) and in a fixed control workload.

``--micro`` times rank 0's DDP-only work alone, on two gloo processes without Lightning (thread
CPU time, which the load of a shared machine disturbs less than step times): ``RankGather.add``
per step, and per exchange of ``--gather-batch`` (default 32) steps the exchange itself and the
recording of what it brings (the other rank's rows and ``rank_divergence``), over ``--rounds``
x 4 exchanges of a real tap's steps (``--layers`` BatchNorm1d layers of ``--width`` channels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (
    "single_none",
    "single_none_again",
    "single_probe",
    "ddp_none",
    "ddp_none_again",
    "ddp_probe",
)


def worker(
    config: str,
    out: Path,
    layers: int,
    width: int,
    steps: int,
    warmup: int,
    profile: Path | None,
    gather_batch: int | None = None,
    parts: bool = False,
) -> None:
    """One rank of one configuration: fit and write rank 0's CPU ms per step; with ``profile``
    (a folder) each rank also writes its cProfile statistics of the fit there
    (``<config>.rank<r>.prof``)."""
    import numpy as np
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from bnprobe import BNProbe

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    spent = _time_parts() if parts else {}

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            blocks: list[nn.Module] = []
            for _ in range(layers):
                blocks += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
            self.body = nn.Sequential(*blocks)
            self.head = nn.Linear(width, 4)

        def training_step(self, batch: Any, idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.head(self.body(x)), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class TimedProbe(BNProbe):
        """BNProbe with the CPU time of this thread inside its per-step entry points recorded:
        the probe's own cost per step without the noise of the rest of the step (the hooks
        inside the forward are not in it; they are the same code for the same layers)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.own: list[float] = []

        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            t = time.thread_time()
            super().on_train_batch_start(*args, **kwargs)
            self.own.append(time.thread_time() - t)

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            t = time.thread_time()
            super().on_train_batch_end(*args, **kwargs)
            self.own[-1] += time.thread_time() - t

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.process_time())

    class Control(pl.Callback):
        """A fixed piece of Python and numpy work after every training step, timed like the
        probe's pieces (``--parts``): how much slower the same work runs in this process under
        DDP (the other rank busy on the other core) than alone."""

        values = np.arange(512.0)

        def on_train_batch_end(self, *args: Any) -> None:
            t = time.thread_time()
            for _ in range(40):
                float(np.sqrt(self.values * self.values + 1.0).sum())
                {i: str(i) for i in range(16)}
            key = "control (fixed work)"
            spent[key] = spent.get(key, 0.0) + time.thread_time() - t

    gen = torch.Generator().manual_seed(rank)
    n = 32 * (steps + 1)
    data = DataLoader(
        TensorDataset(torch.randn(n, width, generator=gen), torch.randint(4, (n,), generator=gen)),
        batch_size=32,
    )
    clock = Clock()
    callbacks: list[pl.Callback] = [clock]
    if parts:
        callbacks.append(Control())
    batch = {} if gather_batch is None else {"gather_batch": gather_batch}
    probe = TimedProbe(every_n_steps=1, histograms=False, summary=False, **batch)
    if config.endswith("probe"):
        callbacks.insert(0, probe)
    ddp = config.startswith("ddp")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2 if ddp else 1,
            strategy="ddp" if ddp else "auto",
            max_steps=steps,
            default_root_dir=tmp,
            logger=pl.loggers.TensorBoardLogger(tmp),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            use_distributed_sampler=False,
            log_every_n_steps=50,
            callbacks=callbacks,
        )
        if profile is not None:
            import cProfile

            profiler = cProfile.Profile(time.process_time)  # CPU, not waits
            profiler.runcall(trainer.fit, Net(), data)
            profiler.dump_stats(profile / f"{config}.rank{rank}.prof")
        else:
            trainer.fit(Net(), data)
    if rank == 0:
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)][warmup:]
        kept = probe.own[warmup:]
        own = 1e3 * statistics.median(kept) if kept else 0.0
        mean = 1e3 * statistics.fmean(kept) if kept else 0.0
        got: dict[str, Any] = {"ms": 1e3 * statistics.median(gaps), "own_ms": own}
        got["own_mean_ms"] = mean
        got["parts"] = {k: 1e3 * v / steps for k, v in spent.items()}  # ms a step, whole fit
        out.write_text(json.dumps(got))


def _time_parts() -> dict[str, float]:
    """Wrap the probe's pieces that DDP adds (and those both settings share) with this thread's
    CPU time, summed per piece over the fit (``--parts``): where rank 0's extra goes."""
    from bnprobe.callback import BNProbeBase
    from bnprobe.distributed import gather
    from bnprobe.recorder import Recorder
    from bnprobe.tap import hooks
    from bnprobe.tap import rows as build

    spent: dict[str, float] = {}

    def wrap(owner: Any, name: str, label: str | Callable[..., str]) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            key = label if isinstance(label, str) else label(*args)
            t = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.thread_time() - t
                spent["calls/step: " + key] = spent.get("calls/step: " + key, 0.0) + 1e-3

        setattr(owner, name, timed)

    def recorded(recorder: Any, snap: Any) -> str:
        other = all(p.rank != 0 or p.metrics[:1] == ("rank_divergence",) for p in snap.parts)
        return "record others" if snap.parts and other else "record own"

    wrap(Recorder, "record", recorded)
    import bnprobe.recorder as recorder_module
    from bnprobe import tensorboard as tb
    from bnprobe.store import Store

    where = [""]

    def inside(label: str) -> Callable[..., str]:
        return lambda *args: f"{label} ({where[0] or 'own'})"

    wrap(Store, "append", inside("  store append"))
    wrap(recorder_module, "_digest", inside("  digest"))
    wrap(tb, "write_snapshot", inside("  TensorBoard scalars"))
    inner_record = Recorder.record

    def record(self: Any, snap: Any) -> Any:
        where[0] = recorded(self, snap).removeprefix("record ").replace("own", "")
        try:
            return inner_record(self, snap)
        finally:
            where[0] = ""

    Recorder.record = record  # type: ignore[assignment]
    wrap(build, "channel_vectors", "tap channel_vectors (keep_channels)")
    wrap(hooks.BNTap, "_finish", "tap _finish (block)")
    wrap(BNProbeBase, "_hand_over", "callback _hand_over (incl. add)")
    wrap(gather.RankGather, "add", "gather add")
    wrap(gather.RankGather, "exchange", "gather exchange (incl. pack/decode)")
    wrap(gather.RankGather, "_pack", "gather _pack")
    wrap(gather.RankGather, "_decode", "gather _decode (incl. divergence)")
    wrap(gather.RankGather, "_divergences", "gather _divergences")
    import bnprobe.callback as callback

    wrap(callback, "_per_step", "callback _per_step")
    wrap(callback, "_train_steps", "callback _train_steps")
    wrap(BNProbeBase, "_flush_ranks", "callback _flush_ranks (all of it)")
    return spent


def run(config: str, args: argparse.Namespace, folder: Path) -> tuple[float, float, float]:
    out = folder / f"{config}.json"
    ddp = config.startswith("ddp")
    cmd = [sys.executable, __file__, "--worker", config, "--out", str(out)]
    cmd += ["--layers", str(args.layers), "--width", str(args.width)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--profile", str(args.profile)] if args.profile else []
    cmd += ["--gather-batch", str(args.gather_batch)] if args.gather_batch else []
    cmd += ["--parts"] if args.parts else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    procs = []
    if ddp:
        sys.path.insert(0, str(ROOT))
        from tests.launch import free_port

        port = str(free_port())
        for rank in range(2):
            rank_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2")
            rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.DEVNULL))
    else:
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    busy = None
    if args.busy_core and not ddp:  # the other core busy too, as under DDP (then killed)
        twin = [sys.executable, __file__, "--worker", "single_none", "--out", str(out) + ".busy"]
        twin += ["--layers", str(args.layers), "--width", str(args.width)]
        twin += ["--steps", str(10 * args.steps), "--warmup", str(args.warmup)]
        busy = subprocess.Popen(twin, env=env, stdout=subprocess.DEVNULL)
    try:
        for proc in procs:
            if proc.wait(timeout=args.timeout) != 0:
                raise RuntimeError(f"{config} failed")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    got = json.loads(out.read_text())
    return float(got["ms"]), float(got["own_ms"]), float(got["own_mean_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--gather-batch", type=int, help="BNProbe(gather_batch=...)")
    parser.add_argument("--micro", action="store_true", help="time rank 0's exchange parts")
    parser.add_argument(
        "--busy-core",
        action="store_true",
        help="run each single-process configuration beside a second process training the "
        "same net without the probe (killed when the measured one ends), so that both cores are "
        "busy as under DDP's two ranks: the single process's figures are then not those of a "
        "process with the machine to itself",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="run single_probe and ddp_probe --rounds times, alternated, and print rank 0's "
        "thread CPU ms a step in each piece of the probe (the whole fit's mean)",
    )
    parser.add_argument("--worker")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--profile",
        type=Path,
        help="a folder: run single_probe and ddp_probe once each under cProfile, write each "
        "rank's statistics there (<config>.rank<r>.prof) and print bnprobe's share per step",
    )
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker,
            args.out,
            args.layers,
            args.width,
            args.steps,
            args.warmup,
            args.profile,
            args.gather_batch,
            args.parts,
        )
        return
    if args.parts:
        parts(args)
        return
    if args.profile:
        profile(args)
        return
    if args.micro:
        micro(args)
        return
    rows: dict[str, list[float]] = {c: [] for c in CONFIGS}
    own: dict[str, list[float]] = {c: [] for c in CONFIGS}
    own_mean: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for config in CONFIGS:
                ms, own_ms, mean_ms = run(config, args, Path(tmp))
                rows[config].append(ms)
                own[config].append(own_ms)
                own_mean[config].append(mean_ms)
            print(f"round {r + 1}: " + ", ".join(f"{c} {rows[c][-1]:.2f} ms" for c in CONFIGS))

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"

    def per_round(f: Any) -> list[float]:
        return [f(*(rows[c][i] for c in CONFIGS)) for i in range(args.rounds)]

    print(f"\n{args.layers} BN layers of width {args.width}, rank 0 CPU ms per step, median:")
    for c in CONFIGS:
        print(f"  {c:18s} {statistics.median(rows[c]):8.3f}")
    print("ratios per round, median (min..max):")
    print("  A/A single none_again/none  ", summary(per_round(lambda a, b, *_: b / a)))
    print("  A/A ddp    none_again/none  ", summary(per_round(lambda *v: v[4] / v[3])))
    print("  single probe/none           ", summary(per_round(lambda a, b, p, *_: p / a)))
    print("  ddp    probe/none           ", summary(per_round(lambda *v: v[5] / v[3])))
    single_cost = per_round(lambda *v: v[2] - v[0])
    if min(single_cost) > 0.05:  # a difference of two noisy times: a ratio only above the noise
        cost = summary(per_round(lambda *v: (v[5] - v[3]) / (v[2] - v[0])))
    else:
        cost = f"undefined: the single-process probe cost was {min(single_cost):.3f} ms in a round"
    print("  probe cost ddp/single       ", cost, "(target <= 1.2)")
    for per_run, what, label, note in (
        (own, " (its batch start + end hooks, this thread), median", "own cost ddp/single     ",
         "(the same ratio without the noise of the rest of the step)"),
        (own_mean, ", mean (counts the steps that exchange a batch)", "own mean cost ddp/single",
         "(target <= 1.2)"),
    ):  # fmt: skip
        single, ddp = per_run["single_probe"], per_run["ddp_probe"]
        print(f"probe's own CPU ms per step{what}:")
        print(f"  single {statistics.median(single):.3f}   ddp rank 0 {statistics.median(ddp):.3f}")
        ratios = [d / max(s, 1e-9) for s, d in zip(single, ddp, strict=True)]
        print(f"  {label}    ", summary(ratios), note)


def parts(args: argparse.Namespace) -> None:
    """Rank 0's thread CPU ms a step in each piece of the probe, single process against DDP
    (``--parts``; the mean over the whole fit, min..max over rounds)."""
    got: dict[str, dict[str, list[float]]] = {"single_probe": {}, "ddp_probe": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for config, into in got.items():
                out = Path(tmp) / f"{config}.json"
                run(config, args, Path(tmp))
                found = json.loads(out.read_text())
                found["parts"]["own (batch start + end), mean"] = found["own_mean_ms"]
                for key, ms in found["parts"].items():
                    into.setdefault(key, []).append(ms)
    keys = sorted({k for into in got.values() for k in into})
    print(f"\n{args.layers} layers of {args.width}, rank 0 thread CPU ms a step (min..max over "
          f"{args.rounds} rounds):")  # fmt: skip
    print(f"  {'piece':44s} {'single':>16s} {'ddp rank 0':>16s}")
    for key in keys:
        cells = []
        for into in got.values():
            v = into.get(key)
            cells.append(f"{min(v):.3f}..{max(v):.3f}" if v else "-")
        print(f"  {key:44s} {cells[0]:>16s} {cells[1]:>16s}")


def profile(args: argparse.Namespace) -> None:
    """Where the probe's time goes per step: cProfile of single_probe and ddp_probe (each
    rank), the callback's hooks and bnprobe's heaviest functions, cumulative ms per step."""
    import pstats

    args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("single_probe", "ddp_probe"):
            run(config, args, Path(tmp))
    for name in ("single_probe.rank0", "ddp_probe.rank0", "ddp_probe.rank1"):
        stats = pstats.Stats(str(args.profile / f"{name}.prof"))
        rows = []
        for (file, line, func), (_, calls, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
            if "bnprobe" in file and "benchmarks" not in file:
                rows.append((cum, calls, f"{Path(file).name}:{line}({func})"))
        rows.sort(reverse=True)
        print(
            f"\n{name}: bnprobe functions, cumulative CPU ms per step, calls ({args.steps} steps)"
        )
        for cum, calls, where in rows[:30]:
            print(f"  {1e3 * cum / args.steps:8.3f}  {calls:7d}  {where}")


def micro(args: argparse.Namespace) -> None:
    """Rank 0's DDP-only work, timed part by part on two gloo processes (``--micro``)."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT))
    from tests.launch import free_port

    mp.spawn(_micro_rank, args=(free_port(), args), nprocs=2)


def _micro_rank(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch
    from torch import distributed as dist
    from torch import nn

    from bnprobe import BNProbe
    from bnprobe.distributed import RankGather, capacity
    from bnprobe.recorder import Recorder
    from bnprobe.store import Store
    from bnprobe.tap import BNTap, Snapshot
    from bnprobe.tensorboard import EventWriter, tag_root

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)
    blocks: list[nn.Module] = []
    for _ in range(args.layers):
        blocks += [nn.Linear(args.width, args.width), nn.BatchNorm1d(args.width), nn.ReLU()]
    model = nn.Sequential(*blocks)
    batch, exchanges = args.gather_batch or 32, 4 * args.rounds
    tap = BNTap(model, keep_channels=True).attach()
    snaps = []
    for step in range(batch * exchanges + 1):
        tap.start(trace=step == 0)
        model(torch.randn(32, args.width)).sum().backward()
        snaps.append(tap.collect(step=step, epoch=0, rank=rank))
    eps = {layer.name: layer.module.eps for layer in tap.layers}
    bound = capacity([args.width] * args.layers)
    scalars = BNProbe(every_n_steps=1, histograms=False, summary=False)._scalar_metrics
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(
            Store(tmp if rank == 0 else None, rank=rank),
            writers=[(EventWriter(f"{tmp}/tb"), tag_root())] if rank == 0 else [],
            histograms=False,
            scalars=scalars,
            flush_every_s=1e9,
        )
        gather = RankGather(eps, capacity=lambda: bound, batch=batch)
        gather.add(snaps[0], step=0, epoch=0)
        gather.exchange(step=0, epoch=0)  # the first one agrees the sizes
        add: list[float] = []
        exchange: list[float] = []
        record: list[float] = []
        for e in range(exchanges):
            for step in range(1 + e * batch, 1 + (e + 1) * batch):
                t = time.thread_time()
                gather.add(snaps[step], step=step, epoch=0)
                add.append(time.thread_time() - t)
            dist.barrier()  # both ranks arrive together: no waiting in the timed collective
            t = time.thread_time()
            others = gather.exchange(step=step, epoch=0)
            exchange.append(time.thread_time() - t)
            t = time.thread_time()
            if others:
                recorder.record(Snapshot(others))
            record.append(time.thread_time() - t)
    if rank == 0:
        ms = {name: 1e3 * min(v) for name, v in (("exchange", exchange), ("record", record))}
        per_step = 1e3 * statistics.median(add)
        print(
            f"{args.layers} layers of {args.width}, rank 0 thread CPU ms: add {per_step:.3f} a "
            f"step (median); a {batch}-step exchange {ms['exchange']:.2f}, recording what it "
            f"brings {ms['record']:.2f} (min of {exchanges}); DDP-only work a step "
            f"{per_step + (ms['exchange'] + ms['record']) / batch:.3f}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
