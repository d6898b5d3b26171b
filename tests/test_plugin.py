"""The BatchNorm tab: its data functions, its routes in-process (a real Python data provider
over event files the probe wrote, TensorBoard's own WSGI app, werkzeug's client) and, marked
slow, a real TensorBoard server on 127.0.0.1 with headless Chromium rendering the tab."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend import application
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.plugins import base_plugin
from torch import nn
from werkzeug.test import Client

import bnprobe
from bnprobe.demo import DemoDataModule, DemoModule, DemoNet
from bnprobe.pathologies import EvalOnlyBatchNorm2d, apply_pathology
from bnprobe.tensorboard.plugin import BatchNormPlugin, data

ROUTE = "/data/plugin/batchnorm/"


def _train(
    model: nn.Module, run_dir: Path, data_module: DemoDataModule, steps: int, lr: float = 0.05
) -> None:
    """A plain loop with bnprobe.watch: event files and the store in run_dir. ``lr`` is for
    the net's head; the rest trains at 0.05 unless the net has a ``body`` (then it is frozen:
    a deep plain net fine-tuned at its head, whose running statistics stay put)."""
    data_module.setup()
    params = model.head.parameters() if isinstance(model, DeepNet) else model.parameters()
    opt = torch.optim.SGD(params, lr=lr)
    step = 0
    with bnprobe.watch(model, run_dir, every_n_steps=1, histograms=False) as probe:
        for x, y in data_module.train_dataloader():
            if step == steps:
                break
            with probe.step(step, 0):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            step += 1
        probe.end_epoch(step, 0, data_module.val_dataloader())


DEPTH = 54
BROKEN = 26
"""The deep net's broken block: its BN layer is ``body.79``, kept in eval mode (the registry's
``frozen_bn`` pathology, :class:`bnprobe.pathologies.EvalOnlyBatchNorm2d`)."""
BROKEN_LAYER = f"body.{1 + 3 * BROKEN}"


class DeepNet(nn.Module):
    """``depth`` conv+BN blocks on 8x8 images: a 50+-layer net that runs in seconds. Block
    ``broken`` (if any) gets a BN layer stuck in eval mode, as ``frozen_bn`` does to the demo."""

    def __init__(self, depth: int = DEPTH, width: int = 4, broken: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
        for i in range(depth):
            bn = EvalOnlyBatchNorm2d(width) if i == broken else nn.BatchNorm2d(width)
            bn.train(True)  # a no-op for the frozen one: it stays in eval mode
            layers += [bn, nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 8)
        return self.head(self.body(x).mean((2, 3)))


def pretrained(net: DeepNet, data_module: DemoDataModule, batches: int = 4) -> DeepNet:
    """Running statistics settled on the training data (cumulative average over ``batches``),
    as in a pretrained backbone: a frozen layer keeps its initial ones."""
    data_module.setup()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    with torch.no_grad():
        net.train()
        for k, (x, _) in enumerate(data_module.train_dataloader()):
            if k == batches:
                break
            net(x)
    for m in bns:
        m.momentum = 0.1
    return net


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three runs the probe wrote: the healthy demo net; the demo net with the registry's
    ``shifted_val`` pathology (findings: stale running statistics); a 54-BN-layer net with one
    frozen layer among them (findings on ``body.79`` only)."""
    root = tmp_path_factory.mktemp("tab")
    torch.manual_seed(0)
    _train(
        DemoNet(), root / "healthy", DemoDataModule(num_train=480, num_val=64, batch_size=16), 30
    )
    torch.manual_seed(0)
    module, shifted = DemoModule(), DemoDataModule(num_train=256, num_val=64, batch_size=32)
    apply_pathology("shifted_val", module, shifted)
    _train(module.net, root / "shifted", shifted, steps=8)
    torch.manual_seed(0)
    deep = DemoDataModule(num_train=96, num_val=32, batch_size=16)
    _train(pretrained(DeepNet(broken=BROKEN), deep), root / "deep", deep, 6)
    return root


def _client(logdir: Path) -> tuple[Client, BatchNormPlugin]:
    mux = pem.EventMultiplexer(tensor_size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = MultiplexerDataProvider(mux, str(logdir))
    ctx = base_plugin.TBContext(logdir=str(logdir), data_provider=provider, multiplexer=mux)
    plugin = BatchNormPlugin(ctx)
    return Client(application.TensorBoardWSGI([plugin], data_provider=provider)), plugin


def _json(client: Client, route: str, **query: str) -> Any:
    url = ROUTE + route + ("?" + urllib.parse.urlencode(query) if query else "")
    response = client.get(url)
    assert response.status_code == 200, response.data[:300]
    return json.loads(response.data)


# --------------------------------------------------------------------------- data functions


def test_heatmap_columns_are_the_logged_steps_or_equal_count_groups() -> None:
    series = {
        "a": (np.array([0, 2, 4, 6]), np.array([0.1, 0.2, np.nan, 0.4])),
        "b": (np.array([0, 2, 4, 6]), np.array([1.0, 2.0, 3.0, 4.0])),
    }
    steps, grid = data.heatmap(series, ["b", "a", "c"], cols=10)
    assert steps == [0, 2, 4, 6]  # no empty column between logged steps
    np.testing.assert_array_equal(grid[0], [1.0, 2.0, 3.0, 4.0])
    assert np.isnan(grid[1, 2]) and np.isnan(grid[2]).all()
    steps, grid = data.heatmap(series, ["a", "b"], cols=2)
    assert steps == [0, 4]
    np.testing.assert_array_equal(grid, [[0.2, 0.4], [2.0, 4.0]])  # the max: a spike stays


def test_layers_in_model_order_then_natural_then_the_model() -> None:
    got = data.order_layers(
        ["<model>", "x.block10", "x.block2", "net.b", "net.a"], ["net.b", "net.a"]
    )
    assert got == ["net.b", "net.a", "x.block2", "x.block10", "<model>"]


# --------------------------------------------------------------------------- routes in-process


def test_tab_is_listed_active_and_its_frontend_is_served(logdir: Path) -> None:
    client, _ = _client(logdir)
    listing = json.loads(client.get("/data/plugins_listing").data)["batchnorm"]
    assert listing["enabled"] and listing["tab_name"] == "BatchNorm"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": ROUTE + "index.js"}
    for name, kind in (("index.js", "text/javascript"), ("host.js", "text/javascript")):
        response = client.get(ROUTE + name)
        assert response.status_code == 200 and response.mimetype == kind
    assert b"export async function render()" in client.get(ROUTE + "index.js").data
    assert client.get(ROUTE + "style.css").mimetype == "text/css"
    entry = client.get("/data/plugin_entry.html?name=batchnorm")
    assert "script-src" in entry.headers["Content-Security-Policy"]


def test_runs_route_lists_both_runs_and_the_fixed_scale(logdir: Path) -> None:
    client, _ = _client(logdir)
    got = _json(client, "runs")
    runs = {r["run"]: r for r in got["runs"]}
    assert set(runs) == {"deep", "healthy", "shifted"}
    assert runs["deep"]["layers"] == DEPTH and runs["shifted"]["layers"] == 2
    assert runs["shifted"]["store"] is True
    assert runs["shifted"]["stages"]["train"][:3] == ["mean_shift", "var_shift", "kl"]
    assert "eps" not in runs["shifted"]["stages"]["train"]
    limits = got["scale"]["limits"]
    assert limits["val/mean_shift"]["value"] == bnprobe.Thresholds().val_mean_shift_max
    assert limits["probe/pred_agreement"] == {
        "value": 0.8,
        "above": False,
        "name": "pred_agreement_min",
    }


def test_findings_route_returns_the_diagnosis_of_the_store(logdir: Path) -> None:
    client, _ = _client(logdir)
    got = _json(client, "findings", run="shifted")["findings"]
    want = bnprobe.diagnose(bnprobe.load(logdir / "shifted"))
    assert len(got) == len(want) > 0
    assert {(f["kind"], f["layer"]) for f in got} == {(str(f.kind), f.layer) for f in want}
    assert "stale_running_stats" in {f["kind"] for f in got}
    assert all(f["message"] and f["advice"] for f in got)
    ranks = [bnprobe.Severity(f["severity"]).rank for f in got]
    assert ranks == sorted(ranks)
    assert _json(client, "findings", run="healthy")["findings"] == []
    deep = _json(client, "findings", run="deep")["findings"]
    assert {(f["kind"], f["layer"]) for f in deep} == {
        ("frozen_bn", BROKEN_LAYER),
        ("stale_running_stats", BROKEN_LAYER),
    }


def test_heatmap_route_model_order_values_and_threshold(logdir: Path) -> None:
    client, _ = _client(logdir)
    got = _json(client, "heatmap", run="deep", stage="train", metric="mean_shift")
    table = bnprobe.load(logdir / "deep")
    rows = table[(table.stage == "train") & (table.metric == "mean_shift") & table.channel.isna()]
    order = list(dict.fromkeys(rows["layer"]))
    assert got["layers"] == order and len(order) == 54
    assert order[:2] == ["body.1", "body.4"]  # model order, not alphabetical
    assert got["steps"] == sorted(rows["step"].unique().tolist())
    want = rows.pivot(index="layer", columns="step", values="value").reindex(order)
    np.testing.assert_allclose(np.array(got["values"], dtype=float), want.to_numpy(), rtol=1e-6)
    assert got["limit"] == {"value": 1.0, "above": True, "name": "train_mean_shift_max"}
    val = _json(client, "heatmap", run="shifted", stage="val", metric="mean_shift")
    past = np.array(val["values"], dtype=float) > 0.75
    assert val["past"] == int(past.sum()) > 0  # the shifted validation data shows
    var = _json(client, "heatmap", run="deep", stage="train", metric="var_shift")
    worst = np.nanmax(np.array(var["values"], dtype=float), axis=1)
    assert var["layers"][int(np.argmax(worst))] == BROKEN_LAYER
    assert var["past"] == int((np.array(var["values"], dtype=float) > 1.0).sum()) > 0
    assert sorted(np.flatnonzero(worst > 1.0)) == [var["layers"].index(BROKEN_LAYER)]
    healthy = _json(client, "heatmap", run="healthy", stage="train", metric="mean_shift")
    assert healthy["past"] == 0 and len(healthy["steps"]) == 30


def test_layer_route_gives_the_curves_and_latest_gaps(logdir: Path) -> None:
    client, _ = _client(logdir)
    got = _json(client, "layer", run="shifted", layer="features.5")
    train = got["series"]["train"]
    assert {"batch_mean", "running_mean", "batch_var", "running_var", "gamma_drift"} <= set(train)
    assert [s for s, _ in train["mean_shift"]] == list(range(8))
    assert got["limits"]["val/mean_shift"]["value"] == 0.75
    assert got["latest"]["local_gap"]["step"] == 8
    table = bnprobe.load(logdir / "shifted")
    gap = table[(table.metric == "local_gap") & (table.layer == "features.5")]["value"]
    assert got["latest"]["local_gap"]["value"] == pytest.approx(float(gap.iloc[-1]), rel=1e-6)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("heatmap?run=shifted", 400),
        ("heatmap?run=shifted&stage=train&metric=mean_shift&cols=x", 400),
        ("heatmap?run=shifted&stage=train&metric=nope", 404),
        ("layer?run=shifted&layer=nope", 404),
        ("findings?run=../../etc", 400),
    ],
)
def test_bad_queries_get_4xx_not_500(logdir: Path, query: str, code: int) -> None:
    client, _ = _client(logdir)
    assert client.get(ROUTE + query).status_code == code


def test_plugin_module_imports_no_torch_or_lightning() -> None:
    code = (
        "import sys, bnprobe.tensorboard.plugin;"
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'matplotlib')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- a real server


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return env


def _registered() -> bool:
    return any(e.name == "batchnorm" for e in entry_points(group="tensorboard_plugins"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(port: int, route: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=20) as response:
        return json.loads(response.read())


@contextmanager
def _tensorboard(logdir: Path, fast: bool, log: Path) -> Iterator[int]:
    """``python -m tensorboard.main`` on 127.0.0.1 and a free port, in its own process group
    (the fast loader's data server with it), killed when the block ends whatever happens."""
    port = _port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), f"--load_fast={str(fast).lower()}"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    try:
        yield port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _store_steps(run_dir: Path, stage: str) -> list[int]:
    table = bnprobe.load(run_dir)
    return sorted(table.loc[table.stage == stage, "step"].unique().tolist())


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH to render the tab (Debian: apt-get install chromium)")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    cmd += ["--disable-background-networking", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, False], ids=["fast_loader", "python_loader"])
def test_real_tensorboard_serves_the_tab_and_chromium_renders_it(
    logdir: Path, tmp_path: Path, fast: bool
) -> None:
    if not _registered():
        pytest.skip("bnprobe's tensorboard_plugins entry point is not registered: pip install -e .")
    log = tmp_path / "tensorboard.log"
    deep_steps = _store_steps(logdir / "deep", "train")
    with _tensorboard(logdir, fast, log) as port:
        # Wait for all of the data: the Python loader serves partial runs at first.
        deadline, ready, hm = time.monotonic() + 240, False, {}
        while not ready and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                listing = _get(port, "/data/plugins_listing")
                if not listing.get("batchnorm", {}).get("enabled"):
                    continue
                runs = {r["run"]: r for r in _get(port, ROUTE + "runs")["runs"]}
                if set(runs) != {"deep", "healthy", "shifted"}:
                    continue
                hm = _get(port, ROUTE + "heatmap?run=deep&stage=train&metric=var_shift")
                ready = hm["steps"] == deep_steps and len(hm["layers"]) == DEPTH
                ready &= all("probe" in r["stages"] for r in runs.values())
            except (OSError, ValueError):  # not up yet, or a 404 before the tags are loaded
                pass
        assert ready, log.read_text(errors="replace")[-3000:]
        tab = listing["batchnorm"]
        assert tab["tab_name"] == "BatchNorm" and tab["loading_mechanism"]["type"] == "IFRAME"

        # The broken layer, in the heatmap data and in the findings.
        table = bnprobe.load(logdir / "deep")
        rows = table[(table.stage == "train") & (table.metric == "var_shift")]
        rows = rows[rows.channel.isna()]
        order = list(dict.fromkeys(rows["layer"]))
        assert hm["layers"] == order and hm["limit"]["value"] == 1.0
        want = rows.pivot(index="layer", columns="step", values="value").reindex(order)
        values = np.array(hm["values"], dtype=float)
        np.testing.assert_allclose(values, want.to_numpy(), rtol=1e-6)
        past_rows = [hm["layers"][i] for i in np.flatnonzero((values > 1.0).any(axis=1))]
        assert past_rows == [BROKEN_LAYER] and hm["past"] == len(deep_steps)
        found = _get(port, ROUTE + "findings?run=deep")["findings"]
        assert {(f["kind"], f["layer"]) for f in found} == {
            ("frozen_bn", BROKEN_LAYER),
            ("stale_running_stats", BROKEN_LAYER),
        }
        assert _get(port, ROUTE + "findings?run=healthy")["findings"] == []
        healthy = _get(port, ROUTE + "heatmap?run=healthy&stage=train&metric=mean_shift")
        assert healthy["past"] == 0 and healthy["layers"] == ["features.1", "features.5"]
        shifted = _get(port, ROUTE + "findings?run=shifted")["findings"]
        assert "stale_running_stats" in {f["kind"] for f in shifted}
        layer = _get(port, ROUTE + f"layer?run=deep&layer={BROKEN_LAYER}")
        assert [s for s, _ in layer["series"]["train"]["var_shift"]] == deep_steps

        # Headless Chromium runs the tab's module: the iframe's DOM, then a screenshot of the
        # whole TensorBoard page with the tab open.
        url = f"http://127.0.0.1:{port}/data/plugin_entry.html?name=batchnorm"
        dom = _chromium(
            "--dump-dom",
            "--virtual-time-budget=30000",
            url + "&run=deep&run=healthy&run=shifted&metric=var_shift",
        ).stdout
        assert 'data-bn-ready="1"' in dom, dom[-2000:]
        counts = dict(
            re.findall(r'class="bn-findings[^"]*" data-run="(\w+)" data-count="(-?\d+)"', dom)
        )
        assert counts == {"deep": "2", "healthy": "0", "shifted": str(len(shifted))}
        assert f'data-kind="frozen_bn" data-severity="warning" data-layer="{BROKEN_LAYER}"' in dom
        # its row label is marked: named by a finding, and past the threshold
        label = re.search(rf'<div[^>]*data-layer="{BROKEN_LAYER}"[^>]*>', dom)
        assert label is not None and 'data-flagged="1"' in label.group(0)
        assert 'data-past="1"' in label.group(0)
        maps = {
            (m[0], m[1]): (int(m[2]), int(m[3]))
            for m in re.findall(
                r'class="bn-hm" data-run="(\w+)" data-stage="(\w+)"[^>]*data-layers="(\d+)"'
                r'[^>]*data-past-threshold="(\d+)"',
                dom,
            )
        }
        assert maps[("deep", "train")] == (DEPTH, len(deep_steps))
        early = _get(port, ROUTE + "heatmap?run=healthy&stage=train&metric=var_shift")["past"]
        assert maps[("healthy", "train")] == (2, early)  # the first steps, before warm-up
        png = tmp_path / "tab.png"
        _chromium(
            "--window-size=1400,1000",
            "--virtual-time-budget=30000",
            f"--screenshot={png}",
            f"http://127.0.0.1:{port}/#batchnorm",
        )
        assert _red_pixels(png) > 50  # the broken layer's row, past the threshold, in red


def _red_pixels(png: Path) -> int:
    """Pixels of the red band of the scale (past the threshold) in a screenshot."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3] * 255
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 100) & (r - g > 90) & (r - b > 90)).sum())
