"""The store's write path on real rows: CPU ms to append a 256-layer net's rows and to flush them
as one part file, and the part's size.

The rows are those of 64 measured steps of ``host_cost.py``'s net (``--layers`` pre-activation
blocks of 32 channels, about 35 rows per layer and step), made once by a real tap; each round
appends them to a fresh :class:`bnprobe.store.Store` with a folder and flushes it (one part:
``pyarrow.parquet.write_table`` of the buffered rows, then fsync and rename). Process CPU time,
``torch.set_num_threads(1)``; the first round pays pyarrow's first-use costs.

Compare two trees by running it once per tree (``--tree`` puts that tree's ``bnprobe`` first)::

    git archive <rev> | tar -x -C /tmp/old
    .venv/bin/python benchmarks/store_write.py --tree /tmp/old
    .venv/bin/python benchmarks/store_write.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--layers", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.tree), str(args.tree / "benchmarks")]
    import torch
    from host_cost import Bench

    from bnprobe.store import Store

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    bench = Bench(args.layers, False, Path(tempfile.mkdtemp(prefix="bnprobe-store-")))
    snaps = []
    for step in range(args.steps):
        bench.started_train()
        snaps.append(bench.tap.keep(step=step))
    snaps.append(bench.tap.drain())
    parts = [part for snap in snaps if snap is not None for part in snap.parts]
    rows = sum(len(part.metrics) for part in parts)
    appends, flushes = [], []
    for _ in range(args.rounds):
        store = Store(tempfile.mkdtemp(prefix="bnprobe-store-"))
        t0 = time.process_time()
        for part in parts:
            store.append(part)
        t1 = time.process_time()
        store.flush()
        appends.append(1e3 * (t1 - t0))
        flushes.append(1e3 * (time.process_time() - t1))
    size = store.part_files[0].stat().st_size / 2**20
    shape = f"{args.steps} steps x {args.layers} layers"
    print(f"{args.tree}: {rows} rows of {shape}; part file {size:.2f} MiB")
    for name, ms in (("append", appends), ("flush", flushes)):
        rest = ms[1:] or ms
        print(
            f"  {name:6s} ms: {' '.join(f'{m:.1f}' for m in ms)}; median after the first "
            f"{statistics.median(rest):.1f} ({statistics.median(rest) / args.steps:.2f} a step)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
