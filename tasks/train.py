"""Prefect task: ORPO training, as an `accelerate launch` subprocess (so one flow can drive many GPUs)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency

from orpo.config import PipelineConfig, dump_config
from orpo.memory import training_environment
from orpo.train import TrainResult, train
from tasks.common import stream_subprocess


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
        config_file = dump_config(config, output_dir / "pipeline_config.yaml")
        command = accelerate_command(config, config_file, dataset_dir, output_dir)
        logger.info("launching: %s", " ".join(command))
        env = training_environment({**os.environ, "PYTHONUNBUFFERED": "1"})  # allocator settings: orpo.memory
        code, tail = stream_subprocess(command, logger, env=env, timeout_s=config.orchestration.train_timeout_s)
        if code != 0:
            raise TrainingFailed(
                f"training exited with code {code}; re-running the flow resumes from the last checkpoint in "
                f"{output_dir}/checkpoints. Last lines:\n" + "\n".join(tail)
            )
        return TrainResult.from_json(json.loads((output_dir / "train_result.json").read_text()))
    return train(config, dataset_dir, output_dir)
