"""What the streaming diagnosis costs: feeding one measured step of a 53-layer net into the
running state (CPU time), and ``bnprobe report`` on a synthetic store (wall time, CPU time, peak
RSS of a fresh process) against the full-table diagnosis of the same store.

    python benchmarks/report_scale.py                   # 3M rows (about 2,000 steps x 53 layers)
    python benchmarks/report_scale.py --rows 30000000   # the issue's 30M-row run (quiet machine)
    python benchmarks/report_scale.py --rows 200000 --no-full    # a smoke run
    python benchmarks/report_scale.py --summary-only    # the end-of-fit summary, 256 layers

The end-of-fit summary (``summary``): a :class:`~bnprobe.diagnosis.digest.Digest` fed, as the
recorder feeds it, ``--summary-steps`` measured steps of ``--summary-layers`` layers with the 35
rows per layer and step of a ``BatchNorm1d`` at the defaults (noisy values: every bucket keeps
its most rows), then ``Digest.diagnose()`` timed (CPU time, best of 3).

The store is written with :class:`bnprobe.store.Store` (one part per ``--steps-per-part``
measured steps) with the 28 rows per layer and step a ResNet-50 layer gets at the defaults.
Not a test: the numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = 53
METRICS = (
    "batch_mean", "batch_var", "running_mean", "running_var", "mean_shift", "var_shift", "kl",
    "mean_shift_max", "var_shift_max", "kl_max", "mean_shift_excess", "var_shift_excess",
    "mean_shift_excess_max", "var_shift_excess_max", "outlier_frac", "running_invalid",
    "warmup_residual", "num_batches_tracked", "nonfinite", "var_small_frac", "gamma_mean",
    "gamma_std", "gamma_small_frac", "gamma_drift", "beta_mean", "beta_std", "beta_drift",
    "batch_size",
)  # fmt: skip


def step_rows(step: int, rng: np.random.Generator) -> object:
    from bnprobe import store

    layers = np.repeat([f"layer{i}.bn" for i in range(LAYERS)], len(METRICS)).tolist()
    metrics = list(METRICS) * LAYERS
    values = rng.random(len(metrics)) + 0.5
    return store.Rows(step, 0, "train", 0, layers, metrics, values.tolist())


def feed_cost(steps: int = 2000) -> dict[str, float]:
    """CPU time per measured step of Digest.add (amortized over ``steps``, bucket closes and
    merges included), the worst single step, and the end-of-fit diagnosis of the state."""
    from bnprobe.diagnosis.digest import Digest

    rng = np.random.default_rng(0)
    rows = [step_rows(s * 50, rng) for s in range(steps)]
    d = Digest()
    worst = 0.0
    start = time.process_time()
    for r in rows:
        t = time.process_time()
        d.add(r)  # type: ignore[arg-type]
        worst = max(worst, time.process_time() - t)
    per_step = (time.process_time() - start) / steps
    t = time.process_time()
    d.diagnose()
    end = time.process_time() - t
    return {
        "feed_ms_per_step": 1e3 * per_step,
        "feed_ms_worst_step": 1e3 * worst,
        "end_of_fit_diagnose_s": end,
        "rows_kept": d.rows_kept,
        "rows_seen": d.rows_seen,
    }


SUMMARY_CONSTANTS = {
    "eps": 1e-5, "momentum": 0.1, "train_mode": 1.0, "model_train_mode": 1.0,
    "has_running_stats": 1.0, "forward_calls": 1.0, "batch_size": 32.0,
    "samples_per_channel": 32.0, "nonfinite": 0.0, "running_invalid": 0.0,
}  # fmt: skip
SUMMARY_METRICS = (
    *SUMMARY_CONSTANTS, "batch_mean", "batch_var", "running_mean", "running_var", "mean_shift",
    "var_shift", "kl", "mean_shift_max", "var_shift_max", "kl_max", "mean_shift_excess",
    "var_shift_excess", "mean_shift_excess_max", "var_shift_excess_max", "outlier_frac",
    "warmup_residual", "num_batches_tracked", "var_small_frac", "gamma_mean", "gamma_std",
    "gamma_small_frac", "gamma_drift", "beta_mean", "beta_std", "beta_drift",
)  # fmt: skip
"""The 35 rows per layer and measured step of a BatchNorm1d at the defaults."""


def summary_cost(layers: int = 256, steps: int = 1500, repeats: int = 3) -> dict[str, float]:
    """CPU time of the end-of-fit summary's diagnosis (``Digest.diagnose``) after ``steps``
    measured steps of ``layers`` layers with noisy values (best of ``repeats``)."""
    from bnprobe import store
    from bnprobe.diagnosis.digest import Digest

    rng = np.random.default_rng(0)
    names = np.repeat([f"blocks.{i}.bn" for i in range(layers)], len(SUMMARY_METRICS)).tolist()
    metrics = list(SUMMARY_METRICS) * layers
    noisy = np.tile([m not in SUMMARY_CONSTANTS for m in SUMMARY_METRICS], layers)
    base = np.tile([SUMMARY_CONSTANTS.get(m, 0.5) for m in SUMMARY_METRICS], layers)
    d = Digest()
    for step in range(steps):
        values = base + noisy * rng.random(len(base)) * 0.1
        d.add(store.Rows(step, 0, "train", 0, names, metrics, values.tolist()))
    times = []
    for _ in range(repeats):
        t = time.process_time()
        found = d.diagnose()
        times.append(time.process_time() - t)
    return {
        "layers": layers,
        "steps": steps,
        "rows_seen": d.rows_seen,
        "rows_kept": d.rows_kept,
        "diagnose_s": min(times),
        "findings": len(found),
    }


def write_store(folder: Path, rows: int, steps_per_part: int) -> int:
    from bnprobe import store

    steps = max(1, rows // (LAYERS * len(METRICS)))
    s = store.Store(folder)
    rng = np.random.default_rng(0)
    for step in range(steps):
        s.append(step_rows(step * 50, rng))  # type: ignore[arg-type]
        if (step + 1) % steps_per_part == 0:
            s.flush()
    s.flush()
    return steps


_HWM = "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')); "
"""Peak RSS in kB of this process image (ru_maxrss would carry the parent's over exec)."""


def timed(args: list[str]) -> dict[str, float]:
    """Wall time, CPU time and peak RSS of a fresh interpreter running ``args``."""
    code = (
        "import resource, sys, time; t = time.perf_counter(); "
        "from bnprobe import cli; rc = cli.main(sys.argv[1:]); "
        "u = resource.getrusage(resource.RUSAGE_SELF); "
        + _HWM
        + "print('@@', time.perf_counter() - t, u.ru_utime + u.ru_stime, hwm, rc, "
        "file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    line = next(x for x in out.stderr.splitlines() if x.startswith("@@"))
    wall, cpu, rss, rc = line.split()[1:]
    return {"wall_s": float(wall), "cpu_s": float(cpu), "peak_rss_mb": int(rss) / 1024, "rc": rc}


def full_table(folder: Path) -> list[str]:
    """The same report through the whole table (what 0.2 did): load, diagnose, format."""
    return [
        "-c",
        "import bnprobe, sys; from bnprobe.diagnosis import diagnose, format_report; "
        f"df = bnprobe.load({str(folder)!r}); print(format_report(df, diagnose(df))[:0])",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3_000_000)
    p.add_argument("--steps-per-part", type=int, default=200)
    p.add_argument("--no-full", action="store_true", help="skip the full-table comparison")
    p.add_argument("--feed-steps", type=int, default=2000)
    p.add_argument("--summary-layers", type=int, default=256)
    p.add_argument("--summary-steps", type=int, default=1500)
    p.add_argument("--summary-only", action="store_true", help="only the end-of-fit summary")
    args = p.parse_args()
    summary = summary_cost(args.summary_layers, args.summary_steps)
    if args.summary_only:
        print(json.dumps({"summary": summary}, indent=2))
        return
    result: dict[str, object] = {"summary": summary, "feed": feed_cost(args.feed_steps)}
    with tempfile.TemporaryDirectory(prefix="bnprobe-report-scale-") as tmp:
        folder = Path(tmp) / "run"
        t = time.perf_counter()
        steps = write_store(folder / "bnprobe_store", args.rows, args.steps_per_part)
        result["store"] = {
            "rows": steps * LAYERS * len(METRICS),
            "steps": steps,
            "parts": len(list((folder / "bnprobe_store").glob("part-*.parquet"))),
            "write_s": time.perf_counter() - t,
        }
        result["report_streaming"] = timed(["report", str(folder)])
        if not args.no_full:
            code = full_table(folder)
            out = subprocess.run(
                [sys.executable, "-c", "import resource, sys, time; t = time.perf_counter(); "
                 f"exec({code[1]!r}); u = resource.getrusage(resource.RUSAGE_SELF); " + _HWM +
                 "print('@@', time.perf_counter() - t, u.ru_utime + u.ru_stime, hwm, 0, "
                 "file=sys.stderr)"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            line = next(x for x in out.stderr.splitlines() if x.startswith("@@"))
            wall, cpu, rss, _ = line.split()[1:]
            result["report_full_table"] = {
                "wall_s": float(wall),
                "cpu_s": float(cpu),
                "peak_rss_mb": int(rss) / 1024,
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
