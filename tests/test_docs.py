"""The docs say what the code does: the README's snippet runs as written, the CLI page lists
the exit codes the CLI returns, the demo's Python and command-line option names agree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import bnprobe
from bnprobe import cli
from bnprobe.demo import DemoDataModule
from bnprobe.store import STORE_NAME

ROOT = Path(__file__).resolve().parents[1]


def _python_block(markdown: str, heading: str) -> str:
    """The first ```python block after ``heading``."""
    section = markdown[markdown.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    code = _python_block((ROOT / "README.md").read_text(), "## Use it")
    assert "max_epochs=" in code  # copying it never starts Lightning's 1000-epoch default
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), namespace)  # verbatim
    out = capsys.readouterr().out
    assert "bnprobe watched 2 BatchNorm layers" in out  # the end-of-fit summary
    assert "net.features.1" in out  # the report the snippet prints
    df = namespace["df"]
    run = tmp_path / "tb_logs" / "lightning_logs" / "version_0"
    assert (run / STORE_NAME).is_dir() and list(run.glob("events.out.tfevents.*"))
    saved = bnprobe.load(run)
    assert len(saved) == len(df) > 0  # type: ignore[arg-type]
    assert {"train", "val", "probe"} == set(saved["stage"])


def test_cli_page_lists_every_exit_code() -> None:
    page = (ROOT / "docs" / "cli.md").read_text()
    codes = {cli.EXIT_OK, cli.EXIT_FINDINGS, cli.EXIT_USAGE, cli.EXIT_DATA}
    assert codes == {0, 1, 2, 3}
    for code in codes:
        assert re.search(rf"^\| `?{code}`? \|", page, re.MULTILINE), code


def test_demo_flags_are_the_data_module_options() -> None:
    parser = cli.build_parser()
    params = set(inspect.signature(DemoDataModule).parameters)
    args = parser.parse_args(["demo", "--num-train", "96", "--num-val", "32", "--batch-size", "8"])
    for name in ("num_train", "num_val", "batch_size", "seed"):
        assert name in params and hasattr(args, name)
    assert (args.num_train, args.num_val, args.batch_size) == (96, 32, 8)
    old = parser.parse_args(["demo", "--train-size", "64", "--val-size", "16"])
    assert (old.num_train, old.num_val) == (64, 16)  # the old flag names still work


def _metric_tables(markdown: str) -> dict[str, set[str]]:
    """Per ``## `` section: the metric names in the first column of its tables whose header's
    first cell is ``metric``."""
    out: dict[str, set[str]] = {}
    section, in_table = "", False
    for line in markdown.splitlines():
        if line.startswith("## "):
            section, in_table = line[3:], False
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        )
        if not cells:
            in_table = False
        elif cells[0] == "metric":
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            out.setdefault(section, set()).update(re.findall(r"`([a-z_]+)`", cells[0]))
    return out


def test_metrics_page_documents_exactly_the_catalogue() -> None:
    from bnprobe import metrics

    tables = _metric_tables((ROOT / "docs" / "metrics.md").read_text())
    documented = set().union(*tables.values())
    assert documented == set(metrics.names())  # every metric, and nothing else as a metric
    sections = {s.split("`")[1]: names for s, names in tables.items() if s.startswith("Stage `")}
    assert sections["probe"] == set(metrics.names("probe"))
    assert sections["recalibrate"] == set(metrics.names("recalibrate"))
    train = set(metrics.names("train", without=[metrics.DDP]))
    assert sections["train"] == train  # structural and per-channel tables included
    (ddp,) = [names for s, names in tables.items() if s.startswith("Distributed")]
    assert ddp == set(metrics.names("train")) - train


@pytest.mark.slow
def test_readme_plain_loop_snippet_writes_tensorboard_and_the_store(
    tmp_path, monkeypatch, capsys
) -> None:
    code = _python_block((ROOT / "README.md").read_text(), "## Without Lightning")
    assert "bnprobe.watch(" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), namespace)  # verbatim
    steps = namespace["step"]
    assert isinstance(steps, int) and steps > 5
    assert "features.1" in capsys.readouterr().out  # the report names the BN layers
    run = tmp_path / "runs" / "plain"
    assert (run / STORE_NAME).is_dir() and list(run.glob("events.out.tfevents.*"))
    saved = bnprobe.load(run)
    assert {"train", "val", "probe"} == set(saved["stage"])
    assert sorted(saved.loc[saved["stage"] == "train", "step"].unique()) == list(range(0, steps, 5))
    tags = set(bnprobe.read_tensorboard(run)["metric"])
    assert {"mean_shift", "logits_gap"} <= tags
