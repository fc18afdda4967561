"""Deployments of the pipeline, served by one long-running process (`orpo deploy`).

- `nightly-alignment`: the whole pipeline on a cron schedule (default 02:00 UTC);
- `on-demand`: the same flow without a schedule, to trigger from the UI with the parameter form;
- one deployment per stage flow (`prepare-data`, `train-model`, `evaluate-model`, `compare-models`).

Two training runs never overlap on one machine: every training task takes the one slot of the global
concurrency limit `orpo-training` (created here), whichever deployment started it. Teams with a work pool use
`prefect.yaml` and `prefect worker start` instead of serving.

    python -m flows.deploy --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import logging

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.schedules import Cron

from flows.pipeline import (
    alignment_pipeline,
    compare_models_flow,
    evaluate_model_flow,
    prepare_data_flow,
    train_model_flow,
)
from orpo.config import PipelineConfig, load_config
from tasks.train import TRAINING_CONCURRENCY_LIMIT

log = logging.getLogger(__name__)

NIGHTLY = "nightly-alignment"
ON_DEMAND = "on-demand"


def ensure_training_limit() -> None:
    """Create the global concurrency limit that serializes training runs (one slot), if missing."""
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=TRAINING_CONCURRENCY_LIMIT, limit=1)
            )
        except ObjectAlreadyExists:
            pass


def build_deployments(config: PipelineConfig, config_path: str | None = None) -> list:
    """The RunnerDeployments to serve.

    The nightly run reads `config_path` at run time, so edits to the file apply from the next night on. The
    on-demand deployments carry the config as their parameter defaults, so the UI form shows, and runs, it.
    """
    nightly_parameters = {"config": config.model_dump(mode="json"), "config_path": config_path, "force": False}
    parameters = {"config": config.model_dump(mode="json"), "config_path": None}
    # A run whose inputs match a registered version is skipped, from the schedule or the UI, unless forced.
    pipeline_parameters = {**parameters, "force": False}
    tags = list(config.orchestration.tags)
    schedule = Cron(config.orchestration.cron, timezone=config.orchestration.timezone)
    return [
        alignment_pipeline.to_deployment(
            name=NIGHTLY, schedule=schedule, parameters=nightly_parameters, tags=[*tags, "nightly"],
            description=f"The whole pipeline, nightly ({config.orchestration.cron} {config.orchestration.timezone}).",
            concurrency_limit=1,
        ),
        alignment_pipeline.to_deployment(
            name=ON_DEMAND, parameters=pipeline_parameters, tags=[*tags, "on-demand"],
            description="The whole pipeline, when you click Run (skipped when nothing changed; tick force to "
            "train anyway).",
        ),
        prepare_data_flow.to_deployment(name=ON_DEMAND, parameters=parameters, tags=tags),
        train_model_flow.to_deployment(name=ON_DEMAND, parameters=parameters, tags=tags),
        evaluate_model_flow.to_deployment(
            name=ON_DEMAND, parameters={**parameters, "model": f"models:/{config.registry.registered_model_name}@champion"},
            tags=tags,
        ),
        compare_models_flow.to_deployment(name=ON_DEMAND, parameters=parameters, tags=tags),
    ]


def serve_deployments(config: PipelineConfig, config_path: str | None = None) -> None:
    """Register the deployments with the Prefect API and run their flows as they are scheduled (blocks)."""
    ensure_training_limit()
    serve(*build_deployments(config, config_path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config the deployments run with (default: built-in defaults)")
    args = parser.parse_args(argv)
    serve_deployments(load_config(args.config), config_path=args.config)


if __name__ == "__main__":
    main()
