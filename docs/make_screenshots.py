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
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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


def _dashboards_ready(port: int) -> bool:
    tags = _get(port, "/data/plugin/scalars/tags")
    layout = _get(port, "/data/plugin/custom_scalars/layout")
    images = _get(port, "/data/plugin/images/tags")
    return bool(tags and layout.get("category") and any(images.values()))


@contextmanager
def tensorboard(
    logdir: Path,
    timeout: float = 120.0,
    ready: Callable[[int], bool] = _dashboards_ready,
    load_fast: str = "false",
) -> Iterator[int]:
    """Run a TensorBoard server on 127.0.0.1 until the block ends; yield its port once
    ``ready(port)`` (default: scalars, a Custom Scalars layout and images are served)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), f"--load_fast={load_fast}"]
    log = logdir / "tensorboard.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {log.read_text()[-2000:]}")
            try:
                if ready(port):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TensorBoard was not ready within {timeout:.0f} s; does the run have "
                    f"the data? ({log})"
                )
            time.sleep(0.5)
        yield port
    finally:
        try:  # the process group: the fast loader's data server too
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def drawn_pixels(png: Path, saturation: float = 0.25) -> int:
    """Strongly coloured pixels below the header and right of the sidebar: charts, heatmaps.

    A page whose data has not arrived yet shows empty white cards (a few hundred such pixels,
    from checkboxes and sliders); a drawn page has tens of thousands.
    """
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[70:, 340:, :3]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > saturation).sum())


def screenshot(
    chromium: str,
    url: str,
    out: Path,
    size: tuple[int, int],
    min_pixels: int = 10_000,
    saturation: float = 0.25,
) -> None:
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
        if drawn_pixels(out, saturation) > min_pixels:
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


# --------------------------------------------------------------------------- the BatchNorm tab

DEEP_DEPTH = 54
DEEP_BROKEN = 26
"""The deep net's block whose BN layer is stuck in eval mode: ``body.79``."""


def deep_net(depth: int = DEEP_DEPTH, broken: int | None = DEEP_BROKEN, width: int = 8) -> Any:
    """``depth`` Conv-BN-ReLU blocks (no residuals) on 8x8 inputs, block ``broken``'s BN layer
    kept in eval mode (the ``frozen_bn`` pathology of :mod:`bnprobe.pathologies`)."""
    import torch.nn.functional as F
    from torch import nn

    from bnprobe.pathologies import EvalOnlyBatchNorm2d

    class DeepNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
            for i in range(depth):
                bn = EvalOnlyBatchNorm2d(width) if i == broken else nn.BatchNorm2d(width)
                bn.train(True)  # a no-op for the frozen one: it stays in eval mode
                layers += [bn, nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False)]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, 10)

        def forward(self, x: Any) -> Any:
            return self.head(self.body(F.adaptive_avg_pool2d(x, 8)).mean((2, 3)))

    return DeepNet()


def train_deep(run_dir: Path, steps: int) -> None:
    """A "pretrained" deep net (running statistics settled on the data) whose head is trained
    for ``steps`` steps with ``bnprobe.watch``; every step measured, then a validation pass."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import bnprobe
    from bnprobe.demo import DemoDataModule

    torch.manual_seed(0)
    data = DemoDataModule(num_train=16 * steps, num_val=64, batch_size=16)
    data.setup()
    net = deep_net()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # cumulative averages over 4 batches: settled running statistics
        m.momentum = None
    with torch.no_grad():
        for k, (x, _) in enumerate(data.train_dataloader()):
            if k < 4:
                net(x)
    for m in bns:
        m.momentum = 0.1
    opt = torch.optim.SGD(net.head.parameters(), lr=0.05)
    with bnprobe.watch(net, run_dir, every_n_steps=1, histograms=False) as probe:
        for step, (x, y) in enumerate(data.train_dataloader()):
            with probe.step(step, 0):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        probe.end_epoch(steps, 0, data.val_dataloader())


def tab(args: argparse.Namespace) -> None:
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium (or pass --chromium PATH)")
    IMG.mkdir(parents=True, exist_ok=True)
    if args.logdir:
        _tab(Path(args.logdir), chromium, args)
        return
    with tempfile.TemporaryDirectory(prefix="bnprobe-tab-") as tmp:
        _tab(Path(tmp), chromium, args)


def _tab(logdir: Path, chromium: str, args: argparse.Namespace) -> None:
    """The demo (``bnprobe demo``) and the 54-layer net with a frozen layer, in one logdir;
    TensorBoard with its default (fast) loader; the tab as a user opens it, and chosen views
    through the iframe's own URL."""
    if not (logdir / "demo").exists():
        demo = [sys.executable, "-m", "bnprobe", "demo", "--out", str(logdir / "demo")]
        print("training: bnprobe", " ".join(demo[3:]))
        subprocess.run([*demo, "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    if not (logdir / "deep54").exists():
        print(f"training: the {DEEP_DEPTH}-layer net, {args.steps} steps")
        train_deep(logdir / "deep54", args.steps)

    def ready(port: int) -> bool:
        runs = _get(port, "/data/plugin/batchnorm/runs")["runs"]
        return len(runs) == 2 and all("probe" in r["stages"] for r in runs)

    with tensorboard(logdir, ready=ready, load_fast="true") as port:
        base = f"http://127.0.0.1:{port}"
        runs = [r["run"] for r in _get(port, "/data/plugin/batchnorm/runs")["runs"]]
        demo_run = next(r for r in runs if r.startswith("demo"))
        frame = base + "/data/plugin_entry.html?name=batchnorm&"
        layer = f"body.{1 + 3 * DEEP_BROKEN}"
        pages = [
            ("tab_tensorboard.png", base + "/#batchnorm", (1400, 1000)),
            ("tab_deep54.png", frame + "run=deep54&metric=var_shift", (1300, 1000)),
            ("tab_demo.png", frame + urllib.parse.urlencode({"run": demo_run}), (1300, 800)),
            (
                "tab_layer.png",
                frame
                + urllib.parse.urlencode({"run": "deep54", "metric": "var_shift", "layer": layer}),
                (1300, 1600),
            ),
        ]
        for name, url, size in pages:
            # the healthy band is pale: count any tinted pixel
            screenshot(chromium, url, IMG / name, size, min_pixels=5_000, saturation=0.05)


def write_synthetic(run_dir: Path, layers: int = 100, steps: int = 2000) -> None:
    """bnprobe-style train scalars (``mean_shift``, ``var_shift``, ``kl``) of ``layers`` layers
    for ``steps`` logged steps; layer 37 breaks after step 1200. No store: scalars only."""
    import math
    import random

    from torch.utils.tensorboard import SummaryWriter

    rnd = random.Random(0)
    writer = SummaryWriter(str(run_dir), max_queue=100_000, flush_secs=600)
    for step in range(steps):
        for i in range(layers):
            layer = f"net.block{i}.bn"
            broken = i == 37 and step > 1200
            shift = 0.02 + 0.01 * rnd.random() + (1.2 if broken else 0.0)
            writer.add_scalar(f"bnprobe/train/mean_shift/{layer}", shift, step)
            writer.add_scalar(f"bnprobe/train/var_shift/{layer}", 0.05 + 0.02 * rnd.random(), step)
            writer.add_scalar(f"bnprobe/train/kl/{layer}", 0.001 * (1 + math.sin(step / 100)), step)
    writer.close()


def routes(args: argparse.Namespace) -> None:
    """Time the tab's routes on a 100-layer x 2,000-step run, for each loader."""
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="bnprobe-routes-"))
    if not (logdir / "synth100").exists():
        print("writing 100 layers x 2,000 steps x 3 metrics (about a minute)")
        write_synthetic(logdir / "synth100")
    base = "/data/plugin/batchnorm/"
    queries = [
        "runs",
        "findings?run=synth100",
        "heatmap?run=synth100&stage=train&metric=mean_shift",
        "heatmap?run=synth100&stage=train&metric=var_shift",
        "layer?run=synth100&layer=net.block37.bn",
    ]

    def loaded(port: int) -> bool:  # the Python loader serves partial data at first
        hm = _get(port, base + queries[2])
        return bool(hm["steps"]) and hm["steps"][-1] >= 1990 and hm["points"] >= 100_000

    for load_fast in ("true", "false"):
        t0 = time.monotonic()
        with tensorboard(logdir, timeout=600, ready=loaded, load_fast=load_fast) as port:
            print(f"--load_fast={load_fast}: all data after {time.monotonic() - t0:.0f} s")
            for query in queries:
                times = []
                for _ in range(3):
                    t1 = time.perf_counter()
                    _get(port, base + query)
                    times.append(time.perf_counter() - t1)
                print(f"  {query:55s} " + " ".join(f"{t:.2f}" for t in times) + " s")


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
    p = sub.add_parser("tab", help="screenshot the BatchNorm tab (demo, 54-layer net)")
    p.add_argument("--steps", type=int, default=24, help="training steps of the deep net")
    p.add_argument("--chromium", default=None, help="path of the chromium binary")
    p.add_argument("--logdir", default=None, help="keep the runs here (reused if present)")
    p.set_defaults(func=tab)
    p = sub.add_parser("routes", help="time the tab's routes, 100 layers x 2,000 steps")
    p.add_argument("--logdir", default=None, help="keep the run here (reused if present)")
    p.set_defaults(func=routes)
    p = sub.add_parser("sizes", help="event-file bytes per logged step at default settings")
    p.add_argument("--steps", type=int, default=101, help="training steps (default 101)")
    p.set_defaults(func=sizes)
    p = sub.add_parser("bins", help="bytes and time per histogram for several binnings")
    p.set_defaults(func=bins)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
