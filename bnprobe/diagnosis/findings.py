"""What a finding is: its kind, its severity and the :class:`Finding` record itself."""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    """How bad a finding is. A plain string too: ``Severity.WARNING == "warning"``."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        """0 for the most severe."""
        return list(Severity).index(self)


class Kind(StrEnum):
    """What a finding is about; each kind has a section of docs/diagnosis.md."""

    STALE_RUNNING_STATS = "stale_running_stats"
    TRAIN_EVAL_GAP = "train_eval_gap"
    SMALL_BATCH = "small_batch"
    DEAD_CHANNELS = "dead_channels"
    VARIANCE_COLLAPSE = "variance_collapse"
    SMALL_INPUT_VARIANCE = "small_input_variance"
    NONFINITE = "nonfinite"
    FROZEN_BN = "frozen_bn"
    UNUSED_LAYER = "unused_layer"
    NO_RUNNING_STATS = "no_running_stats"
    SUSPICIOUS_MOMENTUM = "suspicious_momentum"
    BIAS_BEFORE_BN = "bias_before_bn"
    DROPOUT_BEFORE_BN = "dropout_before_bn"
    RANK_DIVERGENCE = "rank_divergence"


SEVERITIES: tuple[str, ...] = tuple(s.value for s in Severity)
"""Most severe first (plain strings, as before the enums)."""

KINDS: tuple[str, ...] = tuple(k.value for k in Kind)

Evidence = dict[str, float | int | str]


@dataclass(frozen=True)
class Finding:
    """One problem of one layer: what, where, since when, the evidence and what to do.

    ``step`` is the first step the problem was seen (None for facts without a step);
    ``evidence`` holds the measurements of the step where it was worst, by metric name;
    ``run`` names the run (its folder relative to the folder read) when the table held several,
    else None. ``kind`` and ``severity`` are :class:`Kind` and :class:`Severity` members, which
    compare equal to their plain strings; plain strings given here are converted.
    """

    kind: Kind
    severity: Severity
    layer: str
    message: str
    advice: str
    step: int | None
    evidence: Evidence = field(default_factory=dict, hash=False)
    run: str | None = None

    def __post_init__(self) -> None:
        try:
            severity = Severity(self.severity)
        except ValueError:
            raise ValueError(
                f"Finding severity must be one of {', '.join(SEVERITIES)}; got {self.severity!r}"
            ) from None
        try:
            kind = Kind(self.kind)
        except ValueError:
            raise ValueError(
                f"Finding kind must be one of {', '.join(KINDS)}; got {self.kind!r}"
            ) from None
        object.__setattr__(self, "severity", severity)
        object.__setattr__(self, "kind", kind)

    def __str__(self) -> str:
        where = self.layer if self.step is None else f"{self.layer}, step {self.step}"
        if self.run is not None:
            where = f"run {self.run}: {where}"
        head = f"{self.severity.upper()} {self.kind} ({where})"
        body = wrap(self.message, "  ")
        fix = wrap(self.advice, "  Fix: ", "       ")
        return f"{head}\n{body}\n{fix}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the keys kind, severity, layer, step, message, advice,
        evidence, and run when the finding has one."""
        out: dict[str, Any] = {
            "kind": str(self.kind),
            "severity": str(self.severity),
            "layer": self.layer,
            "step": self.step,
            "message": self.message,
            "advice": self.advice,
            "evidence": dict(self.evidence),
        }
        if self.run is not None:
            out["run"] = self.run
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """The inverse of :meth:`to_dict`."""
        step, run = data.get("step"), data.get("run")
        return cls(
            kind=Kind(str(data["kind"])),
            severity=Severity(str(data["severity"])),
            layer=str(data["layer"]),
            message=str(data["message"]),
            advice=str(data["advice"]),
            step=None if step is None else int(step),
            evidence=dict(data.get("evidence", {})),
            run=None if run is None else str(run),
        )


def rank(f: Finding) -> tuple[int, float]:
    """Sort key: most severe first, then earliest."""
    return Severity(f.severity).rank, math.inf if f.step is None else f.step


def dedupe(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, layer): the most severe, then the earliest."""
    best: dict[tuple[str, str], Finding] = {}
    for f in findings:
        key = (f.kind, f.layer)
        old = best.get(key)
        if old is None or rank(f) < rank(old):
            best[key] = f
    return list(best.values())


def sort(findings: list[Finding], order: dict[str, int]) -> list[Finding]:
    """By severity, step, layer (table order) and kind."""

    def key(f: Finding) -> tuple[int, float, int, int]:
        return (*rank(f), order.get(f.layer, len(order)), KINDS.index(f.kind))

    return sorted(findings, key=key)


def wrap(text: str, first: str, rest: str | None = None) -> str:
    """Fill to 100 columns without breaking inside `code`."""
    glued = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\x00"), text)
    filled = textwrap.fill(
        glued,
        width=100,
        initial_indent=first,
        subsequent_indent=rest if rest is not None else first,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return filled.replace("\x00", " ")
