"""Command line: ``bnprobe demo``, ``bnprobe report RUN``, ``bnprobe export RUN -o FILE``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class CLIError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


def read_run(path: str | Path) -> pd.DataFrame:
    """The table of a run: its saved parquet store if there is one, else its TensorBoard files."""
    from bnprobe.store import load
    from bnprobe.tensorboard import read_tensorboard

    root = Path(path)
    if not root.exists():
        raise CLIError(f"{root}: no such file or folder")
    try:
        return load(root)
    except FileNotFoundError:
        pass
    try:
        return read_tensorboard(root)
    except FileNotFoundError:
        raise CLIError(
            f"{root}: no bnprobe data here (neither a parquet store nor TensorBoard event files "
            "with bnprobe tags). Pass the run folder that BNProbe wrote to."
        ) from None


def _demo(args: argparse.Namespace) -> int:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from bnprobe.callback import BNProbe
    from bnprobe.demo import DemoDataModule, DemoModule
    from bnprobe.pathologies import PATHOLOGIES, apply_pathology

    if args.list:
        for name, what in sorted(PATHOLOGIES.items()):
            print(f"{name:20s} {what}")
        return 0
    if args.pathology is not None and args.pathology not in PATHOLOGIES:
        raise CLIError(
            f"unknown pathology {args.pathology!r}; choose one of: {', '.join(sorted(PATHOLOGIES))}"
        )
    pl.seed_everything(args.seed, verbose=False)
    module = DemoModule()
    data = DemoDataModule(seed=args.seed, num_train=args.train_size, num_val=args.val_size)
    if args.pathology:
        apply_pathology(args.pathology, module, data)
    probe = BNProbe(every_n_steps=args.every_n_steps, summary=False)  # the report follows
    logger = TensorBoardLogger(args.out, name="demo" if not args.pathology else args.pathology)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[probe],
        logger=logger,
        log_every_n_steps=args.every_n_steps,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(module, data)
    df = probe.to_dataframe()
    print()
    train = df[df["stage"] == "train"]
    print(
        f"bnprobe measured {len(probe.layer_names)} BatchNorm layers at "
        f"{train['step'].nunique()} training steps and {df['step'].nunique()} steps in all: "
        f"{len(df)} rows."
    )
    run = Path(logger.log_dir).resolve()
    print(f"  run folder:   {run}")
    print(f"  parquet:      {run / 'bnprobe'}")
    print(f"  TensorBoard:  tensorboard --logdir {Path(args.out).resolve()}")
    print(f"  report:       bnprobe report {run}")
    print()
    print(probe.report())
    return 0


def _report(args: argparse.Namespace) -> int:
    from bnprobe.diagnosis import diagnose, exit_code, format_report

    df = read_run(args.run)
    if df.empty:
        raise CLIError(f"{args.run}: the run holds no bnprobe rows yet")
    findings = diagnose(df)
    print(format_report(df, findings, fmt=args.format))
    return exit_code(findings, args.fail_on)


def _export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix not in (".parquet", ".csv"):
        raise CLIError(f"{out}: the output must end in .parquet or .csv")
    df = read_run(args.run)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out, index=False)
    print(f"wrote {len(df)} rows to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnprobe", description="Watch, diagnose and repair BatchNorm layers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the demo net on synthetic data with the probe")
    demo.add_argument(
        "--pathology", metavar="NAME", help="induce a named BatchNorm problem (see --list)"
    )
    demo.add_argument("--list", action="store_true", help="list the pathologies and exit")
    demo.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    demo.add_argument("--train-size", type=int, default=3072, help="training images")
    demo.add_argument("--val-size", type=int, default=512, help="validation images")
    demo.add_argument("--every-n-steps", type=int, default=5, help="measure every n steps")
    demo.add_argument("--out", default="bnprobe_demo", help="log folder (default bnprobe_demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="findings and a summary of a saved run")
    report.add_argument("run", help="run folder (parquet store or TensorBoard event files)")
    report.add_argument(
        "--fail-on",
        choices=("warning", "error"),
        default=None,
        help="exit with 1 when a finding of this severity or worse is present",
    )
    report.add_argument("--format", choices=("text", "json"), default="text")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="write the table of a run to .parquet or .csv")
    export.add_argument("run", help="run folder (parquet store or TensorBoard event files)")
    export.add_argument("-o", "--output", required=True, help="output file, .parquet or .csv")
    export.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CLIError as err:
        print(f"bnprobe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
