"""The alignment pipeline as Prefect flows.

    prepare data -> train -> register -> evaluate (model, and base once) -> log evaluation -> gate/promote

`alignment-pipeline` runs it all; each stage is also a flow of its own (`prepare-data`, `train-model`,
`evaluate-model`, `compare-models`) so a stage can be run alone from the Prefect UI. Parameters are the
project's pydantic config, so the UI renders them as a form; `config_path` loads a YAML file instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from orpo.config import PipelineConfig, load_config, validate_config
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data
from tasks.promote import gate_and_promote, start_model
from tasks.register import log_evaluation, register_model
from tasks.train import train_model


class PipelineSummary(BaseModel):
    """What one pipeline run produced; printed by `orpo run` and returned to Prefect."""

    run_name: str
    dataset_dir: str
    data_fingerprint: str
    data_counts: dict[str, int]
    train_dir: str
    model_dir: str
    global_step: int
    train_metrics: dict[str, float]
    model_name: str
    model_version: str
    model_uri: str
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, float] = Field(description="Evaluation of the trained model.")
    base_metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation of the model it started from.")
    report_dir: str
    promoted: bool
    decision: str


def effective_config(config: PipelineConfig | dict | None, config_path: str | None) -> PipelineConfig:
    """The config a flow runs with: the YAML file when `config_path` is given, else the form's values."""
    if config_path:
        return load_config(config_path)
    return validate_config(config if config is not None else PipelineConfig(), origin="flow parameters")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().rsplit("/", 1)[-1].removeprefix("builtin:")).strip("-")


def run_name_for(config: PipelineConfig) -> str:
    """The flow run's name (`<model>-<UTC date and time>`): stable across retries of one flow run."""
    if config.run_name:
        return config.run_name
    return flow_run.name or f"{_slug(config.model.name_or_path)}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def train_dir_for(config: PipelineConfig) -> Path:
    """`train.output_dir`, else `<workdir>/train/<run name>`: a retried flow run resumes in the same place."""
    return Path(config.train.output_dir or Path(config.workdir) / "train" / run_name_for(config))


def _flow_run_name() -> str:
    parameters = flow_run.parameters or {}
    config = parameters.get("config")
    model = getattr(getattr(config, "model", None), "name_or_path", None)
    if model is None and isinstance(config, dict):
        model = (config.get("model") or {}).get("name_or_path")
    # The id's head keeps two runs started in the same second apart (their training dirs must differ).
    return f"{_slug(model or 'orpo')}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{str(flow_run.id or '')[:6]}"


def _base_eval_key(context, parameters) -> str:
    config: PipelineConfig = parameters["config"]
    payload = json.dumps(
        {"model": parameters["model_path"], "eval": config.eval.model_dump(mode="json"),
         "dataset": str(parameters["dataset_dir"]), "report": str(Path(parameters["out_dir"]).resolve())},
        sort_keys=True,
    )
    return "evaluate-base-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


# The base model's scores change only when the base model, the eval settings or the data do: nightly runs reuse them.
evaluate_base = evaluate.with_options(name="evaluate-base-model", cache_key_fn=_base_eval_key)


@task(name="resolve-model-path")
def resolve_model_path(config: PipelineConfig, spec: str) -> str:
    """A model spec (hub id, dir, models:/ URI, builtin:...) as a directory or hub id transformers can load."""
    from orpo.models import resolve_model

    return resolve_model(spec, config.model.cache_dir, config.model.revision).path


@flow(name="alignment-pipeline", flow_run_name=_flow_run_name, log_prints=False)
def alignment_pipeline(config: PipelineConfig = PipelineConfig(), config_path: str | None = None) -> PipelineSummary:
    """Prepare data, ORPO-train, register in MLflow, evaluate, and promote the model if it beats the champion."""
    config = effective_config(config, config_path)
    logger = get_run_logger()
    run_name = run_name_for(config)
    workdir = Path(config.workdir)

    data = prepare_data(config)
    start_spec = start_model(config)
    train_config = config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": start_spec})})
    train_dir = train_dir_for(config)
    trained = train_model(train_config, data.dataset_dir, train_dir)
    version = register_model(config, trained.output_dir, data.manifest_path)
    logger.info("registered %s as version %s", version.model_uri, version.version)

    base_path = resolve_model_path(config, start_spec)
    evaluation = evaluate(config, str(trained.model_dir), workdir / "reports" / run_name, data.dataset_dir,
                          base_path, label="model")
    base_metrics: dict[str, float] = {}
    if config.orchestration.evaluate_base_model:
        base_eval = evaluate_base(config, base_path, workdir / "reports" / f"base-{_slug(start_spec)}",
                                  data.dataset_dir, None, label="base")
        base_metrics = base_eval.metrics
    log_evaluation(config, version, evaluation.metrics, evaluation.report_dir)
    decision = gate_and_promote(config, version)

    return PipelineSummary(
        run_name=run_name,
        dataset_dir=str(data.dataset_dir),
        data_fingerprint=data.fingerprint,
        data_counts=data.counts,
        train_dir=str(trained.output_dir),
        model_dir=str(trained.model_dir),
        global_step=trained.global_step,
        train_metrics={k: float(v) for k, v in trained.final_metrics.items() if isinstance(v, (int, float))},
        model_name=version.name,
        model_version=version.version,
        model_uri=version.model_uri,
        mlflow_run_id=version.run_id,
        tracking_uri=config.resolved_tracking_uri(),
        metrics=evaluation.metrics,
        base_metrics=base_metrics,
        report_dir=str(evaluation.report_dir),
        promoted=decision.promoted,
        decision=decision.reason,
    )


@flow(name="prepare-data", flow_run_name=_flow_run_name)
def prepare_data_flow(config: PipelineConfig = PipelineConfig(), config_path: str | None = None) -> str:
    """Binarize the configured source; returns the dataset directory (reused when the data did not change)."""
    return str(prepare_data(effective_config(config, config_path)).dataset_dir)


@flow(name="train-model", flow_run_name=_flow_run_name)
def train_model_flow(config: PipelineConfig = PipelineConfig(), config_path: str | None = None,
                     register: bool = True) -> str:
    """Prepare data (cached), train, and (by default) register; returns the model directory or URI."""
    config = effective_config(config, config_path)
    data = prepare_data(config)
    train_dir = train_dir_for(config)
    trained = train_model(config, data.dataset_dir, train_dir)
    if register:
        return register_model(config, trained.output_dir, data.manifest_path).model_uri
    return str(trained.model_dir)


@flow(name="evaluate-model", flow_run_name=_flow_run_name)
def evaluate_model_flow(model: str, config: PipelineConfig = PipelineConfig(), config_path: str | None = None,
                        dataset_dir: str | None = None) -> dict[str, float]:
    """Evaluate any model (dir, hub id or models:/NAME@alias) with the configured suites; returns the metrics."""
    config = effective_config(config, config_path)
    model_path = resolve_model_path(config, model)
    out_dir = Path(config.workdir) / "reports" / f"{_slug(model)}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    result = evaluate(config, model_path, out_dir, Path(dataset_dir) if dataset_dir else None, None, label="model")
    return result.metrics


@flow(name="compare-models", flow_run_name=_flow_run_name)
def compare_models_flow(config: PipelineConfig = PipelineConfig(), config_path: str | None = None,
                        versions: list[str] | None = None) -> str:
    """Tabulate registered versions against the champion; writes and logs the comparison chart."""
    from prefect.artifacts import create_markdown_artifact

    from orpo.compare import compare_versions

    config = effective_config(config, config_path)
    out_png = Path(config.workdir) / "reports" / "comparison.png"
    table = compare_versions(config, versions, out_png)
    header = "| " + " | ".join(map(str, table.columns)) + " |\n|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    markdown = "\n".join([header, *rows])
    create_markdown_artifact(key="model-comparison", markdown=f"# Registered versions\n\n{markdown}")
    return str(out_png)
