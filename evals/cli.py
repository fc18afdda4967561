"""`orpo eval`: evaluate a model, or compute metrics from existing AlpacaEval / FastChat files.

    orpo eval run --model runs/train/demo/model --config configs/demo.yaml --suite alpaca,mtbench --limit 8
    orpo eval alpaca-metrics --annotations ../shared/data/alpaca_eval/annotations/alpaca-7b.json
    orpo eval mt-bench-score --judgments data/mt_bench/model_judgment/gpt-4_single.jsonl

Heavy libraries are imported inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from orpo.cli import OrpoGroup

app = typer.Typer(
    help="Evaluate a model: AlpacaEval, MT-Bench, diversity, preference accuracy, lm-eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OrpoGroup,
)


def _clean(value):
    from evals.report import _clean as clean  # NaN -> null: the output stays valid JSON

    return clean(value)


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(2)


@app.command("run")
def run(
    model: str = typer.Option(..., "--model", "-m", help="Model directory, LoRA adapter directory, models:/ URI, "
                              "hub id or builtin:..."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config; defaults apply when omitted."),
    suite: str | None = typer.Option(None, "--suite", help="Comma-separated: alpaca,mtbench,diversity,"
                                        "preference,lm-eval (default: eval.suites)."),
    dataset_dir: Path | None = typer.Option(None, "--dataset-dir", help="Binarized dataset (test split) for "
                                               "the preference suite."),
    base_model: str | None = typer.Option(None, "--base-model", help="Base model for the preference comparison."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report directory (default: <workdir>/eval/<model>)."),
    limit: int | None = typer.Option(None, "--limit", help="Seeded subset: this many AlpacaEval instructions, "
                                        "MT-Bench questions and preference pairs."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. eval.judge.kind=openai."),
) -> None:
    """Generate, judge and score a model; writes report.json, report.md and PNG charts."""
    from orpo.config import load_config

    extra = list(overrides or [])
    if suite:
        extra.append(f"eval.suites=[{suite}]")
    if limit is not None:
        extra += [f"eval.alpaca_limit={limit}", f"eval.mt_bench_limit={limit}", f"eval.preference_limit={limit}"]
    cfg = load_config(config, extra)  # a ConfigError exits 2 through OrpoGroup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from evals.run import evaluate_model, model_label

    from evals.judges import JudgeError
    from evals.official import OfficialDataError
    from evals.sources import SourceError

    target = out or Path(cfg.workdir) / "eval" / model_label(model)
    try:
        result = evaluate_model(cfg, model, target, dataset_dir=dataset_dir, base_model_path=base_model)
    except (JudgeError, OfficialDataError, SourceError) as exc:  # foreseeable: one message says what to do
        _fail(str(exc))
        return
    typer.echo(json.dumps(_clean(result.metrics), indent=2))
    typer.echo(f"report: {result.report_md}", err=True)


@app.command("alpaca-metrics")
def alpaca_metrics_command(
    annotations: Path = typer.Option(..., "--annotations", "-a", help="AlpacaEval annotations JSON of one model."),
    glm_weights: Path | None = typer.Option(None, "--glm-weights", help="Published LC GLM weights csv "
                                               "(reproduces a leaderboard model's LC win rate offline)."),
    df_gamed: Path | None = typer.Option(None, "--df-gamed", help="alpaca_eval's df_gamed.csv: fit the full "
                                            "length_controlled_v1 GLM."),
) -> None:
    """Print AlpacaEval's leaderboard metrics of an annotations file as JSON."""
    from evals.alpaca import alpaca_metrics, read_annotations

    if not annotations.is_file():
        _fail(f"{annotations} does not exist")
    try:
        result = alpaca_metrics(read_annotations(annotations), df_gamed=df_gamed, glm_weights=glm_weights)
    except ValueError as exc:
        _fail(f"{annotations}: {exc}")
        return
    typer.echo(json.dumps(_clean(result.as_dict()), indent=2))


@app.command("mt-bench-score")
def mt_bench_score_command(
    judgments: Path = typer.Option(..., "--judgments", "-j", help="FastChat single-grading judgment JSONL."),
    questions: Path | None = typer.Option(None, "--questions", "-q", help="FastChat question.jsonl, for "
                                             "per-category scores."),
    chart: Path | None = typer.Option(None, "--chart", help="Also write a radar chart PNG here."),
) -> None:
    """Print MT-Bench scores (overall, per turn, per category, per model) of a FastChat judgment file as JSON."""
    from evals.mt_bench import mt_bench_scores, radar_chart
    from evals.sources import read_jsonl

    rows = read_jsonl(judgments)
    question_rows = read_jsonl(questions) if questions else None
    for number, row in enumerate(rows, start=1):
        missing = [k for k in ("question_id", "model", "score", "turn") if k not in row]
        if missing:
            _fail(f"{judgments}:{number}: missing {', '.join(missing)} (FastChat single-grading judgment)")
    models = sorted({str(r["model"]) for r in rows})
    scores = {m: mt_bench_scores(rows, question_rows, model=m) for m in models}
    typer.echo(json.dumps(_clean({m: s.as_dict() for m, s in scores.items()}), indent=2))
    if chart:
        radar_chart({m: s.categories for m, s in scores.items()}, chart)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
