"""Evaluate one model with the configured suites and write its report: the library entry point.

    from orpo.config import load_config
    from evals.run import evaluate_model
    result = evaluate_model(load_config("configs/demo.yaml"), "runs/train/demo/model", "runs/eval/demo",
                            dataset_dir="runs/data/demo")
    result.metrics["alpaca/win_rate"], result.report_md

Suites (config.eval.suites): alpaca, mtbench, diversity, preference, lm-eval. Files written to `out_dir`,
in the layouts the official tools read unchanged: `model_outputs.json` + `annotations.json` (AlpacaEval),
`model_answer/<model_id>.jsonl` + `model_judgment/<judge model>_single.jsonl` (FastChat, e.g.
`model_judgment/gpt-4_single.jsonl`), then preference_margins.json (per pair), diversity_samples.json,
report.json, report.md and PNG charts.

Metric names say which protocol produced them (`evals.protocols`): `alpaca_eval2/...` and `mt_bench/...`
only for the official protocols on the official data; `EvalResult.protocols` and report.json's
`protocols` map each prefix to its description (the registry tags the MLflow run with them).
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
    protocols: dict[str, str] = field(default_factory=dict)  # metric prefix -> protocol description


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
        self.protocols: dict[str, str] = {}
        self._judge = None
        self._alpaca_rows: list[dict[str, Any]] | None = None
        self._alpaca_official = False
        self.model, self.tokenizer = _load(config, model_spec)

    @property
    def judge(self):
        if self._judge is None:
            from evals.judges import build_judge

            cache = self.ev.judge.cache_dir or str(Path(self.config.workdir) / "judge-cache")
            self._judge = build_judge(self.ev.judge, api_key=self.api_key, cache_dir=cache)
        return self._judge

    def _data(self, configured: str | None, official) -> tuple[str, bool]:
        """The configured source (else the cached official file) and whether it is the official file."""
        from evals.official import is_official, resolve

        source = resolve(configured, official, self.ev.data_cache_dir)
        local = Path(source)
        return source, (is_official(local, official) if local.is_file() else False)

    def alpaca_rows(self) -> list[dict[str, Any]]:
        from evals.official import ALPACA_EVAL_BASELINE
        from evals.sources import load_alpaca_eval

        if self._alpaca_rows is None:
            source, self._alpaca_official = self._data(self.ev.alpaca_source, ALPACA_EVAL_BASELINE)
            self._alpaca_rows = load_alpaca_eval(source, limit=self.ev.alpaca_limit, seed=self.ev.seed)
        return self._alpaca_rows

    def run_alpaca(self) -> None:
        from evals.alpaca import alpaca_metrics, judge_pairwise, leaderboard_df_gamed, load_evaluator, protocol_kwargs
        from evals.generate import generate_alpaca_outputs, write_json
        from evals.protocols import LC_MINIMAL, LC_OFFICIAL, alpaca_protocol

        rows = self.alpaca_rows()
        evaluator = load_evaluator(self.ev.alpaca_evaluator)
        judge = self.judge
        annotator = self.ev.judge.alpaca_annotator_model if judge.kind == "openai" else judge.model
        protocol = alpaca_protocol(
            judge_kind=judge.kind, evaluator=evaluator.name, annotator_model=annotator, custom_prompt=False,
            # The official file has 805 instructions and the 80 questions; a limit below that is a subset.
            official_data=self._alpaca_official, subset=len(rows) < 805, seed=self.ev.seed,
        )
        outputs = generate_alpaca_outputs(
            self.model, self.tokenizer, rows, generator=self.label, max_new_tokens=self.ev.max_new_tokens,
            batch_size=self.ev.batch_size, seed=self.ev.seed, progress=self.progress,
        )
        write_json(outputs, self.out / "model_outputs.json")
        annotations = judge_pairwise(judge, rows, outputs, **{**protocol_kwargs(self.ev), "evaluator": evaluator})
        write_json(annotations, self.out / "annotations.json")
        # The leaderboard's LC GLM needs df_gamed.csv: the configured file, else alpaca_eval's own download.
        df_gamed = self.ev.lc_glm_df_gamed or (leaderboard_df_gamed() if protocol.official else None)
        result = alpaca_metrics(annotations, df_gamed=df_gamed)
        values = result.as_dict()
        prefix = protocol.prefix
        lc_name = LC_OFFICIAL if result.lc_method == "length_controlled_v1" else LC_MINIMAL
        renamed = {"length_controlled_winrate": lc_name, "lc_standard_error": f"{lc_name}_standard_error"}
        self.metrics.update(_finite({f"{prefix}/{renamed.get(k, k)}": v for k, v in values.items()
                                     if k not in ("lc_method", "n_parse_failures")}))
        self.metrics[f"{prefix}/parse_failures"] = float(result.n_parse_failures)
        self.protocols[prefix] = protocol.description
        self.sections["AlpacaEval"] = {
            **values,
            "protocol": protocol.description,
            "metric_prefix": prefix,
            "evaluator": f"alpaca_eval evaluators_configs/{evaluator.name}",
            "judge": f"{judge.kind}:{annotator}",
            "n_swapped": sum(a["is_swapped"] for a in annotations),
        }
        self.notes.append(f"`{prefix}/*`: {protocol.description}")
        if result.lc_method == "none":
            self.notes.append("AlpacaEval length-controlled win rate: not reported (the GLM could not be fitted)")
        elif result.lc_method != "length_controlled_v1":
            self.notes.append(
                f"`{prefix}/{LC_MINIMAL}`: alpaca_eval's length_controlled_minimal GLM (length and baseline terms "
                "only, offline), not the leaderboard's length_controlled_v1 (set eval.lc_glm_df_gamed for that)"
            )

    def run_mtbench(self) -> None:
        from evals.generate import generate_mt_bench_answers, write_jsonl
        from evals.mt_bench import grade_answers, judgment_file_name, mt_bench_scores, radar_chart
        from evals.official import MT_BENCH_JUDGE_PROMPTS, MT_BENCH_QUESTIONS, MT_BENCH_REFERENCES
        from evals.protocols import mt_bench_protocol
        from evals.sources import load_judge_prompts, load_mt_bench_questions, load_reference_answers

        question_source, official_questions = self._data(self.ev.mt_bench_questions, MT_BENCH_QUESTIONS)
        questions = load_mt_bench_questions(question_source, limit=self.ev.mt_bench_limit, seed=self.ev.seed)
        # A small local judge defaults to the project's short prompts; an endpoint judge to FastChat's.
        builtin = self.ev.mt_bench_judge_prompts == "builtin" or (
            self.ev.mt_bench_judge_prompts is None and self.ev.judge.kind == "hf"
        )
        prompts, fastchat_prompts = None, False
        if not builtin:
            prompt_source, fastchat_prompts = self._data(self.ev.mt_bench_judge_prompts, MT_BENCH_JUDGE_PROMPTS)
            prompts = load_judge_prompts(prompt_source)
        if self.ev.mt_bench_reference_answers or not builtin:
            reference_source, official_references = self._data(self.ev.mt_bench_reference_answers, MT_BENCH_REFERENCES)
            references = load_reference_answers(reference_source)
        else:
            references, official_references = {}, False
        judge = self.judge
        judge_model = self.ev.judge.mt_bench_judge_model if judge.kind == "openai" else judge.model
        max_new_tokens = self.ev.mt_bench_max_new_tokens or self.ev.max_new_tokens
        protocol = mt_bench_protocol(
            judge_kind=judge.kind, judge_model=judge_model, fastchat_prompts=fastchat_prompts,
            official_questions=official_questions, official_references=official_references,
            subset=len(questions) < 80, max_new_tokens=max_new_tokens,
        )
        answers = generate_mt_bench_answers(
            self.model, self.tokenizer, questions, model_id=self.label, max_new_tokens=max_new_tokens,
            batch_size=self.ev.batch_size, seed=self.ev.seed, progress=self.progress,
        )
        write_jsonl(answers, self.out / "model_answer" / f"{self.label}.jsonl")
        judgments = grade_answers(judge, questions, answers, judge_prompts=prompts, references=references,
                                  judge_model=judge_model if judge.kind == "openai" else None)
        # FastChat names the file after the judge model; a local judge's spec may be a path, so its short name.
        file_judge = judge_model if judge.kind == "openai" else model_label(judge_model)
        write_jsonl(judgments, self.out / "model_judgment" / judgment_file_name(file_judge))
        scores = mt_bench_scores(judgments, questions)
        prefix = protocol.prefix
        self.metrics.update(_finite({
            f"{prefix}/score": scores.score,
            f"{prefix}/turn_1": scores.turn_1,
            f"{prefix}/turn_2": scores.turn_2,
            f"{prefix}/parse_failures": scores.parse_failures,
            **{f"{prefix}/category/{c}": v for c, v in scores.categories.items()},
        }))
        self.protocols[prefix] = protocol.description
        self.sections["MT-Bench"] = {
            **scores.as_dict(),
            "protocol": protocol.description,
            "metric_prefix": prefix,
            "judge": f"{judge.kind}:{judge_model}",
        }
        self.notes.append(f"`{prefix}/*`: {protocol.description}")
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
    from orpo.head_to_head import evaluation_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A reused directory (the start model's, night after night) must not keep an earlier evaluation's files
    # (another judge's judgments, a suite no longer run): they would be read back as this evaluation's.
    for stale in evaluation_files(out):
        log.info("removing %s of an earlier evaluation", stale)
        stale.unlink()
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
            judge_cfg = config.eval.judge
            models = ({"alpaca_annotator_model": judge_cfg.alpaca_annotator_model,
                       "mt_bench_judge_model": judge_cfg.mt_bench_judge_model, "base_url": judge_cfg.base_url}
                      if run._judge.kind == "openai" else {"model": run._judge.model})
            run.sections["Judge"] = {"kind": run._judge.kind, **models, **run._judge.stats.as_dict()}
        run.summary_chart()
        report = Report(model=model_path, metrics=dict(sorted(run.metrics.items())), sections=run.sections,
                        notes=run.notes, charts=run.charts, protocols=dict(run.protocols))
        json_path, md_path = write_report(report, out)
    finally:
        run.close()
    return EvalResult(report_dir=out, report_json=json_path, report_md=md_path, charts=list(run.charts),
                      metrics=dict(report.metrics), protocols=dict(report.protocols))
