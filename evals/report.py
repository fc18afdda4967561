"""The evaluation report of one model: report.json (everything), report.md (for people), PNG charts.

The summary chart (gated metrics with confidence intervals) is drawn by `orpo.gate_plots`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.protocols import describe_metric


@dataclass
class Report:
    """What one evaluation found. `metrics` is flat (the MLflow metrics); `sections` holds details."""

    model: str
    metrics: dict[str, float]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    charts: list[Path] = field(default_factory=list)
    protocols: dict[str, str] = field(default_factory=dict)  # metric prefix -> protocol description


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, paths strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def render_markdown(report: Report) -> str:
    lines = [f"# Evaluation of `{report.model}`", ""]
    if report.notes:
        lines += [*(f"- {note}" for note in report.notes), ""]
    lines += ["## Headline metrics", "", "| metric | value | protocol |", "|---|---|---|"]
    lines += [
        f"| {name} | {_fmt(value)} | {report.protocols.get(name.split('/', 1)[0]) or describe_metric(name)} |"
        for name, value in sorted(report.metrics.items())
    ]
    for name, section in report.sections.items():
        lines += ["", f"## {name}", ""]
        scalars = {k: v for k, v in section.items() if not isinstance(v, (dict, list))}
        if scalars:
            lines += ["| field | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
        for key, value in section.items():
            if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
                lines += ["", f"**{key}**", "", "| key | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in value.items()]
    if report.charts:
        lines += ["", "## Charts", ""]
        lines += [f"![{chart.stem}]({chart.name})" for chart in report.charts]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.md into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    payload = {
        "model": report.model,
        "metrics": report.metrics,
        "sections": report.sections,
        "notes": report.notes,
        "protocols": report.protocols,
        "charts": [c.name for c in report.charts],
    }
    json_path.write_text(json.dumps(_clean(payload), indent=2, ensure_ascii=False), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path
