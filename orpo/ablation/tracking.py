"""MLflow for a study: each arm's version and run carry the study tag; the report is logged to a study run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orpo.config import PipelineConfig

TAG_STUDY = "ablation.study"
TAG_ARM = "ablation.arm"
TAG_METHOD = "ablation.method"
TAG_SEED = "ablation.seed"


def tag_arm(config: PipelineConfig, version, arm, study: str, resources: dict[str, Any]) -> None:
    """Study tags on the arm's model version and run, and its measured cost as run metrics."""
    from orpo.registry import configure_mlflow, mlflow_client

    configure_mlflow(config)
    client = mlflow_client()
    tags = {TAG_STUDY: study, TAG_ARM: arm.name, TAG_METHOD: arm.method, TAG_SEED: str(arm.seed)}
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
        client.set_tag(version.run_id, key, value)
    for key in ("train_seconds", "wall_seconds", "peak_memory_mb"):
        if key in resources:
            client.log_metric(version.run_id, f"ablation/{key}", float(resources[key]))


def log_report(config: PipelineConfig, study: str, report_dir: Path) -> str:
    """Log the report directory to one run named after the study (found again on a re-run); returns its id."""
    import mlflow

    from orpo.registry import configure_mlflow, mlflow_client

    configure_mlflow(config)
    client = mlflow_client()
    experiment = client.get_experiment_by_name(config.registry.experiment_name)
    found = client.search_runs([experiment.experiment_id],
                               f"tags.`{TAG_STUDY}` = '{study}' and tags.`orpo.kind` = 'ablation-report'",
                               max_results=1)
    run_id = found[0].info.run_id if found else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"ablation-{study}",
                          nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({TAG_STUDY: study, "orpo.kind": "ablation-report"})
        mlflow.log_artifacts(str(report_dir), "ablation_report")
        return run.info.run_id


def arm_model_uris(config: PipelineConfig, study: str) -> dict[str, str]:
    """`<arm>-seed<N>` -> models:/NAME/VERSION of the study's registered arms (the latest one per arm)."""
    from orpo.ablation.arms import study_model_name
    from orpo.registry import configure_mlflow, mlflow_client

    configure_mlflow(config)
    name = study_model_name(config)
    found = mlflow_client().search_model_versions(f"name = '{name}' and tags.`{TAG_STUDY}` = '{study}'")
    uris: dict[str, str] = {}
    for version in sorted(found, key=lambda v: int(v.version)):
        uris[f"{version.tags.get(TAG_ARM)}-seed{version.tags.get(TAG_SEED)}"] = f"models:/{name}/{version.version}"
    return uris
