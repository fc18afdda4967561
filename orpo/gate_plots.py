"""Charts of gated metrics with their confidence intervals.

- `summary_chart`: top row, each gated metric (AlpacaEval win rate against its reference, MT-Bench score,
  held-out preference accuracy) for the start model, the champion and the challenger, each with its
  interval; bottom row, the head-to-head differences (challenger vs champion) with theirs, the
  no-difference line and the promotion margin. An evaluation alone draws the top row (the start model and
  the evaluated model); the gate draws both rows.
- `decisions_chart`: the recorded gate differences of several versions side by side (`orpo compare`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from orpo.head_to_head import (
    ALPACA_WIN_RATE,
    HEAD_TO_HEAD_METRICS,
    METRIC_INFO,
    MT_BENCH_SCORE,
    PREFERENCE_ACCURACY,
    model_estimates,
    read_evaluation,
)
from orpo.stats import Interval

MODEL_PANELS = (
    (ALPACA_WIN_RATE, "AlpacaEval win rate vs reference (%)"),
    (MT_BENCH_SCORE, "MT-Bench score (1-10)"),
    (PREFERENCE_ACCURACY, "held-out preference accuracy"),
)
_COLORS = ("#8C8C8C", "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _interval_panel(ax, labels: Sequence[str], points: Sequence[tuple[float, float, float] | None], title: str,
                    *, null: float | None = None, margin: float | None = None, notes: Sequence[str] = (),
                    first_color: int = 0) -> None:
    """Points with asymmetric error bars at x = 0..k-1; a missing point is written as 'n/a'."""
    for x, point in enumerate(points):
        color = _COLORS[(first_color + x) % len(_COLORS)]
        if point is None:
            ax.text(x, 0.5, "n/a", ha="center", va="center", transform=ax.get_xaxis_transform(), color=color)
            continue
        estimate, low, high = point
        ax.errorbar([x], [estimate], yerr=[[max(estimate - low, 0.0)], [max(high - estimate, 0.0)]], fmt="o",
                    capsize=8, markersize=7, color=color, elinewidth=2)
        ax.annotate(f"{estimate:.3g}\n[{low:.3g}, {high:.3g}]", (x, high), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize="x-small")
    if null is not None:
        same = margin is not None and math.isclose(margin, null)
        ax.axhline(null, color="black", linestyle="--", linewidth=1,
                   label="no difference = promotion margin" if same else "no difference")
    if margin is not None and (null is None or not math.isclose(margin, null)):
        ax.axhline(margin, color="#C44E52", linestyle=":", linewidth=1.5, label="promotion margin")
    if null is not None or margin is not None:
        ax.legend(fontsize="x-small", loc="lower right")
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize="small")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.margins(y=0.25)
    ax.set_title(title, fontsize="medium")
    if notes:
        ax.set_xlabel("\n".join(notes), fontsize="x-small")
    ax.grid(axis="y", alpha=0.3)


def _triple(interval: Interval | dict | None) -> tuple[float, float, float] | None:
    if interval is None:
        return None
    if isinstance(interval, dict):
        return (interval["estimate"], interval["low"], interval["high"]) if "estimate" in interval else None
    return interval.estimate, interval.low, interval.high


def summary_chart(models: dict[str, dict[str, Interval]], compared: dict[str, dict] | None, path: str | Path,
                  title: str = "") -> Path:
    """Gated metrics per model with intervals, and (when `compared` holds any) the head-to-head differences.

    `models`: label -> metric -> Interval (start model, champion, challenger, in that order).
    `compared`: the gate's per-metric entries (`GateDecision.compared` in head_to_head mode).
    """
    plt = _pyplot()
    differences = {m: e for m, e in (compared or {}).items() if "estimate" in e}
    columns = max(len(MODEL_PANELS), len(differences))
    rows = 2 if differences else 1
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 4.0 * rows), squeeze=False)
    labels = list(models)
    for ax, (metric, panel_title) in zip(axes[0], MODEL_PANELS):
        points = [_triple(models[label].get(metric)) for label in labels]
        found = [models[label][metric] for label in labels if metric in models[label]]
        notes = [f"{found[0].confidence:.0%} intervals: {found[0].test}"] if found else []
        _interval_panel(ax, labels, points, panel_title, notes=notes)
    for ax in axes[0][len(MODEL_PANELS):]:
        ax.axis("off")
    if differences:
        for ax, (metric, entry) in zip(axes[1], differences.items()):
            seed = f", seed {entry['seed']}" if entry.get("seed") is not None else ""
            notes = [f"n={entry['n']}, {entry['test']}{seed}", entry.get("verdict", "")]
            _interval_panel(ax, ["challenger - champion" if metric != HEAD_TO_HEAD_METRICS[0] else "challenger wins"],
                            [_triple(entry)], f"{entry['label']} ({entry.get('role', '')})".replace(" ()", ""),
                            null=entry["null"], margin=entry.get("margin"), notes=notes, first_color=4)
        for ax in axes[1][len(differences):]:
            ax.axis("off")
    return _save(plt, fig, path, title)


def evaluation_summary_chart(report_dir: str | Path, label: str, *, seed: int = 0,
                             confidence: float = 0.95) -> Path | None:
    """The evaluation report's summary.png: the start model and the evaluated model, with intervals.

    None when the directory holds no per-item data for any gated metric.
    """
    files = read_evaluation(report_dir)
    models = {
        "start model": model_estimates(files, start_model=True, seed=seed, confidence=confidence),
        label: model_estimates(files, seed=seed, confidence=confidence),
    }
    if not any(models.values()):
        return None
    return summary_chart(models, None, Path(report_dir) / "summary.png", title=f"{label}: gated metrics")


def decisions_chart(decisions: dict[str, dict[str, dict]], path: str | Path, title: str = "") -> Path:
    """One panel per head-to-head metric: each version's recorded difference against its champion."""
    plt = _pyplot()
    metrics = [m for m in HEAD_TO_HEAD_METRICS if any("estimate" in c.get(m, {}) for c in decisions.values())]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.6 * max(len(metrics), 1), 4.0), squeeze=False)
    labels = list(decisions)
    for ax, metric in zip(axes[0], metrics):
        entries = [decisions[label].get(metric, {}) for label in labels]
        margins = {e.get("margin") for e in entries if e.get("margin") is not None}
        _interval_panel(ax, labels, [_triple(e) for e in entries], METRIC_INFO[metric]["label"],
                        null=METRIC_INFO[metric]["null"], margin=margins.pop() if len(margins) == 1 else None)
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no head-to-head decisions recorded", ha="center", va="center")
        axes[0][0].axis("off")
    return _save(plt, fig, path, title)
