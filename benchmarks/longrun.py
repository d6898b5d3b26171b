"""Long runs: does bnprobe stay flat? Memory (RSS), disk, part files and read time against steps.

Not a test: run it on a quiet machine (docs/performance.md and docs/scaling.md hold its tables).

Two scenarios:

- ``fit``: a real ``Trainer.fit`` of a many-layer net (``--layers`` BatchNorm1d layers) measured
  at every step with ``per_channel=True`` and histograms off, default store flush policy. Every
  ``--every`` steps a callback records the process RSS, the store's size on disk and its part
  count; at the end the script times ``BNProbe.to_dataframe()`` (every row, from disk), a
  filtered ``bnprobe.load`` (one metric of one layer) and ``bnprobe.diagnose`` of the loaded table.
- ``resnet50``: a synthetic store of a 1M-step ResNet-50 run at the defaults (53 BN layers,
  every 50 steps, 28 rows per layer and measured step as the tap writes them, constants
  included), written through the Store API with a flush every ``--flush-every`` measured steps
  (about 30 s of a real run). Every ``--every`` measured steps it records RSS, disk and parts;
  at the end it times a filtered ``bnprobe.load`` of one metric of one layer, a step-range load,
  and (``--full``) a full ``bnprobe.load``.

    python benchmarks/longrun.py fit --layers 64 --width 64 --steps 20000 --every 2000
    python benchmarks/longrun.py resnet50 --steps 1000000 --every 100000 --full
    python benchmarks/longrun.py resnet50 --steps 5000 --every 1000   # a smoke run

Output: a markdown table per scenario (stdout), and ``--json PATH`` for the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnprobe import metrics as catalogue
from bnprobe.store import Rows, Store, load


def rss_mb() -> float:
    """Resident set size of this process, MB (Linux /proc; else ru_maxrss, the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk(folder: Path) -> tuple[float, int]:
    """MB on disk and part count of a store folder."""
    parts = list(folder.glob("part-*.parquet")) if folder.exists() else []
    return sum(p.stat().st_size for p in parts) / 2**20, len(parts)


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# -- resnet50: a synthetic store -------------------------------------------------------------
def resnet50(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    layers = [f"layer{i // 16 + 1}.{i % 16}.bn{i % 3 + 1}" for i in range(args.bn_layers)]
    names = list(catalogue.layer_row_order(True, True, True))  # 27 data rows
    structure = ["forward_calls", "train_mode", "model_train_mode", "momentum",
                 "has_running_stats", "samples_per_channel", "batch_size", "eps"]  # fmt: skip
    per_layer = names[: args.rows_per_layer - len(structure)] + structure
    fixed = {"forward_calls": 1.0, "train_mode": 1.0, "model_train_mode": 1.0, "momentum": 0.1,
             "has_running_stats": 1.0, "samples_per_channel": 256 * 56 * 56, "batch_size": 256.0,
             "eps": 1e-5}  # fmt: skip
    col_layers = [la for la in layers for _ in per_layer]
    col_metrics = per_layer * len(layers)
    rng = np.random.default_rng(0)
    is_fixed = np.array([m in fixed for m in col_metrics])
    fixed_values = np.array([fixed.get(m, 0.0) for m in col_metrics])
    store = Store(folder)
    out: list[dict[str, Any]] = []
    measured = args.steps // args.every_n_steps
    start = time.perf_counter()
    base = rss_mb()
    for i in range(measured):
        step = i * args.every_n_steps
        values = np.where(is_fixed, fixed_values, rng.random(len(col_metrics)))
        store.append(Rows(step, step // 5000, "train", 0, col_layers, col_metrics, values))
        if (i + 1) % args.flush_every == 0 or store.must_spill:
            store.flush()
        if (i + 1) % args.every == 0 or i + 1 == measured:
            store.flush()
            mb, parts = disk(folder)
            t_one, one = timed(lambda: load(folder, metrics="kl", layers=layers[7]))
            out.append({"steps": step + args.every_n_steps, "rows": (i + 1) * len(col_metrics),
                        "rss_mb": rss_mb() - base, "disk_mb": mb, "parts": parts,
                        "load_one_s": t_one, "load_one_rows": len(one),
                        "elapsed_s": time.perf_counter() - start})  # fmt: skip
            print(_row(out[-1]), flush=True)
    last = out[-1]
    t_range, _ = timed(lambda: load(folder, metrics="kl", steps=(0, args.steps // 10)))
    last["load_range_s"] = t_range
    if args.full:
        t_full, full = timed(lambda: load(folder))
        last["load_full_s"], last["load_full_rows"] = t_full, len(full)
        last["rss_after_full_mb"] = rss_mb() - base
    return out


# -- fit: a real many-layer net --------------------------------------------------------------
def fit(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from bnprobe import BNProbe, diagnose

    torch.set_num_threads(1)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            blocks: list[nn.Module] = []
            for _ in range(args.layers):
                blocks += [nn.Linear(args.width, args.width), nn.BatchNorm1d(args.width), nn.ReLU()]
            self.net = nn.Sequential(*blocks, nn.Linear(args.width, 4))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    out: list[dict[str, Any]] = []
    base = rss_mb()
    start = time.perf_counter()

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            step = trainer.global_step
            if step % args.every == 0 or step == args.steps:
                mb, parts = disk(folder)
                out.append({"steps": step, "rss_mb": rss_mb() - base, "disk_mb": mb,
                            "parts": parts, "elapsed_s": time.perf_counter() - start})  # fmt: skip
                print(_row(out[-1]), flush=True)

    x = torch.randn(4096, args.width)
    data = DataLoader(TensorDataset(x, torch.randint(4, (4096,))), batch_size=32, shuffle=True)
    probe = BNProbe(every_n_steps=1, per_channel=True, histograms=False, save_dir=folder,
                    summary=False)  # fmt: skip
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[probe, Watch()])  # fmt: skip
    trainer.fit(Net(), data)
    last = out[-1]
    last["to_dataframe_s"], df = timed(probe.to_dataframe)
    last["rows"] = len(df)
    del df
    layer = probe.layer_names[len(probe.layer_names) // 2]
    last["load_one_s"], _ = timed(lambda: load(folder, metrics="kl", layers=layer))
    t_load, table = timed(lambda: load(folder))
    last["load_full_s"] = t_load
    last["report_s"], _ = timed(lambda: diagnose(table))
    last["rss_end_mb"] = rss_mb() - base
    return out


def _row(r: dict[str, Any]) -> str:
    return " | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["fit", "resnet50"])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=2_000, help="record every N (measured) steps")
    parser.add_argument("--layers", type=int, default=64, help="fit: BatchNorm1d layers")
    parser.add_argument("--width", type=int, default=64, help="fit: channels per layer")
    parser.add_argument("--bn-layers", type=int, default=53, help="resnet50: BN layers")
    parser.add_argument("--rows-per-layer", type=int, default=28)
    parser.add_argument("--every-n-steps", type=int, default=50, help="resnet50: the probe's")
    parser.add_argument("--flush-every", type=int, default=10, help="resnet50: measured steps")
    parser.add_argument("--full", action="store_true", help="resnet50: time a full load too")
    parser.add_argument("--dir", type=Path, default=None, help="store folder (default: a temp)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bnprobe-longrun-"))
    folder = args.dir or tmp / "bnprobe_store"
    try:
        rows = (fit if args.scenario == "fit" else resnet50)(args, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
