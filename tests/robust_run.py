"""A full disk, for tests/test_robust.py: ``python -m tests.robust_run OUT`` trains the same model
without and with BNProbe while the file size limit (RLIMIT_FSIZE) makes every write of more than
a few bytes fail with EFBIG, as a full disk would; writes the outcome to OUT/result.json."""

from __future__ import annotations

import json
import resource
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bnprobe import BNProbe
from tests.reference import Lit, loader, make_model


def fit(out: Path, probe: BNProbe | None) -> dict[str, torch.Tensor]:
    pl.seed_everything(3)
    lit = Lit(make_model("res2d"))
    pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        callbacks=[probe] if probe else [],
    ).fit(lit, loader((3, 8, 8)))
    return {k: v.clone() for k, v in lit.state_dict().items()}


def main() -> None:
    out = Path(sys.argv[1])
    plain = fit(out / "plain", None)
    probe = BNProbe(every_n_steps=1, save_dir=out / "store", summary=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
        try:
            probed = fit(out / "probed", probe)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    messages = [str(w.message) for w in caught if "BNProbe" in str(w.message)]
    same = all(torch.equal(plain[k], probed[k]) for k in plain)
    result: dict[str, Any] = {
        "warnings": messages,
        "same_weights": same,
        "rows": len(probe.to_dataframe()),
        "steps": sorted(int(s) for s in probe.to_dataframe()["step"].unique()),
        "parts": sorted(p.name for p in (out / "store").glob("part-*.parquet")),
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
