"""The ablation report: the numbers that answer ORPO's three claims, as Markdown, JSON and small PNGs.

1. SFT alone raises the rejected responses' log-probability too; ORPO pulls chosen and rejected apart:
   held-out mean log-probabilities over training (`eval_logps/chosen`, `eval_logps/rejected` from each arm's
   metrics.jsonl, the trainer's periodic evaluation on the test split), and held-out preference accuracy
   and log-odds margin per arm.
2. One phase without a reference model costs less than SFT followed by DPO: peak memory, wall-clock and
   training time of each arm measured in this run, and the training time each needs to reach the same
   held-out preference accuracy.
3. The price is lower per-input diversity: distinct-2 and self-BLEU of each arm's samples, per input, with
   their spread.

Plus the odds-ratio vs probability-ratio contrast (`odds_ratio_gradients`, `probability_ratio_gradients`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Where the report marks the OR vs PR contrast (the example point).
CONTRAST_POINT = (0.7, 0.4)


@dataclass
class ArmOutcome:
    """Everything the report needs about one trained arm."""

    name: str  # sft, orpo-0.1, sft-dpo
    method: str  # sft, orpo, sft+dpo
    orpo_lambda: float
    seed: int
    train_dir: str
    model_uri: str = ""
    eval_dir: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # evaluation metrics (preference/accuracy, ...)
    resources: dict[str, Any] = field(default_factory=dict)  # resources.json
    timeline: list[dict[str, Any]] = field(default_factory=list)  # timeline.jsonl
    curves: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows with eval_ metrics


# --- the math -------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def odds_ratio_gradients(p_chosen: float, p_rejected: float) -> tuple[float, float]:
    """d/d(log P) of log sigmoid(log OR), for the chosen and the rejected log-probability.

    log OR = log odds(y_w) - log odds(y_l) with log odds = log P - log(1 - P), so
    d log odds / d log P = 1 / (1 - P) and d log sigmoid(z) / dz = sigmoid(-z):
    (sigmoid(-z) / (1 - P_w), -sigmoid(-z) / (1 - P_l)).
    """
    z = math.log(p_chosen / (1 - p_chosen)) - math.log(p_rejected / (1 - p_rejected))
    weight = _sigmoid(-z)
    return weight / (1 - p_chosen), -weight / (1 - p_rejected)


def probability_ratio_gradients(p_chosen: float, p_rejected: float) -> tuple[float, float]:
    """d/d(log P) of log sigmoid(log PR), PR = P_w / P_l: (sigmoid(-z), -sigmoid(-z)) with z = log PR."""
    weight = _sigmoid(-(math.log(p_chosen) - math.log(p_rejected)))
    return weight, -weight


def gradient_norm(gradients: tuple[float, float]) -> float:
    return math.hypot(*gradients)


def time_to_accuracy(timeline: Sequence[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first probe whose held-out accuracy reaches `target`; None if none does."""
    for record in sorted(timeline, key=lambda r: r["train_seconds"]):
        if record["accuracy"] >= target:
            return float(record["train_seconds"])
    return None


def common_target(timelines: Sequence[Sequence[dict[str, Any]]]) -> float | None:
    """The highest accuracy every timeline reaches (the lowest of their best probes): all are timed to it."""
    bests = [max(r["accuracy"] for r in t) for t in timelines if t]
    return min(bests) if bests and len(bests) == len(timelines) else None


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (0 for one value), min and max."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def per_input_diversity(samples_file: Path) -> list[dict[str, float]]:
    """distinct-2 and self-BLEU of each input's samples (evals.diversity's metrics, one input at a time)."""
    from evals.diversity import distinct_n, self_bleu

    if not samples_file.is_file():
        return []
    rows = json.loads(samples_file.read_text(encoding="utf-8"))
    return [{"distinct_2": distinct_n(r["samples"], 2), "self_bleu": self_bleu(r["samples"])}
            for r in rows if len(r["samples"]) >= 2]


# --- figures --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_by_step(arms: Sequence[ArmOutcome], metric: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for arm in arms:
        for row in arm.curves:
            if metric in row:
                by_step.setdefault(int(row["step"]), []).append(float(row[metric]))
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot_logprob_curves(outcomes: Sequence[ArmOutcome], path: Path) -> Path:
    """Figure 3 of the paper: held-out mean log P of chosen (solid) and rejected (dashed), SFT vs ORPO."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [n for n in _arm_names(outcomes) if not n.startswith("sft-dpo")]
    for color, name in zip(colors, names):
        arms = [o for o in outcomes if o.name == name]
        for metric, style, what in (("eval_logps/chosen", "-", "chosen"), ("eval_logps/rejected", "--", "rejected")):
            steps, values = _mean_by_step(arms, metric)
            if steps:
                ax.plot(steps, values, style, color=color, marker="o", markersize=3, label=f"{name} {what}")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean log P per token (held-out)")
    ax.set_title("Held-out log-probabilities: SFT only vs ORPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_accuracy_over_time(outcomes: Sequence[ArmOutcome], target: float | None, path: Path) -> Path:
    """Held-out preference accuracy against training seconds, the first seed of each arm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    seed = min(o.seed for o in outcomes)
    for arm in (o for o in outcomes if o.seed == seed and o.timeline):
        points = sorted(arm.timeline, key=lambda r: r["train_seconds"])
        ax.plot([p["train_seconds"] for p in points], [p["accuracy"] for p in points], marker="o", markersize=3,
                label=arm.name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.2f}")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out preference accuracy")
    ax.set_title(f"Time to accuracy (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_diversity(per_arm: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Per-input self-BLEU of each arm's samples (lower = more diverse), one box per arm."""
    plt = _pyplot()
    names = [n for n, rows in per_arm.items() if rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if names:
        ax.boxplot([[r["self_bleu"] for r in per_arm[n]] for n in names], tick_labels=names)
    ax.set_ylabel("self-BLEU per input (lower = more diverse)")
    ax.set_title("Per-input diversity of samples")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_or_vs_pr(path: Path, point: tuple[float, float] = CONTRAST_POINT) -> Path:
    """Gradient magnitude of log sigmoid(log OR) and log sigmoid(log PR) over (P_chosen, P_rejected)."""
    import numpy as np

    plt = _pyplot()
    grid = np.linspace(0.02, 0.98, 97)
    odds = np.array([[gradient_norm(odds_ratio_gradients(pw, pl)) for pw in grid] for pl in grid])
    prob = np.array([[gradient_norm(probability_ratio_gradients(pw, pl)) for pw in grid] for pl in grid])
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.9), sharey=True, layout="constrained")
    # Log colours: the OR gradient grows without bound as P(rejected) -> 1, the PR gradient stays below 1.
    norm = LogNorm(vmin=float(min(odds.min(), prob.min())), vmax=float(max(odds.max(), prob.max())))
    for ax, values, title in ((axes[0], odds, "log sigmoid(log OR)"), (axes[1], prob, "log sigmoid(log PR)")):
        image = ax.pcolormesh(grid, grid, values, norm=norm, shading="auto", cmap="viridis")
        lines = ax.contour(grid, grid, values, levels=[0.25, 0.5, 1, 2, 4], colors="white", linewidths=0.6)
        ax.clabel(lines, fontsize=6, fmt="%g")
        ax.plot(*point, "r*", markersize=10)
        ax.set_title(f"|gradient| of {title}", fontsize=9)
        ax.set_xlabel("P(chosen)")
    axes[0].set_ylabel("P(rejected)")
    fig.colorbar(image, ax=axes, shrink=0.85)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- the report -----------------------------------------------------------------------------------------


def _arm_names(outcomes: Sequence[ArmOutcome]) -> list[str]:
    seen: list[str] = []
    for outcome in outcomes:
        if outcome.name not in seen:
            seen.append(outcome.name)
    return seen


def _fmt(stats: dict[str, float], digits: int = 3) -> str:
    if not stats.get("n"):
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _first_probe(arm: ArmOutcome) -> float:
    """Held-out accuracy at the arm's first probe (for SFT+DPO: the SFT phase's first)."""
    return float(min(arm.timeline, key=lambda r: r["train_seconds"])["accuracy"]) if arm.timeline else math.nan


def _final_eval(arm: ArmOutcome, metric: str) -> float | None:
    rows = [r for r in arm.curves if metric in r]
    return float(rows[-1][metric]) if rows else None


def summarize(outcomes: Sequence[ArmOutcome], target_accuracy: float | None = None) -> dict[str, Any]:
    """The report's numbers, per arm (mean ± std over seeds) and per seed for cost and time to accuracy."""
    arms: dict[str, Any] = {}
    diversity_rows: dict[str, list[dict[str, float]]] = {}
    for name in _arm_names(outcomes):
        runs = [o for o in outcomes if o.name == name]
        diversity_rows[name] = [row for o in runs for row in per_input_diversity(Path(o.eval_dir) / "diversity_samples.json")]
        arms[name] = {
            "method": runs[0].method,
            "orpo_lambda": runs[0].orpo_lambda,
            "seeds": [o.seed for o in runs],
            "preference_accuracy": spread([o.metrics.get("preference/accuracy", math.nan) for o in runs]),
            "preference_margin": spread([o.metrics.get("preference/margin", math.nan) for o in runs]),
            "eval_logps_chosen": spread([_final_eval(o, "eval_logps/chosen") or math.nan for o in runs]),
            "eval_logps_rejected": spread([_final_eval(o, "eval_logps/rejected") or math.nan for o in runs]),
            "distinct_2": spread([o.metrics.get("diversity/distinct_2", math.nan) for o in runs]),
            "self_bleu": spread([o.metrics.get("diversity/self_bleu", math.nan) for o in runs]),
            "per_input_distinct_2": spread([r["distinct_2"] for r in diversity_rows[name]]),
            "per_input_self_bleu": spread([r["self_bleu"] for r in diversity_rows[name]]),
            "train_seconds": spread([o.resources.get("train_seconds", math.nan) for o in runs]),
            "train_cpu_seconds": spread([o.resources.get("train_cpu_seconds", math.nan) for o in runs]),
            "wall_seconds": spread([o.resources.get("wall_seconds", math.nan) for o in runs]),
            "peak_memory_mb": spread([o.resources.get("peak_memory_mb", math.nan) for o in runs]),
            "dpo_phase_train_seconds": spread([o.resources.get("phases", {}).get("dpo", {}).get("train_seconds", math.nan)
                                               for o in runs]),
            "dpo_phase_peak_memory_mb": spread([o.resources.get("phases", {}).get("dpo", {}).get("peak_memory_mb",
                                                                                                math.nan) for o in runs]),
            "first_probe_accuracy": spread([_first_probe(o) for o in runs]),
            "model_uris": [o.model_uri for o in runs],
        }
    per_seed = []
    for seed in sorted({o.seed for o in outcomes}):
        timed = [o for o in outcomes if o.seed == seed and o.timeline and o.method != "sft"]
        target = target_accuracy if target_accuracy is not None else common_target([o.timeline for o in timed])
        per_seed.append({
            "seed": seed,
            "target_accuracy": target,
            "time_to_target": {o.name: time_to_accuracy(o.timeline, target) if target is not None else None
                               for o in outcomes if o.seed == seed and o.timeline},
        })
    contrast = {
        "p_chosen": CONTRAST_POINT[0], "p_rejected": CONTRAST_POINT[1],
        "odds_ratio": odds_ratio_gradients(*CONTRAST_POINT),
        "probability_ratio": probability_ratio_gradients(*CONTRAST_POINT),
    }
    return {"arms": arms, "time_to_accuracy": per_seed, "or_vs_pr": contrast, "diversity_rows": diversity_rows}


def _cost_rows(summary: dict[str, Any]) -> list[str]:
    rows = ["| arm | training s | training CPU s | wall s | peak memory MB |", "|---|---|---|---|---|"]
    for name, arm in summary["arms"].items():
        rows.append(f"| {name} | {_fmt(arm['train_seconds'], 0)} | {_fmt(arm['train_cpu_seconds'], 0)} | "
                    f"{_fmt(arm['wall_seconds'], 0)} | {_fmt(arm['peak_memory_mb'], 0)} |")
        if arm["dpo_phase_train_seconds"].get("n"):
            rows.append(f"| {name}: DPO phase alone | {_fmt(arm['dpo_phase_train_seconds'], 0)} | | | "
                        f"{_fmt(arm['dpo_phase_peak_memory_mb'], 0)} |")
    dpo = summary["arms"].get("sft-dpo")
    for name, arm in summary["arms"].items():
        if dpo is None or arm["method"] != "orpo":
            continue
        time_ratio = dpo["train_seconds"]["mean"] / arm["train_seconds"]["mean"]
        cpu_ratio = dpo["train_cpu_seconds"]["mean"] / arm["train_cpu_seconds"]["mean"]
        memory_ratio = dpo["peak_memory_mb"]["mean"] / arm["peak_memory_mb"]["mean"]
        cpu = "" if math.isnan(cpu_ratio) else f", {cpu_ratio:.2f}x the training CPU time"
        rows.append(f"\nSFT+DPO vs {name}: {time_ratio:.2f}x the training time{cpu}, {memory_ratio:.2f}x the peak "
                    "memory.")
    return rows


def render_markdown(summary: dict[str, Any], figures: dict[str, str], meta: dict[str, Any]) -> str:
    arms = summary["arms"]
    lines = [f"# Ablation study `{meta.get('study', '?')}`: SFT only vs ORPO vs SFT+DPO", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "study"]
    lines += ["", "Numbers are mean ± standard deviation over seeds where there is more than one.", ""]

    lines += ["## Held-out log-probabilities over training (claim 1)", "",
              f"![log-probabilities]({figures['logprobs']})", "",
              "| arm | final held-out log P chosen | final held-out log P rejected |", "|---|---|---|"]
    for name, arm in arms.items():
        if arm["method"] != "sft+dpo":
            lines.append(f"| {name} | {_fmt(arm['eval_logps_chosen'])} | {_fmt(arm['eval_logps_rejected'])} |")

    lines += ["", "## Held-out preference accuracy and log-odds margin", "",
              "| arm | method | lambda | accuracy | log-odds margin | registered |", "|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        lines.append(f"| {name} | {arm['method']} | {arm['orpo_lambda']:g} | {_fmt(arm['preference_accuracy'])} | "
                     f"{_fmt(arm['preference_margin'])} | {', '.join(f'`{u}`' for u in arm['model_uris'] if u)} |")

    lines += ["", "## Cost: one phase (ORPO) vs two phases (SFT+DPO) (claim 2)", "",
              "Measured in this run, each arm in its own process; SFT+DPO adds both phases' time and takes the "
              "larger phase's peak memory. Training seconds exclude periodic evaluation; training CPU seconds are "
              "the arm process's CPU time over the same span (less sensitive to other load on a shared machine).", "", *_cost_rows(summary),
              "", f"![time to accuracy]({figures['accuracy']})", "",
              "| seed | target accuracy | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for seed_row in summary["time_to_accuracy"]:
        target = seed_row["target_accuracy"]
        cells = []
        for name in arms:
            seconds = seed_row["time_to_target"].get(name)
            cells.append("not reached" if seconds is None else f"{seconds:.0f} s")
        lines.append(f"| {seed_row['seed']} | {'n/a' if target is None else f'{target:.3f}'} | "
                     + " | ".join(cells) + " |")
    lines.append("| accuracy at the first probe | | " + " | ".join(_fmt(arm["first_probe_accuracy"]) for arm in arms.values())
                 + " |")
    lines += ["", "The target is the highest held-out accuracy that every ORPO arm and SFT+DPO reach (the lowest of their "
              "best probes), per seed, unless `ablation.target_accuracy` sets it. A target an arm already has at its "
              "first probe measures nothing about that arm's training."]

    lines += ["", "## Per-input diversity (claim 3)", "",
              "distinct-2 (higher = more diverse) and self-BLEU (lower = more diverse) of each input's samples "
              "(evals.diversity); spread is over inputs, pooled across seeds.", "",
              f"![diversity]({figures['diversity']})", "",
              "| arm | distinct-2 | self-BLEU | per-input self-BLEU min-max |", "|---|---|---|---|"]
    for name, arm in arms.items():
        bleu = arm["per_input_self_bleu"]
        low_high = "n/a" if not bleu.get("n") else f"{bleu['min']:.3f}-{bleu['max']:.3f}"
        lines.append(f"| {name} | {_fmt(arm['per_input_distinct_2'])} | {_fmt(bleu)} | {low_high} |")

    contrast = summary["or_vs_pr"]
    (orw, orl), (prw, prl) = contrast["odds_ratio"], contrast["probability_ratio"]
    lines += ["", "## Odds ratio vs probability ratio", "",
              f"Gradient of log sigmoid(log OR) and of log sigmoid(log PR) with respect to the log-probabilities "
              f"of the chosen and rejected response, at P(chosen) = {contrast['p_chosen']}, "
              f"P(rejected) = {contrast['p_rejected']}:", "",
              "| term | d/d log P(chosen) | d/d log P(rejected) | magnitude |", "|---|---|---|---|",
              f"| log sigmoid(log OR) | {orw:.4f} | {orl:.4f} | {gradient_norm((orw, orl)):.4f} |",
              f"| log sigmoid(log PR) | {prw:.4f} | {prl:.4f} | {gradient_norm((prw, prl)):.4f} |", "",
              f"![OR vs PR]({figures['or_vs_pr']})", ""]
    return "\n".join(lines)


def write_report(outcomes: Sequence[ArmOutcome], out_dir: str | Path, meta: dict[str, Any],
                 target_accuracy: float | None = None) -> Path:
    """report.md, report.json and the figures in `out_dir`; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(outcomes, target_accuracy)
    first_target = next((s["target_accuracy"] for s in summary["time_to_accuracy"]), None)
    figures = {
        "logprobs": plot_logprob_curves(outcomes, out / "logprobs.png").name,
        "accuracy": plot_accuracy_over_time(outcomes, first_target, out / "time_to_accuracy.png").name,
        "diversity": plot_diversity(summary["diversity_rows"], out / "diversity.png").name,
        "or_vs_pr": plot_or_vs_pr(out / "or_vs_pr.png").name,
    }
    (out / "report.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "arms": [asdict(o) for o in outcomes]}, indent=2, default=str),
        encoding="utf-8")
    path = out / "report.md"
    path.write_text(render_markdown(summary, figures, meta), encoding="utf-8")
    return path


def collect_outcome(arm, train_dir: str | Path, *, model_uri: str = "", eval_dir: str | Path = "",
                    metrics: dict[str, float] | None = None) -> ArmOutcome:
    """An arm's outcome from its training directory (timeline, resources, eval curves) and its evaluation."""
    from orpo.ablation.timeline import TIMELINE_JSONL, read_jsonl, read_resources

    train_dir = Path(train_dir)
    curves = [row for row in read_jsonl(train_dir / "metrics.jsonl") if any(k.startswith("eval_") for k in row)]
    return ArmOutcome(
        name=arm.name, method=arm.method, orpo_lambda=arm.orpo_lambda, seed=arm.seed, train_dir=str(train_dir),
        model_uri=model_uri, eval_dir=str(eval_dir), metrics=dict(metrics or {}),
        resources=read_resources(train_dir), timeline=read_jsonl(train_dir / TIMELINE_JSONL), curves=curves,
    )
