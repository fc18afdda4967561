"""Prefect task: ORPO training, as an `accelerate launch` subprocess (so one flow can drive many GPUs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency

from orpo import registry
from orpo.config import PipelineConfig, dump_config
from orpo.handoffs import RESOLVED_CONFIG, TrainResult, read_train_result
from orpo.memory import training_environment
from orpo.models import PinnedModel, pin_model
from orpo.train import train
from tasks.common import retry_on_transient, stream_subprocess


# One slot: two training runs never share a machine, whichever deployment started them (see flows/deploy.py).
TRAINING_CONCURRENCY_LIMIT = "orpo-training"


class TrainingFailed(RuntimeError):
    """The training subprocess exited non-zero; the message carries the tail of its log."""


def accelerate_command(config: PipelineConfig, config_file: Path, dataset_dir: Path, output_dir: Path) -> list[str]:
    """The `accelerate launch` command line for this config (the same one the README documents)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.train.accelerate_config:
        command += ["--config_file", config.train.accelerate_config]
    else:
        # No accelerate config: one process, on the GPU when there is one.
        command += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", config.train.mixed_precision,
                    "--dynamo_backend", "no"]
    command += ["-m", "orpo.train", "--config", str(config_file), "--dataset-dir", str(dataset_dir),
                "--output-dir", str(output_dir)]
    return command


@task(name="resolve-start-model", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def resolve_start_model(config: PipelineConfig) -> PinnedModel:
    """The model training starts from, pinned to one version and fetched once (every later stage uses it).

    `orchestration.start_from: champion` pins `models:/NAME@champion` to `models:/NAME/N` (the base model
    while there is no champion); a hub id is pinned to its commit.
    """
    logger = get_run_logger()
    spec = config.model.name_or_path
    if config.orchestration.start_from == "champion":
        spec = registry.champion_uri(config) or spec  # champion_uri also points MLflow at the store
    else:
        registry.configure_mlflow(config)
    pinned = pin_model(spec, config.model.cache_dir, config.model.revision)
    logger.info("start model %s -> %s (%s)", spec, pinned.pinned, pinned.path)
    return pinned


def training_config(config: PipelineConfig, start: PinnedModel) -> PipelineConfig:
    """`config` training from the pinned start model (a version, never a moving alias)."""
    model = config.model.model_copy(update={"name_or_path": start.pinned, "revision": start.revision})
    return config.model_copy(update={"model": model})


def _training_markdown(result: TrainResult) -> str:
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in sorted(result.final_metrics.items())
                     if isinstance(value, (int, float)))
    return (
        f"# Training summary\n\n- base model: `{result.base_model}`\n- steps: {result.global_step}\n"
        f"- {'LoRA adapter' if result.is_lora else 'full fine-tune'}: `{result.model_dir}`\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


@task(name="train-model", persist_result=True)
def train_model(config: PipelineConfig, dataset_dir: Path, output_dir: Path) -> TrainResult:
    """Train, resuming from the latest checkpoint in `output_dir` if an earlier attempt died."""
    logger = get_run_logger()
    output_dir.mkdir(parents=True, exist_ok=True)
    with concurrency(TRAINING_CONCURRENCY_LIMIT, occupy=1, strict=False):
        result = _train(config, dataset_dir, output_dir, logger)
    create_markdown_artifact(key="training-summary", markdown=_training_markdown(result),
                             description="ORPO training summary")
    return result


def _train(config: PipelineConfig, dataset_dir: Path, output_dir: Path, logger) -> TrainResult:
    if config.orchestration.launch_with_accelerate:
        config_file = dump_config(config, output_dir / RESOLVED_CONFIG)
        command = accelerate_command(config, config_file, dataset_dir, output_dir)
        logger.info("launching: %s", " ".join(command))
        # The subprocess resolves a models:/NAME/N start model in the same registry (and finds it cached), and
        # gets the allocator settings of orpo.memory.
        env = training_environment({**os.environ, "PYTHONUNBUFFERED": "1",
                                    "MLFLOW_TRACKING_URI": config.resolved_tracking_uri()})
        code, tail = stream_subprocess(command, logger, env=env, timeout_s=config.orchestration.train_timeout_s)
        if code != 0:
            raise TrainingFailed(
                f"training exited with code {code}; re-running the flow resumes from the last checkpoint in "
                f"{output_dir}/checkpoints. Last lines:\n" + "\n".join(tail)
            )
        return read_train_result(output_dir)
    return train(config, dataset_dir, output_dir)
