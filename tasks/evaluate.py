"""Prefect task: evaluate a model with the configured suites (evals/)."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from evals.protocols import describe_metric
from evals.run import EvalResult, evaluate_model
from orpo.config import PipelineConfig


def judge_api_key(config: PipelineConfig) -> str | None:
    """The judge's API key: a Prefect Secret block when configured, else the environment variable."""
    judge = config.eval.judge
    if judge.kind != "openai":
        return None
    if judge.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(judge.api_key_secret).get()
    return os.environ.get(judge.api_key_env)


@task(name="evaluate-model", persist_result=True)
def evaluate(config: PipelineConfig, model_path: str, out_dir: Path, dataset_dir: Path | None,
             base_model_path: str | None, label: str = "model") -> EvalResult:
    """Generate, judge and score `model_path`; writes report.json/.md and charts to `out_dir`."""
    get_run_logger().info("evaluating %s (%s) with suites %s", label, model_path, ", ".join(config.eval.suites))
    result = evaluate_model(config, model_path, out_dir, dataset_dir=dataset_dir, base_model_path=base_model_path,
                            api_key=judge_api_key(config), progress=False)
    create_table_artifact(
        key=f"evaluation-{label}".lower(),
        table=[{"metric": name, "value": round(value, 4),
                "protocol": result.protocols.get(name.split("/", 1)[0]) or describe_metric(name)}
               for name, value in sorted(result.metrics.items())],
        description=f"Evaluation of the {label} ({model_path})",
    )
    return result
