"""Prefect tasks: register the trained model in MLflow, attach evaluation results, and find a version
already trained from the same inputs."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel, Field

from orpo import registry
from orpo.config import PipelineConfig
from orpo.gate import TAG_DECISION
from orpo.registry import RegisteredVersion
from orpo.run_identity import RunInputs
from tasks.common import retry_on_transient


class TrainedVersion(BaseModel):
    """A version already trained from a run's inputs, and whether the gate has decided on it."""

    version: RegisteredVersion
    gated: bool = Field(description="It carries a gate decision; False: the run that registered it stopped before "
                                    "its gate (evaluation or judge failed), so it still needs evaluating and gating.")


@task(name="find-unchanged-version", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def find_unchanged(config: PipelineConfig, inputs: RunInputs) -> TrainedVersion | None:
    """The version already trained from exactly these inputs, or None."""
    found = registry.find_version_with_inputs(config, inputs)
    if found is None:
        return None
    return TrainedVersion(version=RegisteredVersion.existing(found), gated=TAG_DECISION in (found.tags or {}))


@task(name="register-model", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def register_model(config: PipelineConfig, train_dir: Path, data_manifest: Path | None,
                   inputs: RunInputs | None = None) -> RegisteredVersion:
    """Log the training run and register its export as a new version (alias `challenger`). Idempotent."""
    return registry.register_training_run(config, train_dir, data_manifest=data_manifest, run_inputs=inputs)


@task(name="log-evaluation", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def log_evaluation(config: PipelineConfig, version: RegisteredVersion, metrics: dict[str, float],
                   report_dir: Path | None) -> None:
    """Attach evaluation metrics and the report to the version's MLflow run and tags."""
    registry.log_evaluation(config, version, metrics, report_dir)
