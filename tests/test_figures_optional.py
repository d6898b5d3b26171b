"""matplotlib is optional (the ``figures`` extra): without it ``import bnprobe`` works,
``figures.available()`` says False and a real fit with the probe still writes its store and its
TensorBoard scalars.

"Without it" is a real interpreter that cannot find matplotlib: a folder of links to every entry
of the site-packages except matplotlib's (``sys.modules["matplotlib"] = None`` is not enough:
Lightning imports torchmetrics, which decides from the installed package metadata that matplotlib
is there and then imports it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnprobe import figures

REPO = Path(__file__).resolve().parents[1]
_MATPLOTLIB = ("matplotlib", "mpl_toolkits", "pylab.py")


def _without_matplotlib(tmp_path: Path) -> list[str]:
    """A prelude that puts a site-packages without matplotlib (and this checkout) on sys.path,
    for an interpreter started with ``-S`` (no site-packages of its own)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:  # not installed here: the plain site-packages do
        import site

        dirs = site.getsitepackages()
    else:
        site_packages = Path(spec.origin).parents[1]
        farm = tmp_path / "site-packages"
        farm.mkdir()
        for entry in site_packages.iterdir():
            name = entry.name
            hidden = name in _MATPLOTLIB or name.startswith(("matplotlib-", "__editable__"))
            if not hidden:
                (farm / name).symlink_to(entry)
        dirs = [str(farm)]
    return [
        "import site, sys",
        *[f"site.addsitedir({d!r})" for d in dirs],
        f"sys.path.insert(0, {str(REPO)!r})",
    ]


def _python(tmp_path: Path, *lines: str) -> subprocess.CompletedProcess[str]:
    code = "\n".join([*_without_matplotlib(tmp_path), *lines])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_available_with_matplotlib_installed() -> None:
    assert figures.available() is (importlib.util.find_spec("matplotlib") is not None)


def test_import_bnprobe_without_matplotlib(tmp_path: Path) -> None:
    done = _python(
        tmp_path,
        "import importlib.util, bnprobe",
        "from bnprobe import figures",
        "assert importlib.util.find_spec('matplotlib') is None",
        "print(bnprobe.__file__, figures.available(), 'matplotlib' in sys.modules)",
    )
    assert done.returncode == 0, done.stderr
    where, available, loaded = done.stdout.split()
    assert Path(where).resolve() == REPO / "bnprobe" / "__init__.py"
    assert (available, loaded) == ("False", "False")


@pytest.mark.slow
def test_fit_without_matplotlib_writes_store_and_scalars(tmp_path: Path) -> None:
    done = _python(
        tmp_path,
        "import json, warnings",
        "warnings.simplefilter('always')",
        "import bnprobe, pytorch_lightning as pl",
        "from pytorch_lightning.loggers import TensorBoardLogger",
        "from bnprobe.demo import DemoDataModule, DemoModule",
        "pl.seed_everything(0, verbose=False)",
        "probe = bnprobe.BNProbe(every_n_steps=1, summary=False)",
        "trainer = pl.Trainer(max_epochs=1, callbacks=[probe], accelerator='cpu',",
        "    logger=TensorBoardLogger('logs', name='run'), enable_progress_bar=False,",
        "    enable_model_summary=False, enable_checkpointing=False)",
        "with warnings.catch_warnings(record=True) as caught:",
        "    warnings.simplefilter('always')",
        "    trainer.fit(DemoModule(), DemoDataModule(batch_size=8, num_train=32, num_val=16))",
        "ours = [str(w.message) for w in caught if str(w.message).startswith('BNProbe')]",
        "print(json.dumps({'store': str(probe.store_dir), 'warnings': ours,",
        "    'matplotlib': 'matplotlib' in sys.modules}))",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["matplotlib"] is False
    # at most one word about figures, and nothing else went wrong
    assert len(result["warnings"]) <= 1, result["warnings"]
    assert all("figure" in w for w in result["warnings"]), result["warnings"]

    import bnprobe
    from bnprobe import tensorboard as tb

    run = tmp_path / "logs" / "run" / "version_0"
    assert Path(result["store"]) == Path("logs/run/version_0/bnprobe_store")
    stored = bnprobe.load(run / "bnprobe_store")
    assert set(stored["stage"]) == {"train", "val", "probe"}
    assert sorted(stored.loc[stored["stage"] == "train", "step"].unique()) == [0, 1, 2, 3]
    scalars = bnprobe.read_tensorboard(run)
    assert set(scalars["layer"]) >= {"net.features.1", "net.features.5"}
    assert {"train", "val", "probe"} <= set(scalars["stage"])
    # the scalars TensorBoard holds are the store's layer aggregates, value for value
    key = ["stage", "step", "layer", "metric"]
    aggregates = stored[stored["channel"].isna()]
    both = scalars.merge(aggregates, on=key, suffixes=("_tb", "_store"))
    assert len(both) == len(scalars) > 0
    assert (both["value_tb"] - both["value_store"]).abs().max() < 1e-6
    assert not any(t.startswith(f"{tb.PREFIX}/") and "/figure/" in t for t in _image_tags(run))


def _image_tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    return list(acc.Tags()["images"])
