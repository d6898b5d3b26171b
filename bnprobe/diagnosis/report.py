"""The readable report: per run, what was watched and its latest key metrics, then the findings
by severity; or the same as a JSON document."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bnprobe import store
from bnprobe.diagnosis.engine import diagnose
from bnprobe.diagnosis.findings import SEVERITIES, Finding
from bnprobe.diagnosis.table import check_table, layer_order, runs
from bnprobe.diagnosis.thresholds import Thresholds

REPORT_VERSION = 2
"""``version`` of the JSON document :func:`format_report` writes (2: findings carry ``run``
when the table held several runs; each run summary has its own ``counts``)."""

SUMMARY_METRICS: dict[str, tuple[str, ...]] = {
    "train": ("mean_shift", "var_shift", "gamma_drift", "samples_per_channel"),
    "val": ("mean_shift", "var_shift"),
    "probe": ("local_gap",),
}
"""The latest values shown per layer and stage in :func:`format_report`."""

SUMMARY_MODEL_METRICS: tuple[str, ...] = ("logits_gap", "pred_agreement", "recal_pred_change")
"""The whole-model probe metrics shown per run (bnprobe.metrics has every metric)."""


def format_report(
    df: pd.DataFrame,
    findings: Sequence[Finding] | None = None,
    *,
    fmt: str = "text",
    thresholds: Thresholds | None = None,
    steps: Mapping[str | None, dict[str, dict[str, int | None]]] | None = None,
) -> str:
    """A readable report: per run, what was watched and the latest key metrics per layer, then
    that run's findings by severity.

    ``findings`` default to ``diagnose(df, thresholds=thresholds)``. ``fmt="json"`` gives a
    JSON document with the keys ``version``, ``counts`` (per severity, all runs), ``runs`` (one
    summary per run: ``run``, ``steps``, ``layers``, ``model``, ``counts``) and ``findings``
    (:meth:`Finding.to_dict`, with ``run`` when the table held several runs).

    ``steps`` (per run name, None for a table without a ``run`` column) replaces the measured
    steps counted in the table (:func:`stage_steps`): the streaming report passes the exact counts
    of a :class:`~bnprobe.diagnosis.digest.Digest`, whose table keeps only part of a long run.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"fmt must be 'text' or 'json'; got {fmt!r}")
    check_table(df)
    found = list(diagnose(df, thresholds=thresholds) if findings is None else findings)
    summaries = [_summary(part, name) for name, part in runs(df)]
    if not summaries:
        summaries = [_summary(df, None)]
    for s in summaries:
        if steps is not None and s["run"] in steps:
            s["steps"] = {stage: dict(v) for stage, v in steps[s["run"]].items()}
    single = len(summaries) == 1
    per_run: list[list[Finding]] = [
        [f for f in found if single or f.run == s["run"]] for s in summaries
    ]
    for s, fs in zip(summaries, per_run, strict=True):
        s["counts"] = _counts(fs)
    counts = _counts(found)
    if fmt == "json":
        doc = {
            "version": REPORT_VERSION,
            "counts": counts,
            "runs": summaries,
            "findings": [_jsonable(f.to_dict()) for f in found],
        }
        return json.dumps(_jsonable(doc), indent=2, allow_nan=False)
    sections = [
        _summary_text(s) + "\n\n" + _findings_text(fs, s)
        for s, fs in zip(summaries, per_run, strict=True)
    ]
    if single:
        return sections[0]
    names = {s["run"] for s in summaries}
    stray = [f for f in found if f.run not in names]
    if stray:  # findings given by the caller without the run they belong to
        sections.append("Findings not tied to one of these runs\n\n" + _findings_text(stray, {}))
    overall = (
        f"{len(summaries)} runs, judged each on its own. Findings over all runs: "
        + _count_text(counts)
        + "."
    )
    rule = "\n\n" + "=" * 100 + "\n\n"
    return overall + rule + rule.join(sections)


def _counts(findings: Sequence[Finding]) -> dict[str, int]:
    return {s: sum(f.severity == s for f in findings) for s in SEVERITIES}


def _count_text(counts: dict[str, int]) -> str:
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    return ", ".join(f"{counts[s]} {plural[s] if counts[s] != 1 else s}" for s in SEVERITIES)


def stage_steps(df: pd.DataFrame) -> dict[str, dict[str, int | None]]:
    """Per stage, over the layer aggregates of the lowest rank: the ``count`` of measured steps,
    the ``first`` and the ``last``."""
    base = df[df["rank"] == df["rank"].min()] if len(df) else df
    agg = base[base["channel"].isna()]
    steps: dict[str, dict[str, int | None]] = {}
    for stage in ("train", "val", "probe"):
        rows = agg.loc[agg["stage"] == stage, "step"]
        steps[stage] = {
            "count": int(rows.nunique()),
            "first": int(rows.min()) if len(rows) else None,
            "last": int(rows.max()) if len(rows) else None,
        }
    return steps


def _summary(df: pd.DataFrame, run: str | None) -> dict[str, Any]:
    """Latest key metrics per layer and stage (lowest rank), and the model-level probe."""
    base = df[df["rank"] == df["rank"].min()] if len(df) else df
    agg = base[base["channel"].isna()]
    steps: dict[str, Any] = stage_steps(df)
    latest: dict[str, pd.DataFrame] = {}
    for stage in ("train", "val", "probe"):
        rows = agg[agg["stage"] == stage]
        latest[stage] = rows.sort_values("step", kind="stable").drop_duplicates(
            ["layer", "metric"], keep="last"
        )
    layers = []
    for layer in layer_order(agg):
        if layer == store.MODEL:
            continue
        entry: dict[str, Any] = {"layer": layer}
        for stage, metrics in SUMMARY_METRICS.items():
            rows = latest[stage]
            rows = rows[rows["layer"] == layer]
            values: dict[str, Any] = {"step": int(rows["step"].max()) if len(rows) else None}
            for m in metrics:
                hit = rows.loc[rows["metric"] == m, "value"]
                values[m] = float(hit.iloc[0]) if len(hit) else None
            entry[stage] = values
        layers.append(entry)
    probe = latest["probe"]
    model_rows = probe[probe["layer"] == store.MODEL]
    model: dict[str, Any] = {"step": int(model_rows["step"].max()) if len(model_rows) else None}
    for m in SUMMARY_MODEL_METRICS:
        hit = model_rows.loc[model_rows["metric"] == m, "value"]
        model[m] = float(hit.iloc[0]) if len(hit) else None
    return {"run": run, "steps": steps, "layers": layers, "model": model}


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _watched(s: dict[str, Any]) -> str:
    """What was watched and for how long, in words."""
    st = s["steps"]
    facts = [_plural(len(s["layers"]), "BatchNorm layer")]
    if st["train"]["count"]:
        facts.append(
            f"training steps {st['train']['first']}..{st['train']['last']} "
            f"({st['train']['count']} measured)"
        )
    if st["val"]["count"]:
        facts.append(_plural(st["val"]["count"], "validation epoch"))
    if st["probe"]["count"]:
        facts.append(_plural(st["probe"]["count"], "train/eval probe"))
    return ", ".join(facts)


def _measured(s: dict[str, Any]) -> bool:
    return bool(s["layers"]) and any(s["steps"][st]["count"] for st in ("train", "val", "probe"))


def _summary_text(s: dict[str, Any]) -> str:
    title = "bnprobe report" + (f" - run {s['run']}" if s["run"] is not None else "")
    st = s["steps"]
    layers: list[dict[str, Any]] = s["layers"]
    if not layers:
        return f"{title}\nno BatchNorm measurements in this table (no layer watched)"
    lines = [title, _watched(s)]
    if not _measured(s):
        lines.append("no training step, validation epoch or train/eval probe was measured")
        return "\n".join(lines)
    groups: list[tuple[str, list[str]]] = []
    for stage, metrics in SUMMARY_METRICS.items():
        if st[stage]["count"]:
            groups.append(
                (stage, ["samples" if m == "samples_per_channel" else m for m in metrics])
            )
    body: list[list[str]] = []
    for entry in layers:
        row = [str(entry["layer"])]
        for stage, metrics in SUMMARY_METRICS.items():
            if st[stage]["count"]:
                row += [_fmt(entry[stage][m]) for m in metrics]
        body.append(row)
    names = ["layer"] + [m for _, ms in groups for m in ms]
    widths = [max(len(r[i]) for r in [names, *body]) for i in range(len(names))]
    top = [" " * widths[0]]
    col = 1
    for stage, ms in groups:
        span = sum(widths[col : col + len(ms)]) + 2 * (len(ms) - 1)
        top.append(f" {stage} ".center(span, "-"))
        col += len(ms)
    lines.append("")
    lines.append("latest values (channel means; shifts in running std, gaps relative):")
    lines.append("  " + "  ".join(top).rstrip())
    for r in [names, *body]:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells).rstrip())
    model = s["model"]
    if model["step"] is not None:
        line = (
            f"model at the latest probe (step {model['step']}): "
            f"logits_gap {_fmt(model['logits_gap'])}, "
            f"pred_agreement {_fmt(model['pred_agreement'])}"
        )
        if model["recal_pred_change"] is not None:
            line += f", recal_pred_change {_fmt(model['recal_pred_change'])}"
        lines.append(line)
    return "\n".join(lines)


def _findings_text(findings: Sequence[Finding], s: dict[str, Any]) -> str:
    counts = _counts(findings)
    if not findings:
        if not s.get("layers"):
            return "No findings: there was no BatchNorm layer to judge."
        if not _measured(s):
            return "No findings: nothing was measured yet, so nothing could be judged."
        n = len(s["layers"])
        looks = "looks" if n == 1 else "look"
        layers = _plural(n, "watched BatchNorm layer")
        return f"No findings: the {layers} {looks} healthy ({_watched(s)})."
    blocks = ["Findings: " + _count_text(counts)]
    if not counts["error"] and not counts["warning"]:
        blocks.append("No warnings or errors.")
    for severity in SEVERITIES:
        group = [f for f in findings if f.severity == severity]
        if group:
            blocks.append("\n\n".join(str(f) for f in group))
    return "\n\n".join(blocks)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "n/a" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x)}"
    return f"{x:.3g}"


def _jsonable(x: Any) -> Any:
    """Replace NaN and inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
