"""The `ablation-study` flow: SFT only vs ORPO (each lambda) vs SFT+DPO on the configured model and data.

    prepare data -> for each seed: SFT, ORPO x lambdas, DPO on top of SFT
                 -> each arm: train (own process) -> register + study tag -> evaluate -> log evaluation
                 -> report (Markdown + figures, MLflow and Prefect artifacts)

Every arm is a version of `<registry.registered_model_name>-ablation` (or `ablation.registered_model_name`)
tagged `ablation.study=<study>`, so the MLflow UI's compare view and `orpo compare` show them side by side.
`quick=True` is `orpo ablate --quick`: one seed, one lambda, a few steps (see orpo.ablation.arms.quick_config).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.pipeline import _flow_run_name, effective_config, run_name_for
from orpo.ablation.arms import KIND_DPO, arm_config, check_study, plan_arms, quick_config, study_model_name
from orpo.ablation.report import collect_outcome
from orpo.ablation.study import study_dir, study_meta
from orpo.config import PipelineConfig
from tasks.ablation import tag_arm, train_arm, write_ablation_report
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data
from tasks.register import log_evaluation, register_model


class AblationSummary(BaseModel):
    """What one study produced; printed by `orpo ablate`."""

    study: str
    report: str
    registered_model_name: str
    versions: dict[str, str]  # arm run name -> models:/NAME/VERSION
    metrics: dict[str, dict[str, float]]  # arm run name -> evaluation metrics
    resources: dict[str, dict]  # arm run name -> resources.json
    wall_seconds: float
    tracking_uri: str


@flow(name="ablation-study", flow_run_name=_flow_run_name, log_prints=False)
def ablation_study(config: PipelineConfig = PipelineConfig(), config_path: str | None = None,
                   quick: bool = False) -> AblationSummary:
    """Train and register SFT, ORPO (each lambda) and SFT+DPO with the same data, seed and steps; report."""
    began = time.perf_counter()
    config = effective_config(config, config_path)
    if quick:
        config = quick_config(config)
    check_study(config)
    logger = get_run_logger()
    study = config.ablation.study or run_name_for(config)
    root = study_dir(config, study)
    data = prepare_data(config)

    outcomes, versions, metrics, resources = [], {}, {}, {}
    sft_dirs: dict[int, Path] = {}
    for arm in plan_arms(config):
        cfg = arm_config(config, arm)
        train_dir = root / "train" / arm.run_name
        sft_dir = sft_dirs[arm.seed] if arm.kind == KIND_DPO else None
        cost = train_arm(cfg, arm, data.dataset_dir, train_dir, sft_dir)
        if arm.name == "sft":
            sft_dirs[arm.seed] = train_dir
        version = register_model(cfg, train_dir, data.manifest_path)
        tag_arm(cfg, version, arm, study, cost)
        eval_dir = root / "eval" / arm.run_name
        evaluation = evaluate.with_options(task_run_name=f"evaluate-{arm.run_name}")(
            cfg, str(train_dir / "model"), eval_dir, data.dataset_dir, None, label=arm.run_name.replace(".", "-"))
        log_evaluation(cfg, version, evaluation.metrics, evaluation.report_dir)
        logger.info("arm %s: %s, %s", arm.run_name, version.model_uri,
                    {k: round(v, 3) for k, v in evaluation.metrics.items() if k.startswith("preference/")})
        outcomes.append(collect_outcome(arm, train_dir, model_uri=version.model_uri, eval_dir=eval_dir,
                                        metrics=evaluation.metrics))
        versions[arm.run_name], metrics[arm.run_name], resources[arm.run_name] = (
            version.model_uri, evaluation.metrics, cost)

    meta = study_meta(config, study, quick=quick, fingerprint=data.fingerprint, counts=data.counts)
    report = write_ablation_report(config, study, outcomes, root / "report", meta)
    return AblationSummary(
        study=study, report=str(report), registered_model_name=study_model_name(config), versions=versions,
        metrics=metrics, resources=resources, wall_seconds=time.perf_counter() - began,
        tracking_uri=config.resolved_tracking_uri(),
    )
