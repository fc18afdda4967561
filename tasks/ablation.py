"""Prefect tasks of the ablation study: train one arm (a subprocess), tag its version, write the report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from orpo.ablation.arms import Arm
from orpo.ablation.report import ArmOutcome, write_report
from orpo.ablation.timeline import RESOURCES_JSON, read_resources
from orpo.config import PipelineConfig, dump_config
from orpo.registry import TRAIN_RESULT, RegisteredVersion
from tasks.common import retry_on_transient, stream_subprocess


class ArmTrainingFailed(RuntimeError):
    """An arm's training subprocess exited non-zero; the message carries the tail of its log."""


@task(name="train-arm", task_run_name="train-{arm.run_name}")
def train_arm(config: PipelineConfig, arm: Arm, dataset_dir: Path, train_dir: Path,
              sft_dir: Path | None = None) -> dict:
    """Train one arm in its own process (so its peak memory is its own); a finished arm is not retrained."""
    logger = get_run_logger()
    if (train_dir / TRAIN_RESULT).is_file() and (train_dir / RESOURCES_JSON).is_file():
        logger.info("%s already trained in %s; reusing it", arm.run_name, train_dir)
        return read_resources(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    config_file = dump_config(config, train_dir / "arm_config.yaml")
    command = [sys.executable, "-m", "orpo.ablation.train_arm", "--config", str(config_file),
               "--dataset-dir", str(dataset_dir), "--output-dir", str(train_dir)]
    if sft_dir is not None:
        command += ["--sft-dir", str(sft_dir)]
    logger.info("training arm %s: %s", arm.run_name, " ".join(command))
    code, tail = stream_subprocess(command, logger, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   timeout_s=config.ablation.arm_timeout_s)
    if code != 0:
        raise ArmTrainingFailed(f"arm {arm.run_name} exited with code {code}; last lines:\n" + "\n".join(tail))
    return read_resources(train_dir)


@task(name="tag-arm", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def tag_arm(config: PipelineConfig, version: RegisteredVersion, arm: Arm, study: str, resources: dict) -> None:
    """The study tag (and arm, method, seed) on the arm's version and run; its cost as run metrics."""
    from orpo.ablation.tracking import tag_arm as tag

    tag(config, version, arm, study, resources)


@task(name="write-ablation-report")
def write_ablation_report(config: PipelineConfig, study: str, outcomes: list[ArmOutcome], out_dir: Path,
                          meta: dict) -> Path:
    """report.md + figures, logged to MLflow (the study's run) and as a Prefect artifact."""
    from orpo.ablation.tracking import log_report

    report = write_report(outcomes, out_dir, meta, config.ablation.target_accuracy)
    run_id = log_report(config, study, out_dir)
    get_run_logger().info("ablation report %s (MLflow run %s)", report, run_id)
    create_markdown_artifact(key="ablation-report", markdown=report.read_text(encoding="utf-8"),
                             description=f"Ablation study {study}")
    return report


def read_summary(report: Path) -> dict:
    return json.loads((report.parent / "report.json").read_text(encoding="utf-8"))["summary"]
