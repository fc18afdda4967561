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
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from evals.run import EvalResult
from orpo.config import PipelineConfig, load_config, validate_config
from orpo.data.binarize import PreparedDataset
from orpo.models import PinnedModel
from orpo.run_identity import PROJECT_ROOT, RunInputs, run_inputs, source_digest
from tasks.evaluate import evaluate
from tasks.prepare import SeenShards, prepare_data, shards_seen_by
from tasks.promote import gate_and_promote
from tasks.register import find_unchanged, log_evaluation, register_model
from tasks.train import resolve_start_model, train_model, training_config


class PipelineSummary(BaseModel):
    """What one pipeline run produced; printed by `orpo run` and returned to Prefect.

    A skipped run (`unchanged_since` set) trained, registered and evaluated nothing: the training fields
    stay empty and `model_version` names the version that already holds these inputs.
    """

    run_name: str
    dataset_dir: str
    data_fingerprint: str
    data_counts: dict[str, int]
    start_model: str = Field("", description="The pinned model training started from (models:/NAME/N, hub id...).")
    run_inputs_key: str = Field("", description="The key of the run's inputs (version tag `run_inputs`).")
    unchanged_since: str | None = Field(None, description="Set when skipped: the version with the same inputs.")
    train_dir: str = ""
    model_dir: str = ""
    global_step: int = 0
    train_metrics: dict[str, float] = Field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    model_uri: str = ""
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation of the trained model.")
    base_metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation of the model it started from.")
    report_dir: str = ""
    promoted: bool = False
    decision: str = ""


def effective_config(config: PipelineConfig | dict | None, config_path: str | None) -> PipelineConfig:
    """The config a flow runs with: the YAML file when `config_path` is given, else the form's values."""
    if config_path:
        return load_config(config_path)
    return validate_config(config if config is not None else PipelineConfig(), origin="flow parameters")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().rsplit("/", 1)[-1].removeprefix("builtin:")).strip("-")


def _spec_slug(spec: str) -> str:
    """A whole pinned spec as a directory name: `models:/tiny-orpo/1` -> `models-tiny-orpo-1`."""
    return re.sub(r"[^a-z0-9]+", "-", spec.lower()).strip("-")


def run_name_for(config: PipelineConfig) -> str:
    """The flow run's name (`<model>-<UTC date and time>`): stable across retries of one flow run."""
    if config.run_name:
        return config.run_name
    return flow_run.name or f"{_slug(config.model.name_or_path)}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def train_dir_for(config: PipelineConfig, inputs: RunInputs | None = None) -> Path:
    """`train.output_dir`, else `<workdir>/train/<run name>`: a retried flow run resumes in the same place.

    With the run's `inputs` (and no run_name), `<workdir>/train/<model>-<inputs key>`: any later run of the same
    inputs, such as the next night after one whose training died, resumes its checkpoints instead of starting
    over (a checkpoint of other inputs is never resumed: orpo.train refuses it).
    """
    if config.train.output_dir:
        return Path(config.train.output_dir)
    if inputs is not None and not config.run_name:
        return Path(config.workdir) / "train" / f"{_slug(config.model.name_or_path)}-{inputs.key[:12]}"
    return Path(config.workdir) / "train" / run_name_for(config)


def _flow_run_name() -> str:
    parameters = flow_run.parameters or {}
    config = parameters.get("config")
    model = getattr(getattr(config, "model", None), "name_or_path", None)
    if model is None and isinstance(config, dict):
        model = (config.get("model") or {}).get("name_or_path")
    # The id's head keeps two runs started in the same second apart (their training dirs must differ).
    return f"{_slug(model or 'orpo')}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{str(flow_run.id or '')[:6]}"


def _base_eval_key(context, parameters) -> str:
    """The base model's scores change only with the model's version, the eval settings, the test data or the
    code that computes them.

    `model_path` is the pinned start model's cache directory (or hub id; its commit is in the config's
    model.revision), stable across nights, so yesterday's base evaluation is reused. The code is the
    project's packages' files (`source_digest`): evaluation runs through `evals` and much of `orpo`
    (loading, chat templates, log-probs), and a gate must not compare a challenger scored by today's code
    with a start model scored by last month's. A commit that touches only docs or tests keeps the key.
    """
    config: PipelineConfig = parameters["config"]
    payload = json.dumps(
        {"model": parameters["model_path"], "revision": config.model.revision,
         "eval": config.eval.model_dump(mode="json"), "dataset": str(parameters["dataset_dir"]),
         "report": str(Path(parameters["out_dir"]).resolve()), "code": source_digest(PROJECT_ROOT)},
        sort_keys=True,
    )
    return "evaluate-base-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


# The base model's scores change only when the base model, the eval settings, the data or the code do: nightly
# runs reuse them.
evaluate_base = evaluate.with_options(name="evaluate-base-model", cache_key_fn=_base_eval_key)


@task(name="resolve-model-path")
def resolve_model_path(config: PipelineConfig, spec: str) -> str:
    """A model spec (hub id, dir, models:/ URI, builtin:...) as a directory or hub id transformers can load."""
    from orpo.models import resolve_model

    return resolve_model(spec, config.model.cache_dir, config.model.revision).path


@task(name="run-inputs")
def identify_run(config: PipelineConfig, data_fingerprint: str, start: PinnedModel) -> RunInputs:
    """The run's inputs (data fingerprint, semantic config hash, pinned start model, code revision)."""
    return run_inputs(config, data_fingerprint, start.identity)


def _unchanged_markdown(version: str, inputs: RunInputs, config: PipelineConfig) -> str:
    name = config.registry.registered_model_name
    return "\n".join([
        f"# Unchanged since version {version}",
        "",
        f"`models:/{name}/{version}` was trained from exactly these inputs, so this run trained, registered "
        "and evaluated nothing. Run with `force: true` (`orpo run --force`) to train anyway.",
        "",
        "| input | value |",
        "|---|---|",
        f"| data fingerprint | `{inputs.data_fingerprint}` |",
        f"| config hash (fields that change the model) | `{inputs.config_hash}` |",
        f"| start model | `{inputs.start_model}` |",
        f"| code revision | `{inputs.code_revision}` |",
        f"| run inputs key (version tag `run_inputs`) | `{inputs.key}` |",
    ])


def _no_new_shards_markdown(seen: SeenShards, config: PipelineConfig) -> str:
    return "\n".join([
        f"# Unchanged since version {seen.version}",
        "",
        f"`data.incremental` trains only on shards the start model `models:/"
        f"{config.registry.registered_model_name}/{seen.version}` has not seen, and every shard of "
        f"`{config.data.source}` ({len(seen.seen)} seen) was in its data: nothing was trained, registered or "
        "evaluated. Run with `force: true` to train on all shards anyway.",
    ])


def _evaluate_start_model(config: PipelineConfig, start: PinnedModel, dataset_dir: Path) -> EvalResult:
    """The start model's evaluation, cached while its version, settings and data are unchanged."""
    pinned_config = config.model_copy(update={"model": config.model.model_copy(update={"revision": start.revision})})
    out_dir = Path(config.workdir) / "reports" / f"base-{_spec_slug(start.pinned)}"
    return evaluate_base(pinned_config, start.path, out_dir, dataset_dir, None, label="base")


def _summary_of_inputs(config: PipelineConfig, run_name: str, start: PinnedModel,
                       data: PreparedDataset | None, inputs: RunInputs | None) -> dict:
    return dict(
        run_name=run_name, dataset_dir=str(data.dataset_dir) if data else "",
        data_fingerprint=data.fingerprint if data else "", data_counts=data.counts if data else {},
        start_model=start.pinned, run_inputs_key=inputs.key if inputs else "",
        tracking_uri=config.resolved_tracking_uri(), model_name=config.registry.registered_model_name,
    )


def _skipped(config: PipelineConfig, run_name: str, start: PinnedModel, version: str, markdown: str, why: str,
             data: PreparedDataset | None = None, inputs: RunInputs | None = None) -> PipelineSummary:
    """A run with nothing new to learn: completes with an `unchanged` artifact, having trained nothing."""
    get_run_logger().info("%s: nothing to train (force: true trains anyway)", why)
    create_markdown_artifact(key="unchanged", markdown=markdown, description=f"Unchanged since version {version}")
    return PipelineSummary(
        **_summary_of_inputs(config, run_name, start, data, inputs), unchanged_since=version,
        model_version=version, model_uri=f"models:/{config.registry.registered_model_name}/{version}",
        decision=f"skipped: {why}",
    )


@flow(name="alignment-pipeline", flow_run_name=_flow_run_name, log_prints=False)
def alignment_pipeline(config: PipelineConfig = PipelineConfig(), config_path: str | None = None,
                       force: bool = False) -> PipelineSummary:
    """Prepare data, ORPO-train, register in MLflow, evaluate, and promote the model if it beats the champion.

    When a registered version was already trained from the same inputs (data, config, start model, code),
    nothing is trained: the run completes with an "unchanged" artifact, unless `force` is true. A version
    with these inputs but no gate decision (its run stopped after registering it) is evaluated and gated.
    """
    config = effective_config(config, config_path)
    logger = get_run_logger()
    run_name = run_name_for(config)
    workdir = Path(config.workdir)

    start = resolve_start_model(config)
    seen = shards_seen_by(config, start)
    if seen.version is not None and not seen.new and not force:
        return _skipped(config, run_name, start, seen.version, _no_new_shards_markdown(seen, config),
                        f"no new shard since version {seen.version}")
    data = prepare_data(config, seen.seen if seen.new else None)
    inputs = identify_run(config, data.fingerprint, start)
    same = find_unchanged(config, inputs)
    if same is not None and same.gated and not force:
        number = same.version.version
        return _skipped(config, run_name, start, number, _unchanged_markdown(number, inputs, config),
                        f"inputs unchanged since version {number}", data=data, inputs=inputs)
    if same is not None and force:
        logger.info("inputs unchanged since version %s, but the run is forced", same.version.version)
    summary = _summary_of_inputs(config, run_name, start, data, inputs)

    trained = None
    if same is not None and not force:
        # Registered from these inputs by a run that stopped before its gate: finish that run's work (evaluate,
        # gate) instead of skipping it as unchanged every night, or training it again.
        version = same.version
        logger.info("version %s was trained from these inputs but never gated; evaluating and gating it",
                    version.version)
        model_path = resolve_model_path(config, version.model_uri)
    else:
        # A forced run trains afresh in its own directory; otherwise the inputs name it, so a died run resumes.
        train_dir = train_dir_for(config, None if force else inputs)
        trained = train_model(training_config(config, start), data.dataset_dir, train_dir)
        version = register_model(config, trained.output_dir, data.manifest_path, inputs)
        logger.info("registered %s as version %s", version.model_uri, version.version)
        model_path = str(trained.model_dir)

    # The start model is scored once, by its own (cached) evaluation: not again inside the model's.
    evaluation = evaluate(config, model_path, workdir / "reports" / run_name, data.dataset_dir, None, label="model")
    metrics = dict(evaluation.metrics)
    base_metrics: dict[str, float] = {}
    base_report_dir: Path | None = None
    if config.orchestration.evaluate_base_model:
        base_eval = _evaluate_start_model(config, start, data.dataset_dir)
        base_metrics, base_report_dir = base_eval.metrics, base_eval.report_dir
        metrics.update({f"preference/base_{name}": base_metrics[f"preference/{name}"]
                        for name in ("accuracy", "margin") if f"preference/{name}" in base_metrics})
    log_evaluation(config, version, metrics, evaluation.report_dir)
    decision = gate_and_promote(config, version, start_report_dir=base_report_dir)

    return PipelineSummary(
        **summary,
        train_dir=str(trained.output_dir) if trained else "",
        model_dir=str(trained.model_dir) if trained else model_path,
        global_step=trained.global_step if trained else 0,
        train_metrics={k: float(v) for k, v in trained.final_metrics.items() if isinstance(v, (int, float))}
        if trained else {},
        model_version=version.version,
        model_uri=version.model_uri,
        mlflow_run_id=version.run_id,
        metrics=metrics,
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
