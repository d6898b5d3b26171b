"""The pathology zoo: induce each BatchNorm problem on the demo net and read what bnprobe says.

    python examples/pathologies.py                    # every pathology, one short run each
    python examples/pathologies.py tf_momentum        # one (or several) by name
    python examples/pathologies.py --list             # the names and what each one does

Every pathology comes from the registry bnprobe.pathologies.PATHOLOGIES (the same one behind
``bnprobe demo --pathology NAME`` and the tests). Each run trains the demo net for a few dozen
steps on synthetic images with BNProbe attached (bnprobe.pathologies.fit), then prints the
findings the registry expects and any other finding. To use one on your own set-up::

    from bnprobe.demo import DemoDataModule, DemoModule
    from bnprobe.pathologies import apply_pathology

    module, data = DemoModule(), DemoDataModule()
    apply_pathology("tf_momentum", module, data)
    trainer.fit(module, data)   # a Trainer with BNProbe in its callbacks

The thresholds these findings cross were calibrated on healthy runs with
tools/calibrate_thresholds.py (in the repository, not in the package).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from bnprobe import diagnose
from bnprobe.pathologies import PATHOLOGIES, fit


def show(name: str) -> None:
    """Train the demo with one pathology and print what bnprobe found."""
    entry = PATHOLOGIES[name]
    print(f"\n=== {name}: {entry.description}")
    for expected in entry.expected:
        print(f"    expect {expected}")
    start = time.perf_counter()
    findings = diagnose(fit(name))
    print(f"    ({time.perf_counter() - start:.0f} s)\n")
    kind = entry.finding.kind
    for f in findings:
        if f.kind == kind:
            print(f, end="\n\n")
    others = [f"{f.severity} {f.kind} on {f.layer}" for f in findings if f.kind != kind]
    if others:
        print("    also: " + "; ".join(others))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="pathologies (default: all)")
    parser.add_argument("--list", action="store_true", help="list the pathologies")
    args = parser.parse_args(argv)
    if args.list:
        for entry in PATHOLOGIES.values():
            print(f"{entry.name:20s} {entry.description}")
        return 0
    unknown = [n for n in args.names if n not in PATHOLOGIES]
    if unknown:
        parser.error(f"unknown pathology {unknown[0]!r}; choose from {', '.join(PATHOLOGIES)}")
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    for name in args.names or PATHOLOGIES:
        show(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
