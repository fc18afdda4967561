"""Compare registered versions: a table of key metrics with deltas against the champion, and a chart.

The chart has two panels: per-category MT-Bench scores of the versions side by side, and AlpacaEval win
rates (raw and length-controlled) per version. Versions the head-to-head gate has judged also carry their
recorded differences against the champion they faced, with intervals (`h2h <metric>`, `... low`,
`... high` columns), drawn in a second chart (`<name>-gate.png`). `log_comparison` stores the charts and
the table in a `compare` run of the experiment, so the comparison is also found in MLflow.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from orpo.config import PipelineConfig

if TYPE_CHECKING:
    import pandas

log = logging.getLogger(__name__)

KEY_METRICS = (
    "mt_bench/score",
    "alpaca_eval2/win_rate",
    "alpaca_eval2/length_controlled_winrate",
    "preference/accuracy",
    "preference/margin",
)
# Judge-based metrics carry their protocol in the name's prefix (evals.protocols): `alpaca_eval2/win_rate`
# on the leaderboard's protocol, `alpaca_local_judge/win_rate` with a local judge, and so on. A table shows
# each protocol's numbers in their own column, never one protocol's number as another's.
_JUDGE_METRIC = re.compile(
    r"^(?:alpaca[a-z0-9_]*/(?:win_rate|length_controlled_winrate|lc_minimal_glm_winrate)|mt_bench[a-z0-9_]*/score)$"
)
_MT_BENCH_CATEGORY = re.compile(r"^mt_bench[a-z0-9_]*/category/")
_WIN_RATE = re.compile(r"^alpaca[a-z0-9_]*/")


def key_metrics(metric_names) -> list[str]:
    """The key metrics to tabulate for versions that logged `metric_names`: the official names first, then
    every other protocol's judge-based numbers under their own names."""
    names = set(metric_names)
    others = sorted(n for n in names if _JUDGE_METRIC.match(n) and n not in KEY_METRICS)
    return [*KEY_METRICS, *others]


def win_rate_metrics(frame: pandas.DataFrame) -> list[str]:
    return [c for c in frame.columns if _WIN_RATE.match(c) and _JUDGE_METRIC.match(c)]
DELTA_PREFIX = "delta "
_LINEAGE_TAGS = ("finetune", "base_model", "data_fingerprint", "config_hash", "git_commit", "gate.decision",
                 "gate.champion_version")
H2H_PREFIX = "h2h "


def gate_columns(tags: dict[str, str]) -> dict[str, float]:
    """The head-to-head differences a version's gate decision recorded (empty for threshold decisions)."""
    import json

    from orpo.gate import TAG_COMPARED, TAG_MODE

    if tags.get(TAG_MODE) != "head_to_head" or not tags.get(TAG_COMPARED):
        return {}
    try:
        compared = json.loads(tags[TAG_COMPARED])
    except json.JSONDecodeError:
        return {}
    columns = {}
    for metric, entry in compared.items():
        if isinstance(entry, dict) and "estimate" in entry:
            columns[H2H_PREFIX + metric] = float(entry["estimate"])
            columns[f"{H2H_PREFIX}{metric} low"] = float(entry["low"])
            columns[f"{H2H_PREFIX}{metric} high"] = float(entry["high"])
            columns[f"{H2H_PREFIX}{metric} n"] = float(entry["n"])
    return columns


def gate_png_path(out_png: str | Path) -> Path:
    out_png = Path(out_png)
    return out_png.with_name(f"{out_png.stem}-gate{out_png.suffix}")


def _version_order(version: str) -> int:
    return int(version) if str(version).isdigit() else 0


def compare_versions(
    config: PipelineConfig, versions: list[str] | None = None, out_png: str | Path | None = None
) -> pandas.DataFrame:
    """One row per version (all versions when `versions` is None), indexed by version number.

    Columns: `aliases`, lineage tags, every key metric, `delta <metric>` against the current champion
    (NaN when there is no champion or a side lacks the metric), every `mt_bench/category/*` score, and the
    recorded head-to-head gate differences (`gate_columns`). Writes the charts to `out_png` when given.
    """
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from orpo.registry import ALIAS_CHAMPION, configure_mlflow, mlflow_client, version_metrics

    configure_mlflow(config)
    client = mlflow_client()
    name = config.registry.registered_model_name
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise ValueError(f"registered model {name!r} not found in {config.resolved_tracking_uri()}") from exc
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    if versions is None:
        versions = sorted({str(v.version) for v in client.search_model_versions(f"name = '{name}'")},
                          key=_version_order)
    rows = []
    seen_metrics: set[str] = set()
    for version in versions:
        try:
            model_version = client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise ValueError(f"{name} has no version {version!r}") from exc
        metrics = version_metrics(client, name, str(version))
        row: dict[str, object] = {"version": str(version), "aliases": ",".join(sorted(aliases.get(str(version), [])))}
        row["run_id"] = model_version.run_id
        for tag in _LINEAGE_TAGS:
            row[tag] = model_version.tags.get(tag, "")
        seen_metrics.update(metrics)
        for metric, value in metrics.items():
            if _JUDGE_METRIC.match(metric) or _MT_BENCH_CATEGORY.match(metric):
                row[metric] = value
        for metric in KEY_METRICS:
            row[metric] = metrics.get(metric, math.nan)
        row.update(gate_columns(dict(model_version.tags)))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.set_index("version")
    champion = next((v for v, names in aliases.items() if ALIAS_CHAMPION in names), None)
    champion_metrics = version_metrics(client, name, champion) if champion else {}
    frame.attrs["key_metrics"] = key_metrics(seen_metrics)
    for metric in frame.attrs["key_metrics"]:
        reference = champion_metrics.get(metric, math.nan)
        frame[DELTA_PREFIX + metric] = frame[metric] - reference
    if out_png is not None:
        plot_comparison(frame, out_png, title=f"{name}: versions {', '.join(frame.index)}")
    return frame


def plot_comparison(frame: pandas.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """Per-category MT-Bench scores side by side, and win rates, per version (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"v{v}" + (f" ({frame.loc[v, 'aliases']})" if frame.loc[v, "aliases"] else "") for v in frame.index]
    categories = sorted(c for c in frame.columns if _MT_BENCH_CATEGORY.match(c))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1.4]})

    if categories:
        x = np.arange(len(categories))
        width = 0.8 / len(frame)
        for i, version in enumerate(frame.index):
            values = [frame.loc[version, c] for c in categories]
            left.bar(x + (i - (len(frame) - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width, label=labels[i])
        left.set_xticks(x, [c.replace("/category/", ": ").removeprefix("mt_bench: ") for c in categories], rotation=30, ha="right")
        left.set_ylim(0, 10)
        left.set_ylabel("score (1-10)")
        left.legend(fontsize="small")
    else:
        left.text(0.5, 0.5, "no MT-Bench category scores", ha="center", va="center", transform=left.transAxes)
    left.set_title("MT-Bench by category")

    present = [m for m in win_rate_metrics(frame) if frame[m].notna().any()]
    if present:
        x = np.arange(len(frame))
        width = 0.8 / len(present)
        for i, metric in enumerate(present):
            values = frame[metric].to_numpy(dtype=float)
            bars = right.bar(x + (i - (len(present) - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width,
                             label=metric)
            right.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in values], fontsize="small")
        right.set_xticks(x, labels, rotation=30, ha="right")
        right.set_ylabel("win rate (%)")
        right.legend(fontsize="small")
    else:
        right.text(0.5, 0.5, "no AlpacaEval win rates", ha="center", va="center", transform=right.transAxes)
    right.set_title("AlpacaEval")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    plot_gate_intervals(frame, gate_png_path(out_png), title)
    return out_png


def plot_gate_intervals(frame: pandas.DataFrame, out_png: str | Path, title: str = "") -> Path | None:
    """Each judged version's head-to-head differences with their intervals; None when no version has any."""
    from orpo.gate_plots import decisions_chart

    metrics = sorted({c[len(H2H_PREFIX):] for c in frame.columns
                      if c.startswith(H2H_PREFIX) and not c.endswith((" low", " high", " n"))})
    decisions: dict[str, dict[str, dict]] = {}
    for version in frame.index:
        entries = {}
        for metric in metrics:
            estimate = frame.loc[version, H2H_PREFIX + metric]
            if not math.isnan(estimate):
                entries[metric] = {"estimate": estimate, "low": frame.loc[version, f"{H2H_PREFIX}{metric} low"],
                                   "high": frame.loc[version, f"{H2H_PREFIX}{metric} high"]}
        if entries:
            against = frame.loc[version, "gate.champion_version"] if "gate.champion_version" in frame else ""
            # A first version is gated against its start model: no champion version ("none").
            decisions[f"v{version} vs " + (f"v{against}" if against not in ("", "none") else "start model")] = entries
    if not decisions:
        Path(out_png).unlink(missing_ok=True)  # never leave an older comparison's chart to be logged with this one
        return None
    return decisions_chart(decisions, out_png, f"{title}: gate differences (challenger vs champion)".lstrip(": "))


def log_comparison(config: PipelineConfig, frame: pandas.DataFrame, png: str | Path | None) -> str:
    """Store the chart and the table in a `compare` run of the experiment; returns the run id."""
    import tempfile

    import mlflow

    from orpo.registry import configure_mlflow

    configure_mlflow(config)
    versions = list(frame.index)
    run_name = "compare-" + "-".join(f"v{v}" for v in versions)
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({
            "orpo.kind": "compare",
            "registered_model": config.registry.registered_model_name,
            "versions": ",".join(versions),
        })
        if png is not None:
            mlflow.log_artifact(str(png), "compare")
            if gate_png_path(png).is_file():
                mlflow.log_artifact(str(gate_png_path(png)), "compare")
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "compare.csv"
            frame.to_csv(table)
            mlflow.log_artifact(str(table), "compare")
    return run.info.run_id


def default_png_path(config: PipelineConfig, versions: list[str]) -> Path:
    slug = re.sub(r"[^0-9a-z-]+", "-", "-".join(f"v{v}" for v in versions).lower())[:80] or "all"
    return Path(config.workdir) / "compare" / f"{config.registry.registered_model_name}-{slug}.png"
