"""Evaluate one model with the configured suites and write its report: the library entry point.

    from orpo.config import load_config
    from evals.run import evaluate_model
    result = evaluate_model(load_config("configs/demo.yaml"), "runs/train/demo/model", "runs/eval/demo",
                            dataset_dir="runs/data/demo")
    result.metrics["alpaca/win_rate"], result.report_md

Suites (config.eval.suites): alpaca, mtbench, diversity, preference, lm-eval. Files written to `out_dir`:
model_outputs.json + annotations.json (AlpacaEval formats), model_answer.jsonl + model_judgment.jsonl
(FastChat formats), preference_margins.json (per pair), diversity_samples.json, report.json, report.md and PNG charts.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpo.config import PipelineConfig

log = logging.getLogger(__name__)

SUITES = ("alpaca", "mtbench", "diversity", "preference", "lm-eval")


@dataclass
class EvalResult:
    """Where the report went and the flat headline metrics (what the registry logs to MLflow)."""

    report_dir: Path
    report_json: Path
    report_md: Path
    charts: list[Path]
    metrics: dict[str, float] = field(default_factory=dict)


def model_label(spec: str) -> str:
    """A short generator name for output files: the directory name, or the models:/ name and version."""
    text = spec.rstrip("/")
    if text.startswith(("models:/", "runs:/")):
        text = text.split(":/", 1)[1]
    else:
        text = Path(text).name or text
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-") or "model"


def _resolve(spec: str, config: PipelineConfig) -> str:
    from orpo.models import resolve_model

    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local.resolve())
    return resolve_model(spec, config.model.cache_dir, config.model.revision).path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(config: PipelineConfig, spec: str):
    """Load a model for inference on the best device here (a GPU when there is one)."""
    from orpo.models import load_model_and_tokenizer

    device = default_device()
    model, tokenizer = load_model_and_tokenizer(config.model, device_type=device, path=_resolve(spec, config))
    return model.to(device).eval(), tokenizer


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class _Evaluation:
    """One evaluation run: holds the loaded model, the lazily built judge and what the suites produced."""

    def __init__(self, config: PipelineConfig, model_spec: str, out_dir: Path, *, api_key: str | None,
                 progress: bool) -> None:
        self.config = config
        self.ev = config.eval
        self.model_spec = model_spec
        self.label = model_label(model_spec)
        self.out = out_dir
        self.api_key = api_key
        self.progress = progress
        self.metrics: dict[str, float] = {}
        self.sections: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.charts: list[Path] = []
        self._judge = None
        self._alpaca_rows: list[dict[str, Any]] | None = None
        self.model, self.tokenizer = _load(config, model_spec)

    @property
    def judge(self):
        if self._judge is None:
            from evals.judges import build_judge

            cache = self.ev.judge.cache_dir or str(Path(self.config.workdir) / "judge-cache")
            self._judge = build_judge(self.ev.judge, api_key=self.api_key, cache_dir=cache)
        return self._judge

    def alpaca_rows(self) -> list[dict[str, Any]]:
        from evals.sources import load_alpaca_eval

        if self._alpaca_rows is None:
            self._alpaca_rows = load_alpaca_eval(self.ev.alpaca_source, limit=self.ev.alpaca_limit, seed=self.ev.seed)
        return self._alpaca_rows

    def run_alpaca(self) -> None:
        from evals.alpaca import EVALUATOR, alpaca_metrics, judge_pairwise
        from evals.generate import generate_alpaca_outputs, write_json

        rows = self.alpaca_rows()
        outputs = generate_alpaca_outputs(
            self.model, self.tokenizer, rows, generator=self.label, max_new_tokens=self.ev.max_new_tokens,
            batch_size=self.ev.batch_size, seed=self.ev.seed, progress=self.progress,
        )
        write_json(outputs, self.out / "model_outputs.json")
        annotations = judge_pairwise(self.judge, rows, outputs, seed=self.ev.seed)
        write_json(annotations, self.out / "annotations.json")
        result = alpaca_metrics(annotations, df_gamed=self.ev.lc_glm_df_gamed)
        values = result.as_dict()
        self.metrics.update(_finite({f"alpaca/{k}": v for k, v in values.items()
                                     if k not in ("lc_method", "n_parse_failures")}))
        self.metrics["alpaca/parse_failures"] = float(result.n_parse_failures)
        self.sections["AlpacaEval"] = {
            **values,
            "evaluator_template": f"alpaca_eval evaluators_configs/{EVALUATOR}",
            "judge": f"{self.judge.kind}:{self.judge.model}",
            "n_swapped": sum(a["is_swapped"] for a in annotations),
        }
        self.notes.append(
            f"AlpacaEval length-controlled win rate: GLM `{result.lc_method}`"
            + (" (offline: length and baseline terms only, not the leaderboard's length_controlled_v1)"
               if result.lc_method == "length_controlled_minimal" else "")
        )

    def run_mtbench(self) -> None:
        from evals.generate import generate_mt_bench_answers, write_jsonl
        from evals.mt_bench import grade_answers, mt_bench_scores, radar_chart
        from evals.sources import (
            load_judge_prompts,
            load_mt_bench_questions,
            load_reference_answers,
        )

        questions = load_mt_bench_questions(self.ev.mt_bench_questions, limit=self.ev.mt_bench_limit,
                                            seed=self.ev.seed)
        answers = generate_mt_bench_answers(
            self.model, self.tokenizer, questions, model_id=self.label, max_new_tokens=self.ev.max_new_tokens,
            batch_size=self.ev.batch_size, seed=self.ev.seed, progress=self.progress,
        )
        write_jsonl(answers, self.out / "model_answer.jsonl")
        prompts = load_judge_prompts(self.ev.mt_bench_judge_prompts) if self.ev.mt_bench_judge_prompts else None
        references = load_reference_answers(self.ev.mt_bench_reference_answers)
        judgments = grade_answers(self.judge, questions, answers, judge_prompts=prompts, references=references)
        write_jsonl(judgments, self.out / "model_judgment.jsonl")
        scores = mt_bench_scores(judgments, questions)
        self.metrics.update(_finite({
            "mt_bench/score": scores.score,
            "mt_bench/turn_1": scores.turn_1,
            "mt_bench/turn_2": scores.turn_2,
            "mt_bench/parse_failures": scores.parse_failures,
            **{f"mt_bench/category/{c}": v for c, v in scores.categories.items()},
        }))
        self.sections["MT-Bench"] = {
            **scores.as_dict(),
            "judge_prompts": self.ev.mt_bench_judge_prompts or "built-in",
            "judge": f"{self.judge.kind}:{self.judge.model}",
        }
        finite = {c: v for c, v in scores.categories.items() if math.isfinite(v)}
        if finite:
            self.charts.append(radar_chart({self.label: finite}, self.out / "mt_bench_radar.png"))

    def run_diversity(self) -> None:
        from evals.diversity import sample_and_score
        from evals.generate import write_json
        from evals.sources import seeded_subset

        prompts = [r["instruction"] for r in seeded_subset(self.alpaca_rows(), self.ev.diversity_prompts, self.ev.seed)]
        scores, samples = sample_and_score(
            self.model, self.tokenizer, prompts, samples=self.ev.diversity_samples,
            temperature=self.ev.diversity_temperature, max_new_tokens=self.ev.max_new_tokens,
            batch_size=self.ev.batch_size, seed=self.ev.seed,
        )
        write_json([{"instruction": p, "samples": s} for p, s in zip(prompts, samples)],
                   self.out / "diversity_samples.json")
        self.metrics.update({
            "diversity/distinct_1": scores.distinct_1,
            "diversity/distinct_2": scores.distinct_2,
            "diversity/self_bleu": scores.self_bleu,
        })
        self.sections["Diversity"] = {**scores.as_dict(), "temperature": self.ev.diversity_temperature}

    def _margins_of(self, model, tokenizer, pairs) -> list[float]:
        from evals.preference import pair_margins

        train = self.config.train
        return pair_margins(
            model, tokenizer, pairs, max_length=train.max_length, max_prompt_length=train.max_prompt_length,
            batch_size=train.per_device_batch_size, chunk_size=train.logprob_chunk_size,
        )

    def run_preference(self, dataset_dir: str | Path | None, base_model_path: str | None) -> None:
        from evals.generate import write_json
        from evals.preference import load_test_pairs, margin_records, preference_scores

        if dataset_dir is None:
            self.notes.append("preference suite skipped: no dataset_dir was given")
            return
        pairs = load_test_pairs(dataset_dir, self.ev.preference_limit, self.ev.seed)
        margins = self._margins_of(self.model, self.tokenizer, pairs)
        mine = preference_scores(margins)
        self.metrics.update({"preference/accuracy": mine.accuracy, "preference/margin": mine.margin})
        section: dict[str, Any] = {"n_pairs": mine.n_pairs, "accuracy": mine.accuracy, "margin": mine.margin}
        base_margins = None
        if base_model_path:
            base_model, base_tokenizer = _load(self.config, base_model_path)
            base_margins = self._margins_of(base_model, base_tokenizer, pairs)
            base = preference_scores(base_margins)
            del base_model
            gc.collect()
            self.metrics.update({"preference/base_accuracy": base.accuracy, "preference/base_margin": base.margin})
            section.update(base_model=base_model_path, base_accuracy=base.accuracy, base_margin=base.margin)
        # Per-pair margins: the gate pairs two models' accuracies on the same pairs (McNemar).
        write_json(margin_records(pairs, margins, base_margins), self.out / "preference_margins.json")
        self.sections["Preference accuracy"] = section

    def run_lm_eval(self) -> None:
        from evals.harness import run_lm_eval

        if not self.ev.lm_eval_tasks:
            self.notes.append("lm-eval suite skipped: eval.lm_eval_tasks is empty")
            return
        results = run_lm_eval(
            self.model, self.tokenizer, self.ev.lm_eval_tasks, include_path=self.ev.lm_eval_include_path,
            limit=self.ev.lm_eval_limit, batch_size=self.ev.batch_size, seed=self.ev.seed,
        )
        self.metrics.update(results)
        self.sections["lm-eval"] = {"tasks": ", ".join(self.ev.lm_eval_tasks), "results": results}

    def summary_chart(self) -> None:
        from orpo.gate_plots import evaluation_summary_chart

        chart = evaluation_summary_chart(self.out, self.label, seed=self.ev.seed)
        if chart is not None:
            self.charts.append(chart)

    def close(self) -> None:
        self.model = self.tokenizer = self._judge = None
        gc.collect()


def evaluate_model(
    config: PipelineConfig,
    model_path: str,
    out_dir: str | Path,
    *,
    dataset_dir: str | Path | None = None,
    base_model_path: str | None = None,
    api_key: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run `config.eval.suites` on `model_path` (a directory, LoRA adapter directory, or any model spec).

    The judge comes from `config.eval.judge`; an `openai` judge's key is `api_key` or the environment
    variable `judge.api_key_env` (never logged). The preference suite scores `dataset_dir`'s test split for
    the model and, when given, `base_model_path`. Writes report.json, report.md and charts to `out_dir`.
    """
    from evals.report import Report, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suites = list(dict.fromkeys(config.eval.suites))
    log.info("evaluating %s with suites %s into %s", model_path, ", ".join(suites), out)
    run = _Evaluation(config, model_path, out, api_key=api_key, progress=progress)
    try:
        for suite in suites:
            if suite == "alpaca":
                run.run_alpaca()
            elif suite == "mtbench":
                run.run_mtbench()
            elif suite == "diversity":
                run.run_diversity()
            elif suite == "preference":
                run.run_preference(dataset_dir, base_model_path)
            elif suite == "lm-eval":
                run.run_lm_eval()
        if run._judge is not None:
            run.sections["Judge"] = {"kind": run._judge.kind, "model": run._judge.model, **run._judge.stats.as_dict()}
        run.summary_chart()
        report = Report(model=model_path, metrics=dict(sorted(run.metrics.items())), sections=run.sections,
                        notes=run.notes, charts=run.charts)
        json_path, md_path = write_report(report, out)
    finally:
        run.close()
    return EvalResult(report_dir=out, report_json=json_path, report_md=md_path, charts=list(run.charts),
                      metrics=dict(report.metrics))
