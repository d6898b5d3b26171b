"""Command line: ``bnprobe demo``, ``bnprobe report RUN``, ``bnprobe export RUN -o FILE``.

Exit codes, the same for every command (docs/cli.md):

- 0: done, and no finding at the ``--fail-on`` level;
- 1: ``report --fail-on LEVEL`` found a finding of that severity or worse in some run;
- 2: a usage error: a bad option, a path that does not exist, a file or folder that is not a
  bnprobe run (an event file, a CSV);
- 3: bnprobe data that could not be read: every part of a store is damaged, or (with a report
  or export of what could be read) some part was skipped and no finding made it 1.

Every one of these ends with one line on stderr, never a traceback; a closed pipe
(``bnprobe report RUN | head -1``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from bnprobe.diagnosis.digest import Digest

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_DATA = 0, 1, 2, 3

RUN_HELP = (
    "a run folder (the logger's version folder, holding bnprobe_store, or the store itself), "
    "a folder of runs, or a part-*.parquet file"
)


class CLIError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""

    code = EXIT_USAGE


class DataError(CLIError):
    """bnprobe data that could not be read: printed as one line, exit code 3."""

    code = EXIT_DATA


class Runs:
    """The runs read from a RUN argument, and the problems met reading them."""

    def __init__(
        self,
        tables: dict[str, pd.DataFrame],
        problems: list[str],
        digests: dict[str, Digest] | None = None,
    ) -> None:
        self.tables = tables
        self.problems = problems
        self.digests = digests or {}

    def table(self) -> pd.DataFrame:
        """One table: the plain SPEC table of one run, or every run with a ``run`` column."""
        from bnprobe.store import with_runs

        if len(self.tables) == 1:
            return next(iter(self.tables.values()))
        return with_runs(self.tables)


def read_run(path: str | Path, run: str | None = None, *, stream: bool = False) -> Runs:
    """Every run at ``path``: from its parquet store where it has one, else from its
    TensorBoard event files (run names as :func:`bnprobe.load` and
    :func:`bnprobe.read_tensorboard` give them). ``run`` picks one of them.

    ``stream=True`` (``bnprobe report``): a store's part files are streamed into a
    :class:`~bnprobe.diagnosis.digest.Digest` per run (:mod:`bnprobe.diagnosis.stream`) and
    :attr:`Runs.tables` holds the digests' tables, :attr:`Runs.digests` the digests."""
    root = Path(path)
    if not root.exists():
        raise CLIError(f"{root}: no such file or folder")
    problems: list[str] = []
    digests: dict[str, Digest] = {}
    if root.is_file():
        tables = _read_file(root)
    else:
        tables, problems, digests = _read_folder(root, stream)
    if stream:
        from bnprobe.diagnosis.digest import Digest

        for name, table in tables.items():
            if name not in digests:
                digests[name] = Digest()
                digests[name].add(table)
        tables = {name: d.table() for name, d in digests.items()}
    if run is not None:
        if run not in tables:
            raise CLIError(
                f"{root}: no run {run!r}; the runs here are: {', '.join(map(repr, tables))}"
            )
        tables = {run: tables[run]}
        digests = {run: digests[run]} if run in digests else {}
    return Runs(tables, problems, digests)


def _read_file(path: Path) -> dict[str, pd.DataFrame]:
    from bnprobe.store import StoreError, load_runs

    if path.name.startswith("events.out.tfevents."):
        raise CLIError(
            f"{path} is a TensorBoard event file, not a run. RUN is {RUN_HELP}; for the event "
            f"files pass their folder: {path.parent}"
        )
    try:
        return load_runs(path)
    except StoreError as err:
        raise DataError(str(err)) from None
    except ValueError:
        kind = "a CSV file" if path.suffix.lower() == ".csv" else "not a parquet file"
        raise CLIError(f"{path} is {kind}, not a run. RUN is {RUN_HELP}") from None
    except Exception as err:
        raise DataError(f"{path} could not be read: {type(err).__name__}: {err}") from None


def _read_folder(
    root: Path, stream: bool = False
) -> tuple[dict[str, pd.DataFrame], list[str], dict[str, Digest]]:
    """The runs of a folder: tables (of event-file runs, and of stores unless ``stream``),
    problems, and with ``stream`` a digest per store run."""
    from bnprobe.diagnosis.stream import digest_runs
    from bnprobe.store import StoreError, load_runs
    from bnprobe.tensorboard import read_runs

    problems: list[str] = []
    tables: dict[str, pd.DataFrame] = {}
    digests: dict[str, Digest] = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if stream:
                    digests = digest_runs(root)[0]
                else:
                    tables = load_runs(root)
            except FileNotFoundError:
                pass
            except StoreError as err:
                problems.append(str(err))
        problems += [str(w.message) for w in caught if str(w.message).startswith("bnprobe")]
        store_runs = list(tables) + list(digests)  # unreadable stores fall back to events
        event_runs = sorted(
            {p.parent.relative_to(root).as_posix() for p in root.rglob("events.out.tfevents.*")}
        )
        uncovered = [r for r in event_runs if not _covered(r, store_runs)]
        if uncovered:
            try:
                from_events = read_runs(root)
            except FileNotFoundError:
                from_events = {}
            tables.update({r: t for r, t in from_events.items() if r in uncovered})
    except Exception as err:  # anything else that stops reading: data, not a finding
        raise DataError(f"{root} could not be read: {type(err).__name__}: {err}") from None
    if not tables and not digests:
        if problems:
            raise DataError(problems[-1])
        raise CLIError(
            f"{root}: no bnprobe data here (neither a parquet store nor TensorBoard event files "
            f"with bnprobe tags). RUN is {RUN_HELP}."
        )
    names = sorted([*tables, *digests])
    return dict(sorted(tables.items())), problems, {n: digests[n] for n in names if n in digests}


def _covered(event_run: str, store_runs: list[str]) -> bool:
    """Whether a folder of event files is a run that has a store (at it or below it)."""
    return any(event_run in (s, ".") or s.startswith(f"{event_run}/") for s in store_runs)


def _warn(command: str, problems: list[str]) -> None:
    for problem in problems:
        print(f"bnprobe {command}: warning: {problem}", file=sys.stderr)


def _emit(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) is not an error."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _demo(args: argparse.Namespace) -> int:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from bnprobe import pathologies
    from bnprobe.callback import BNProbe
    from bnprobe.demo import DemoDataModule, DemoModule

    if args.list:
        for entry in pathologies.PATHOLOGIES.values():
            print(f"{entry.name:20s} {entry.description}")
            print(f"{'':20s} expect: {entry.finding}")
        return 0
    pathology = None
    if args.pathology is not None:
        try:
            pathology = pathologies.get(args.pathology)
        except ValueError as err:
            raise CLIError(str(err)) from None
    pl.seed_everything(args.seed, verbose=False)
    module = DemoModule()
    data = DemoDataModule(
        batch_size=args.batch_size, num_train=args.num_train, num_val=args.num_val, seed=args.seed
    )
    if pathology is not None:
        pathology.induce(module, data)
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
    train = df[df["stage"] == "train"]
    lines = [
        "",
        f"bnprobe measured {_plural(len(probe.layer_names), 'BatchNorm layer')} at "
        f"{_plural(train['step'].nunique(), 'training step')} and "
        f"{_plural(df['step'].nunique(), 'step')} in all: {_plural(len(df), 'row')}.",
    ]
    run = Path(logger.log_dir).resolve()
    lines.append(f"  run folder:   {run}")
    if probe.store_dir is not None:
        lines.append(f"  parquet:      {probe.store_dir.resolve()}")
    lines.append(f"  TensorBoard:  tensorboard --logdir {Path(args.out).resolve()}")
    lines.append(f"  report:       bnprobe report {run}")
    if pathology is not None:
        lines.append(f"  look for:     {pathology.finding}")
    lines += ["", probe.report()]
    _emit("\n".join(lines))
    return 0


def _report(args: argparse.Namespace) -> int:
    from bnprobe.diagnosis import exit_code, format_report
    from bnprobe.diagnosis.digest import diagnose_digests

    runs = read_run(args.run, args.run_name, stream=True)  # bounded memory, any run length
    df = runs.table()
    if df.empty:
        raise CLIError(f"{args.run}: the run holds no bnprobe rows yet")
    single = len(runs.tables) == 1
    digests = {None if single else name: d for name, d in runs.digests.items() if len(d.table())}
    findings = diagnose_digests(digests)  # each run on its own
    code = exit_code(findings, args.fail_on)
    steps = {name: d.steps() for name, d in digests.items()}
    text = format_report(df, findings, fmt=args.format, steps=steps)
    _warn("report", runs.problems)
    _emit(text)
    if runs.problems and code == EXIT_OK:
        return EXIT_DATA
    return code


def _export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix not in (".parquet", ".csv"):
        raise CLIError(f"{out}: the output must end in .parquet or .csv")
    runs = read_run(args.run, args.run_name)
    df = runs.table()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".csv":
            df.to_csv(out, index=False)
        else:
            df.to_parquet(out, index=False)
    except OSError as err:
        raise CLIError(f"{out}: cannot write it ({err.strerror or err})") from None
    _warn("export", runs.problems)
    what = f" of {_plural(len(runs.tables), 'run')}" if len(runs.tables) > 1 else ""
    _emit(f"wrote {_plural(len(df), 'row')}{what} to {out}")
    return EXIT_DATA if runs.problems else EXIT_OK


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
    demo.add_argument("--epochs", type=_count(0), default=2, help="training epochs (default 2)")
    demo.add_argument(
        "--num-train", "--train-size", dest="num_train", type=_count(1), default=3072,
        help="training images (DemoDataModule(num_train=...); default 3072)",
    )  # fmt: skip
    demo.add_argument(
        "--num-val", "--val-size", dest="num_val", type=_count(1), default=512,
        help="validation images (DemoDataModule(num_val=...); default 512)",
    )  # fmt: skip
    demo.add_argument(
        "--batch-size", type=_count(1), default=64, help="images per batch (default 64)"
    )
    demo.add_argument(
        "--every-n-steps", type=_count(1), default=5, help="measure every n steps (default 5)"
    )
    demo.add_argument("--out", default="bnprobe_demo", help="log folder (default bnprobe_demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    report = sub.add_parser(
        "report", help="findings and a summary of each saved run", epilog=EPILOG
    )
    report.add_argument("run", metavar="RUN", help=RUN_HELP)
    report.add_argument(
        "--run", dest="run_name", metavar="NAME", help="report only this run of a folder of runs"
    )
    report.add_argument(
        "--fail-on",
        choices=("warning", "error"),
        default=None,
        help="exit with 1 when some run has a finding of this severity or worse",
    )
    report.add_argument("--format", choices=("text", "json"), default="text")
    report.set_defaults(func=_report)

    export = sub.add_parser(
        "export", help="write the table of a run (or runs) to .parquet or .csv", epilog=EPILOG
    )
    export.add_argument("run", metavar="RUN", help=RUN_HELP)
    export.add_argument("-o", "--output", required=True, help="output file, .parquet or .csv")
    export.add_argument(
        "--run", dest="run_name", metavar="NAME", help="export only this run of a folder of runs"
    )
    export.set_defaults(func=_export)
    return parser


EPILOG = (
    "exit codes: 0 no finding at the --fail-on level, 1 findings at that level, 2 usage errors "
    "and missing paths, 3 data that could not be read"
)


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``least``, refused with a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CLIError as err:
        print(f"bnprobe {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except BrokenPipeError:  # the reader of stdout went away: nothing more to say
        _drop_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"bnprobe {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
