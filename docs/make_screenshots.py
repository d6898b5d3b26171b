"""Screenshots and measurements for docs/tensorboard.md (not part of the test run).

    python docs/make_screenshots.py shots   # train the demo, screenshot TensorBoard -> docs/img
    python docs/make_screenshots.py sizes   # event-file bytes per logged step, demo + 20-layer net
    python docs/make_screenshots.py bins    # bytes and time per histogram for several binnings

``shots`` runs ``bnprobe demo`` (the command users run first), starts TensorBoard on 127.0.0.1
on a free port and takes screenshots with headless Chromium (Debian: ``apt-get install
chromium``). TensorBoard is a single-page app: ``--virtual-time-budget`` lets it fetch and draw
before the screenshot is taken. The figures exactly as logged are copied out of the event file
too. Look at the PNGs before committing them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"


# --------------------------------------------------------------------------- tensorboard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(port: int, route: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def tensorboard(logdir: Path, timeout: float = 120.0) -> Iterator[int]:
    """Run a TensorBoard server on 127.0.0.1 until the block ends; yield its port."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--load_fast=false"]
    log = logdir / "tensorboard.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {log.read_text()[-2000:]}")
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
                layout = _get(port, "/data/plugin/custom_scalars/layout")
                images = _get(port, "/data/plugin/images/tags")
                if tags and layout.get("category") and any(images.values()):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TensorBoard did not serve scalars, a Custom Scalars layout and images "
                    f"within {timeout:.0f} s; does the run have them? ({log})"
                )
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def drawn_pixels(png: Path) -> int:
    """Strongly coloured pixels below the header and right of the sidebar: charts, heatmaps.

    A page whose data has not arrived yet shows empty white cards (a few hundred such pixels,
    from checkboxes and sliders); a drawn page has tens of thousands.
    """
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[70:, 340:, :3]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum())


def screenshot(chromium: str, url: str, out: Path, size: tuple[int, int]) -> None:
    """Screenshot ``url``; retry with more virtual time until the charts are drawn."""
    for budget_ms in (25_000, 25_000, 40_000, 60_000, 90_000):
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--run-all-compositor-stages-before-draw",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        if drawn_pixels(out) > 10_000:
            print(f"  {out.relative_to(ROOT)}  <- {url}")
            return
    raise RuntimeError(f"{url} still showed no charts after 5 tries; see {out}")


def shots(args: argparse.Namespace) -> None:
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium (or pass --chromium PATH)")
    IMG.mkdir(parents=True, exist_ok=True)
    if args.logdir:  # reuse (or fill once) a folder: handy while adjusting the pages
        _shots(Path(args.logdir), chromium, args)
        return
    with tempfile.TemporaryDirectory(prefix="bnprobe-shots-") as tmp:
        _shots(Path(tmp), chromium, args)


def _shots(logdir: Path, chromium: str, args: argparse.Namespace) -> None:
    if not any(logdir.rglob("events.out.tfevents.*")):
        demo = [sys.executable, "-m", "bnprobe", "demo", "--out", str(logdir)]
        demo += ["--seed", "0"] + (["--epochs", str(args.epochs)] if args.epochs else [])
        if args.pathology:
            demo += ["--pathology", args.pathology]
        print("training: bnprobe", " ".join(demo[3:]))
        subprocess.run(demo, check=True, stdout=subprocess.DEVNULL)
    (run,) = {p.parent for p in logdir.rglob("events.out.tfevents.*")}
    export_figures(run)
    with tensorboard(logdir) as port:
        base = f"http://127.0.0.1:{port}"
        layer = _layers(port)[-1]
        hist_filter = urllib.parse.quote(f"hist/.*/{layer}$")
        pages = [
            ("tensorboard_custom_scalars.png", "/#custom_scalars&_smoothingWeight=0", 1500),
            ("tensorboard_histograms.png", f"/#histograms&tagFilter={hist_filter}", 1000),
            ("tensorboard_figures.png", "/?tagFilter=figure#timeseries", 1000),
        ]
        for name, route, height in pages:
            screenshot(chromium, base + route, IMG / name, (1600, height))


def _layers(port: int) -> list[str]:
    """The layers of the served run, from its mean_shift tags."""
    tags = next(iter(_get(port, "/data/plugin/scalars/tags").values()))
    prefix = "bnprobe/train/mean_shift/"
    return [t[len(prefix) :] for t in tags if t.startswith(prefix)]


def export_figures(run: Path) -> None:
    """Copy the last logged image of every figure tag out of the event file, as PNG."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run), size_guidance={ea.IMAGES: 1})
    acc.Reload()
    for tag in acc.Tags()["images"]:
        event = acc.Images(tag)[-1]
        name = "figure_" + "_".join(tag.split("/")[1:4:2]) + ".png"  # figure_<stage>_<name>
        (IMG / name).write_bytes(event.encoded_image_string)
        print(f"  {(IMG / name).relative_to(ROOT)}  <- {tag} at step {event.step}")


# --------------------------------------------------------------------------- sizes


def twenty_layer_net() -> Any:
    """20 Conv(32)-BN-ReLU blocks on 3x28x28 inputs (max-pooling after blocks 5, 10, 15)."""
    from torch import nn

    blocks: list[nn.Module] = []
    for i in range(20):
        c_in = 3 if i == 0 else 32
        blocks += [nn.Conv2d(c_in, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
        if i in (4, 9, 14):
            blocks.append(nn.MaxPool2d(2))
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(32 * 3 * 3, 10))


def _category(tag: str) -> str:
    parts = tag.split("/")
    if tag == "custom_scalars__config__":
        return "layout"
    if parts[0] != "bnprobe" or len(parts) < 3:
        return "not bnprobe (Lightning's own scalars)"
    stage = parts[1]
    if parts[2] == "hist":
        return f"{stage} histograms"
    if parts[2] == "figure":
        return "figures"
    return f"{stage} scalars"


def event_bytes(run: Path) -> dict[str, int]:
    """Bytes on disk per kind of record (TFRecord framing included), read with TensorBoard."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    out: dict[str, int] = defaultdict(int)
    for path in sorted(run.glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(record)
            tag = event.summary.value[0].tag if event.summary.value else "(file header)"
            out[_category(tag) if event.summary.value else tag] += len(record) + 16
    return dict(out)


def measure(name: str, module: Any, steps: int) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from bnprobe import BNProbe
    from bnprobe.demo import DemoDataModule

    with tempfile.TemporaryDirectory(prefix="bnprobe-sizes-") as tmp:
        pl.seed_everything(0, verbose=False)
        probe = BNProbe(save_dir=False)  # default settings; the parquet store is not measured
        logger = TensorBoardLogger(tmp, name=name, version=0)
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=1,
            accelerator="cpu",
            logger=logger,
            callbacks=[probe],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        data = DemoDataModule(batch_size=16, num_train=16 * steps, num_val=64)
        trainer.fit(module, data)
        logger.finalize("success")
        df = probe.to_dataframe()
        train_steps = df.loc[df.stage == "train", "step"].nunique()
        val_runs = df.loc[df.stage == "val", "step"].nunique()
        sizes = event_bytes(Path(logger.log_dir))
        channels = sum(la.module.num_features for la in probe.tap.layers) if probe.tap else 0
    per_step = {k: v / train_steps for k, v in sizes.items() if k.startswith("train ")}
    per_val = {
        k: v / max(val_runs, 1)
        for k, v in sizes.items()
        if k.startswith(("val ", "probe ")) or k == "figures"
    }
    print(f"\n{name}: {len(probe.layer_names)} BN layers, {channels} channels")
    every = trainer.log_every_n_steps
    print(f"  logged train steps: {train_steps} (every {every}), validation epochs: {val_runs}")
    print("  per logged train step:")
    for k, v in sorted(per_step.items()):
        print(f"    {k:32s} {v / 1024:8.1f} KiB")
    print(f"    {'total':32s} {sum(per_step.values()) / 1024:8.1f} KiB")
    print("  per validation epoch:")
    for k, v in sorted(per_val.items()):
        print(f"    {k:32s} {v / 1024:8.1f} KiB")
    print("  once / other:")
    for k, v in sorted(sizes.items()):
        if k not in per_step and k not in per_val:
            print(f"    {k:32s} {v / 1024:8.1f} KiB")


def sizes(args: argparse.Namespace) -> None:
    from bnprobe.demo import DemoModule

    measure("demo", DemoModule(), args.steps)
    measure("twenty", DemoModule(net=twenty_layer_net()), args.steps)


# --------------------------------------------------------------------------- bins


def bins(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from bnprobe import tensorboard as tb

    n = 200
    print(f"{'channels':>8} {'binning':>12} {'bytes/histogram':>16} {'µs/histogram':>13}")
    for channels in (64, 256, 1024):
        g = torch.Generator().manual_seed(0)
        vectors = [0.5 * torch.randn(channels, generator=g) for _ in range(n)]
        for binning in ("tensorflow", "auto", 64, tb.HIST_BINS, 16):
            with tempfile.TemporaryDirectory() as tmp:
                writer = SummaryWriter(tmp)
                writer.flush()
                (path,) = Path(tmp).glob("events.out.tfevents.*")
                start = path.stat().st_size
                t0 = time.perf_counter()
                for step, vec in enumerate(vectors):
                    writer.add_histogram("bnprobe/train/hist/d/layer1.0.bn1", vec, step, binning)
                writer.flush()
                elapsed = time.perf_counter() - t0
                writer.close()
                per = (path.stat().st_size - start) / n
            label = "default" if binning == "tensorflow" else str(binning)
            print(f"{channels:>8} {label:>12} {per:>16.0f} {elapsed / n * 1e6:>13.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shots", help="train the demo and screenshot TensorBoard into docs/img")
    p.add_argument("--epochs", type=int, default=None, help="default: bnprobe demo's")
    p.add_argument("--pathology", default=None, help="pass --pathology NAME to bnprobe demo")
    p.add_argument("--chromium", default=None, help="path of the chromium binary")
    p.add_argument("--logdir", default=None, help="keep the demo run here (reused if present)")
    p.set_defaults(func=shots)
    p = sub.add_parser("sizes", help="event-file bytes per logged step at default settings")
    p.add_argument("--steps", type=int, default=101, help="training steps (default 101)")
    p.set_defaults(func=sizes)
    p = sub.add_parser("bins", help="bytes and time per histogram for several binnings")
    p.set_defaults(func=bins)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
