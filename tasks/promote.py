"""Prefect tasks: the champion/challenger gate, and choosing the model to start training from."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from orpo.config import PipelineConfig
from orpo.gate import GateDecision, decision_markdown, promote
from orpo.registry import RegisteredVersion
from tasks.common import retry_on_transient
from tasks.evaluate import judge_api_key


def _version_url(config: PipelineConfig, version: RegisteredVersion) -> str | None:
    uri = config.resolved_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None  # a local sqlite store has no web address; `orpo ui` serves it
    return f"{uri.rstrip('/')}/#/models/{version.name}/versions/{version.version}"


def _decision_markdown(decision: GateDecision, version: RegisteredVersion, url: str | None) -> str:
    verdict = {"promoted": "promoted to **champion**", "no significant difference": "kept: **no significant "
               "difference**"}.get(decision.label, f"**{decision.label}**, not promoted")
    lines = [
        f"# Promotion decision: version {version.version} {verdict}",
        "",
        f"- model version: `{version.model_uri}`" + (f" ([in MLflow]({url}))" if url else ""),
        f"- champion before: {decision.champion_version or 'none'}",
        f"- compared with: {decision.opponent or 'nothing (registry.gate.first_version: promote)'}",
    ]
    if decision.chart:
        lines.append(f"- chart of the intervals: `{decision.chart}` (also in the run's `gate/` artifacts)")
    return "\n".join([*lines, "", decision_markdown(decision)])


@task(name="promote-model", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def gate_and_promote(config: PipelineConfig, version: RegisteredVersion,
                     start_report_dir: Path | None = None) -> GateDecision:
    """Move `champion` to the challenger if the gate passes; record the decision on the version.

    `start_report_dir`: the start model's evaluation directory, drawn in the decision's chart when given; with
    no champion yet it is what the version must beat (`registry.gate.first_version`), and without it such a
    version stays challenger.
    """
    decision = promote(config, version, api_key=judge_api_key(config), start_report_dir=start_report_dir)
    create_markdown_artifact(
        key="promotion-decision",
        markdown=_decision_markdown(decision, version, _version_url(config, version)),
        description="Champion/challenger gate",
    )
    return decision

