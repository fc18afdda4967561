"""A study on disk: where its arms live, and its report rebuilt from what finished.

    <workdir>/ablation/<study>/train/<arm>-seed<N>/   the arm's export, metrics.jsonl, timeline.jsonl, resources.json
    <workdir>/ablation/<study>/eval/<arm>-seed<N>/    its evaluation (report.json, diversity_samples.json)
    <workdir>/ablation/<study>/report/                report.md, report.json, figures

`rebuild_report` re-renders the report from those directories and the registry (`orpo ablate --report-only`),
for a study stopped before its last arm or after a change to the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from orpo.ablation.arms import plan_arms
from orpo.ablation.report import ArmOutcome, collect_outcome, write_report
from orpo.config import ConfigError, PipelineConfig

log = logging.getLogger(__name__)


def study_dir(config: PipelineConfig, study: str) -> Path:
    return Path(config.workdir) / "ablation" / study


def finished_outcomes(config: PipelineConfig, study: str, model_uris: dict[str, str] | None = None) -> list[ArmOutcome]:
    """Every planned arm that was trained and evaluated, in plan order; the others are skipped with a log line."""
    root = study_dir(config, study)
    outcomes = []
    for arm in plan_arms(config):
        train_dir, eval_dir = root / "train" / arm.run_name, root / "eval" / arm.run_name
        evaluation = eval_dir / "report.json"
        if not (train_dir / "resources.json").is_file() or not evaluation.is_file():
            log.info("%s has not finished (no %s or %s); left out of the report", arm.run_name,
                     train_dir / "resources.json", evaluation)
            continue
        metrics = json.loads(evaluation.read_text(encoding="utf-8")).get("metrics", {})
        outcomes.append(collect_outcome(arm, train_dir, model_uri=(model_uris or {}).get(arm.run_name, ""),
                                        eval_dir=eval_dir, metrics=metrics))
    return outcomes


def rebuild_report(config: PipelineConfig, meta: dict[str, Any]) -> Path:
    """Re-render `ablation.study`'s report from its directories and its registered versions; logs it to MLflow."""
    from orpo.ablation.tracking import arm_model_uris, log_report

    study = config.ablation.study
    if not study:
        raise ConfigError("set ablation.study to the study whose report to rebuild (see <workdir>/ablation/)")
    if not study_dir(config, study).is_dir():
        raise ConfigError(f"no study {study!r} under {study_dir(config, study).parent}; check ablation.study and workdir")
    outcomes = finished_outcomes(config, study, arm_model_uris(config, study))
    if not outcomes:
        raise ConfigError(f"study {study!r} has no trained and evaluated arm yet")
    out_dir = study_dir(config, study) / "report"
    report = write_report(outcomes, out_dir, {"study": study, **meta}, config.ablation.target_accuracy)
    log_report(config, study, out_dir)
    return report


def study_meta(config: PipelineConfig, study: str, *, quick: bool, fingerprint: str = "",
               counts: dict[str, int] | None = None) -> dict[str, str]:
    """The report's header: what was trained, on what, with which budget.

    Without a fingerprint, the prepared dataset's manifest (if it is still on disk) supplies it and the counts.
    """
    import platform

    from orpo.ablation.arms import study_model_name
    from orpo.data.binarize import default_dataset_dir

    dataset_dir = default_dataset_dir(config.data, config.workdir, chat_template=config.model.chat_template)
    manifest = dataset_dir / "manifest.json"
    if not fingerprint and manifest.is_file():
        prepared = json.loads(manifest.read_text(encoding="utf-8"))
        fingerprint, counts = prepared.get("fingerprint", ""), counts or prepared.get("counts")

    train, ablation = config.train, config.ablation
    split = ", ".join(f"{k} {v}" for k, v in sorted((counts or {}).items()) if k in ("train", "test"))
    return {
        "study": study,
        "model": f"`{config.model.name_or_path}`",
        "data": f"`{config.data.source}` (recipe {config.data.recipe}"
                + (f", fingerprint `{fingerprint[:12]}`" if fingerprint else "") + (f", {split}" if split else "") + ")",
        "budget": f"{train.max_steps} steps per arm (DPO phase {ablation.dpo_max_steps or train.max_steps}), "
                  f"batch {train.per_device_batch_size} x {train.gradient_accumulation_steps}, lr {train.learning_rate:g} "
                  f"({train.lr_scheduler}), max_length {train.max_length}, "
                  + (f"LoRA r{train.lora.r}" if train.lora.enabled else "full fine-tuning"),
        "seeds": ", ".join(map(str, ablation.seeds)),
        "ORPO lambdas": ", ".join(f"{v:g}" for v in ablation.orpo_lambdas),
        "DPO": f"TRL DPOTrainer, beta {ablation.dpo_beta:g}, frozen copy of the SFT model as reference",
        "registered model": f"`{study_model_name(config)}` (tag `ablation.study={study}`)",
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "quick": str(quick).lower(),
    }
