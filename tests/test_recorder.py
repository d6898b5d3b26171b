"""The recorder and its two drivers: a plain PyTorch loop with ``bnprobe.watch`` writes the same
event files and store as ``Trainer.fit`` with BNProbe; no library is left patched after a fit; two
probes in one Trainer resume with their own state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea

import bnprobe
from tests.reference import Lit, loader, make_model, trainer

ROOT = Path(__file__).resolve().parents[1]


def _events(path: Path) -> dict[str, Any]:
    """Every bnprobe point of a run folder, read by TensorBoard's own reader."""
    acc = ea.EventAccumulator(
        str(path), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, Any] = {}
    for tag in tags["scalars"]:
        if tag.startswith("bnprobe/"):
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in tags["histograms"]:
        out[tag] = [
            (e.step, e.histogram_value.num, e.histogram_value.sum, list(e.histogram_value.bucket))
            for e in acc.Histograms(tag)
        ]
    for tag in tags["images"]:
        out[tag] = [(e.step, e.width, e.height) for e in acc.Images(tag)]
    (layout,) = acc.Tensors("custom_scalars__config__")
    out["custom_scalars__config__"] = layout.tensor_proto.string_val[0]
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for tag in a:
        if tag == "custom_scalars__config__" or "/hist/" in tag:
            assert a[tag] == b[tag], tag
            continue
        assert [p[0] for p in a[tag]] == [p[0] for p in b[tag]], tag
        np.testing.assert_array_equal(
            np.array([p[1:] for p in a[tag]], dtype=float),
            np.array([p[1:] for p in b[tag]], dtype=float),
            err_msg=tag,
        )


def test_plain_loop_writes_the_same_event_files_and_store_as_the_callback(tmp_path) -> None:
    train, val = loader((6,), n=64), loader((6,), n=48, seed=1)

    pl.seed_everything(3)
    lit = Lit(make_model("mlp1d"))
    probe = bnprobe.BNProbe(every_n_steps=1, summary=False)
    logger = TensorBoardLogger(tmp_path, name="fit", version=0)
    trainer(tmp_path, callbacks=[probe], logger=logger, num_sanity_val_steps=0).fit(lit, train, val)

    pl.seed_everything(3)
    lit = Lit(make_model("mlp1d"))
    opt = lit.configure_optimizers()
    step = 0
    with bnprobe.watch(lit, tmp_path / "plain", every_n_steps=1) as rec:
        for epoch in range(2):
            for i, batch in enumerate(train):
                with rec.step(step, epoch):
                    loss = lit.training_step(batch, i)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                step += 1
            rec.end_epoch(step, epoch, val)

    fit_rows = probe.to_dataframe()
    assert set(fit_rows["stage"]) == {"train", "val", "probe"}
    pd.testing.assert_frame_equal(rec.to_dataframe(), fit_rows, check_exact=True)
    pd.testing.assert_frame_equal(bnprobe.load(tmp_path / "plain"), bnprobe.load(logger.log_dir))
    fit_events, plain_events = _events(Path(logger.log_dir)), _events(tmp_path / "plain")
    assert any("/hist/" in t for t in fit_events) and any("/figure/" in t for t in fit_events)
    _same(fit_events, plain_events)


def test_no_patch_of_tensorboard_is_left_after_a_fit(tmp_path) -> None:
    code = """
import sys
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer, event_file_writer
import torch.utils.tensorboard.writer as torch_writer
import bnprobe
from tests.reference import Lit, loader, make_model, trainer

before = {m.__name__: dict(vars(m)) for m in (record_writer, event_file_writer, torch_writer)}
pl.seed_everything(0)
logger = TensorBoardLogger(sys.argv[1], name="run")
trainer(sys.argv[1], callbacks=[bnprobe.BNProbe(every_n_steps=1)], logger=logger).fit(
    Lit(make_model("mlp1d")), loader((6,)))
assert record_writer.masked_crc32c is pywrap_tensorflow.masked_crc32c
for m in (record_writer, event_file_writer, torch_writer):
    after = vars(m)
    changed = [k for k, v in before[m.__name__].items() if after.get(k) is not v]
    assert not changed, (m.__name__, changed)
print("clean")
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("clean")


def test_two_probes_in_one_trainer_resume_with_their_own_state(tmp_path) -> None:
    def run(max_epochs: int, ckpt: str | None = None) -> tuple[list[bnprobe.BNProbe], Any]:
        pl.seed_everything(7)
        probes = [
            bnprobe.BNProbe(every_n_steps=1, save_dir=tmp_path / "a", summary=False),
            bnprobe.BNProbe(every_n_steps=3, save_dir=tmp_path / "b", summary=False),
        ]
        tr = trainer(
            tmp_path, callbacks=list(probes), max_epochs=max_epochs, enable_checkpointing=True
        )
        tr.fit(Lit(make_model("mlp1d")), loader((6,)), ckpt_path=ckpt)
        return probes, tr

    first, tr = run(1)  # steps 0..3
    assert first[0].state_key != first[1].state_key
    ckpt = str(tmp_path / "mid.ckpt")
    tr.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert [saved[p.state_key]["last_step"] for p in first] == [3, 3]
    assert saved[first[0].state_key]["store_dir"] == str(tmp_path / "a")
    assert saved[first[1].state_key]["store_dir"] == str(tmp_path / "b")
    resumed, _ = run(2, ckpt)  # steps 4..7
    every_step, every_third = (p.to_dataframe() for p in resumed)
    assert sorted(every_step["step"].unique()) == [4, 5, 6, 7]
    assert sorted(every_third["step"].unique()) == [6]
    assert sorted(bnprobe.load(tmp_path / "a")["step"].unique()) == list(range(8))
    assert sorted(bnprobe.load(tmp_path / "b")["step"].unique()) == [0, 3, 6]


def test_the_state_key_follows_every_option_it_names() -> None:
    """Lightning reads ``state_key`` at every hook; the probe keeps the key while its options
    stay the same, and builds it again when one changes, a list changed in place included."""
    layers = ["a.bn"]
    probe = bnprobe.BNProbe(layers=layers, save_dir="/tmp/x")
    key = probe.state_key
    assert probe.state_key is key  # kept, not rebuilt
    assert "'a.bn'" in key and "'/tmp/x'" in key
    layers.append("b.bn")
    assert "['a.bn', 'b.bn']" in probe.state_key
    probe.every_n_steps = 7
    assert "'every_n_steps': 7" in probe.state_key
    probe.save_dir = "/tmp/y"
    assert "'/tmp/y'" in probe.state_key
    assert (
        probe.state_key
        == bnprobe.BNProbe(every_n_steps=7, layers=["a.bn", "b.bn"], save_dir="/tmp/y").state_key
    )


class _OldProbe(bnprobe.BNProbe):
    """A probe as they were before ``state_key``: its state is saved under "BNProbe"."""

    @property
    def state_key(self) -> str:
        return "BNProbe"


def test_a_checkpoint_from_before_state_key_resumes_the_one_probe(tmp_path) -> None:
    def run(probes: list[bnprobe.BNProbe], max_epochs: int, ckpt: str | None = None) -> Any:
        pl.seed_everything(7)
        tr = trainer(
            tmp_path, callbacks=list(probes), max_epochs=max_epochs, enable_checkpointing=True
        )
        tr.fit(Lit(make_model("mlp1d")), loader((6,)), ckpt_path=ckpt)
        return tr

    old = _OldProbe(every_n_steps=1, save_dir=tmp_path / "a", summary=False)
    tr = run([old], 1)  # steps 0..3
    ckpt = str(tmp_path / "old.ckpt")
    tr.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert [k for k in saved if "BNProbe" in k] == ["BNProbe"]
    assert saved["BNProbe"]["last_step"] == 3

    probe = bnprobe.BNProbe(every_n_steps=1, save_dir=tmp_path / "a", summary=False)
    assert probe.state_key != "BNProbe"
    run([probe], 2, ckpt)  # steps 4..7
    assert probe.state_dict()["last_step"] == 7
    assert sorted(probe.to_dataframe()["step"].unique()) == [4, 5, 6, 7]
    assert sorted(bnprobe.load(tmp_path / "a")["step"].unique()) == list(range(8))
    refs = saved["BNProbe"]["references"]
    assert refs and probe.state_dict()["references"].keys() == refs.keys()
    for layer, ref in refs.items():  # the drift references of step 0, not those of step 4
        for name in ("gamma0", "beta0", "initial"):
            if name in ref:
                torch.testing.assert_close(probe.state_dict()["references"][layer][name], ref[name])

    two = [
        bnprobe.BNProbe(every_n_steps=1, save_dir=tmp_path / "c", summary=False),
        bnprobe.BNProbe(every_n_steps=2, save_dir=tmp_path / "d", summary=False),
    ]
    with pytest.warns(UserWarning, match="under the old key 'BNProbe'.*2 probes"):
        run(two, 2, ckpt)
    assert [p.state_dict()["last_step"] for p in two] == [7, 6]
    assert sorted(bnprobe.load(tmp_path / "c")["step"].unique()) == [4, 5, 6, 7]
