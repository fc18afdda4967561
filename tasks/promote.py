"""Prefect tasks: the champion/challenger gate, and choosing the model to start training from."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from orpo import registry
from orpo.config import PipelineConfig
from orpo.gate import GateDecision, promote
from orpo.registry import RegisteredVersion
from tasks.common import retry_on_transient


def _version_url(config: PipelineConfig, version: RegisteredVersion) -> str | None:
    uri = config.resolved_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None  # a local sqlite store has no web address; `orpo ui` serves it
    return f"{uri.rstrip('/')}/#/models/{version.name}/versions/{version.version}"


def _decision_markdown(decision: GateDecision, version: RegisteredVersion, url: str | None) -> str:
    verdict = "promoted to **champion**" if decision.promoted else "**not promoted**"
    lines = [
        f"# Promotion decision: version {version.version} {verdict}",
        "",
        f"{decision.reason}",
        "",
        f"- model version: `{version.model_uri}`" + (f" ([in MLflow]({url}))" if url else ""),
        f"- champion before: {decision.champion_version or 'none'}",
        "",
        "| metric | challenger | champion | delta | rule | passed |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in decision.compared.items():
        lines.append(
            f"| {name} | {row.get('challenger')} | {row.get('champion')} | {row.get('delta')} | "
            f"{row.get('rule', '')} | {row.get('passed')} |"
        )
    return "\n".join(lines)


@task(name="promote-model", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def gate_and_promote(config: PipelineConfig, version: RegisteredVersion) -> GateDecision:
    """Move `champion` to the challenger if the gate passes; record the decision on the version."""
    decision = promote(config, version)
    create_markdown_artifact(
        key="promotion-decision",
        markdown=_decision_markdown(decision, version, _version_url(config, version)),
        description="Champion/challenger gate",
    )
    return decision


@task(name="resolve-start-model", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_on_transient)
def start_model(config: PipelineConfig) -> str:
    """The model spec to train from: the base model, or the current champion when configured and present."""
    if config.orchestration.start_from == "champion":
        uri = registry.champion_uri(config)
        if uri:
            return uri
    return config.model.name_or_path
