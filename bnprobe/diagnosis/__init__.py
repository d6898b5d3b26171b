"""Findings: BatchNorm problems named in plain words, read from the bnprobe table alone.

:func:`diagnose` takes the tidy table (``BNProbe.to_dataframe()``, :func:`bnprobe.load`,
:func:`bnprobe.read_tensorboard`, :func:`bnprobe.check_mismatch`) and returns one
:class:`Finding` per problem and layer: what is wrong, where, since which step, the evidence,
and what to do. docs/diagnosis.md explains every kind, the warm-up model and the thresholds.

The package, one module per concern:

* ``findings``: :class:`Kind`, :class:`Severity`, :class:`Finding`.
* ``thresholds``: :class:`Thresholds`, every limit, user-settable.
* ``advice``: the advice catalogue and the documentation URL (``DOCS_URL``).
* ``table``: one run's table as the rules read it (wide views, the warm-up residual).
* rule families: ``shifts`` (stale_running_stats, train_eval_gap), ``batches`` (small_batch,
  rank_divergence), ``parameters`` (dead_channels, frozen_bn), ``variance``
  (variance_collapse, small_input_variance, nonfinite), ``structure`` (unused_layer,
  no_running_stats, suspicious_momentum, bias_before_bn, dropout_before_bn).
* ``engine``: :func:`diagnose`, :func:`exit_code`, :func:`worst_values`; ``report``:
  :func:`format_report`.

The package is named ``diagnosis`` so that ``bnprobe.diagnose`` stays the function.
"""

from __future__ import annotations

from bnprobe.diagnosis.advice import ADVICE, DOCS_URL, doc_link
from bnprobe.diagnosis.engine import CALIBRATION, RULES, diagnose, exit_code, worst_values
from bnprobe.diagnosis.findings import KINDS, SEVERITIES, Finding, Kind, Severity
from bnprobe.diagnosis.report import REPORT_VERSION, format_report
from bnprobe.diagnosis.thresholds import (
    DEFAULT_EPS,
    DEFAULT_MOMENTUM,
    DEFAULT_THRESHOLDS,
    Thresholds,
)

__all__ = [
    "ADVICE",
    "CALIBRATION",
    "DEFAULT_EPS",
    "DEFAULT_MOMENTUM",
    "DEFAULT_THRESHOLDS",
    "DOCS_URL",
    "KINDS",
    "REPORT_VERSION",
    "RULES",
    "SEVERITIES",
    "Finding",
    "Kind",
    "Severity",
    "Thresholds",
    "diagnose",
    "doc_link",
    "exit_code",
    "format_report",
    "worst_values",
]
