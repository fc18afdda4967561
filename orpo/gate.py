"""The champion/challenger promotion gate.

`decide` is the rule itself: a pure function over two flat metric dicts and the `GateConfig`, easy to
test and to explain. `promote` is the MLflow side: it reads the challenger's and the champion's metrics
from their runs, calls `decide`, moves the `champion` alias when the challenger passes, and records the
decision with the compared numbers as tags on the challenger's version, so its page says whether it beat
the champion and by how much.

The rules (each skipped when either side lacks the metric, unless `require_metrics` is set):

- MT-Bench:  challenger `mt_bench/score` >= champion's + `min_mt_bench_delta`
- AlpacaEval: challenger `alpaca/win_rate` >= champion's - `max_win_rate_drop` (points)
- preference: challenger `preference/accuracy` >= champion's - `max_preference_accuracy_drop`

With a champion, at least one rule must actually be compared: a challenger that shares no gated metric
with the champion is not known to be better, so it stays a challenger. With no champion, the first
version that passes (it has the required metrics, when they are required) becomes champion.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orpo.config import GateConfig, PipelineConfig
    from orpo.registry import RegisteredVersion

log = logging.getLogger(__name__)

MT_BENCH_SCORE = "mt_bench/score"
ALPACA_WIN_RATE = "alpaca/win_rate"
PREFERENCE_ACCURACY = "preference/accuracy"
GATED_METRICS = (MT_BENCH_SCORE, ALPACA_WIN_RATE, PREFERENCE_ACCURACY)

# Scores come back through float parsing and JSON; an exact tie must not fail on a last-bit difference.
_TOLERANCE = 1e-9

# Version tags written by `promote`.
TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_AGAINST = "gate.champion_version"
TAG_COMPARED = "gate.compared"


@dataclass(frozen=True)
class GateDecision:
    """The outcome of one gate: promoted or not, why, and every number that was compared."""

    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None
    # metric -> {"challenger": x, "champion": y, "delta": x - y, "rule": "...", "passed": bool}
    compared: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class _Rule:
    metric: str
    # The challenger must reach champion + offset; offset is negative for an allowed drop.
    offset: float
    text: str


def _rules(gate: GateConfig) -> list[_Rule]:
    return [
        _Rule(MT_BENCH_SCORE, gate.min_mt_bench_delta, f"challenger >= champion + {gate.min_mt_bench_delta:g}"),
        _Rule(ALPACA_WIN_RATE, -gate.max_win_rate_drop, f"challenger >= champion - {gate.max_win_rate_drop:g}"),
        _Rule(
            PREFERENCE_ACCURACY,
            -gate.max_preference_accuracy_drop,
            f"challenger >= champion - {gate.max_preference_accuracy_drop:g}",
        ),
    ]


def _value(metrics: dict[str, float] | None, name: str) -> float | None:
    if not metrics or name not in metrics or metrics[name] is None:
        return None
    value = float(metrics[name])
    return None if math.isnan(value) else value


def decide(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    gate: GateConfig,
    *,
    challenger_version: str = "",
    champion_version: str | None = None,
) -> GateDecision:
    """Apply the gate to two flat metric dicts (`champion=None`: there is no champion yet)."""
    compared: dict[str, dict] = {}
    failures: list[str] = []
    missing: list[str] = []

    def verdict(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(promoted, reason, challenger_version, champion_version, compared)

    if champion is None:
        missing = [name for name in GATED_METRICS if _value(challenger, name) is None]
        if gate.require_metrics and missing:
            return verdict(False, f"no champion yet, but the challenger lacks required metrics: {', '.join(missing)}")
        return verdict(True, "no champion yet: the first passing version becomes champion")

    for rule in _rules(gate):
        mine, theirs = _value(challenger, rule.metric), _value(champion, rule.metric)
        if mine is None or theirs is None:
            missing.append(rule.metric)
            continue
        passed = mine >= theirs + rule.offset - _TOLERANCE
        compared[rule.metric] = {
            "challenger": mine,
            "champion": theirs,
            "delta": mine - theirs,
            "rule": rule.text,
            "passed": passed,
        }
        if not passed:
            failures.append(f"{rule.metric} {mine:g} vs champion {theirs:g} (needs {rule.text})")

    if gate.require_metrics and missing:
        return verdict(False, f"missing metrics on the challenger or the champion: {', '.join(missing)}")
    if failures:
        return verdict(False, "failed: " + "; ".join(failures))
    if not compared:
        return verdict(False, "no gated metric is present on both the challenger and the champion")
    passed_text = ", ".join(f"{name} {entry['delta']:+g}" for name, entry in compared.items())
    skipped = f" (skipped, missing: {', '.join(missing)})" if missing else ""
    return verdict(True, f"passed: {passed_text}{skipped}")


def promote(config: PipelineConfig, version: RegisteredVersion) -> GateDecision:
    """Gate `version` against the current champion; move `champion` to it when it passes.

    The metrics of each side are the latest values logged to its version's run (see
    `orpo.registry.log_evaluation`). The decision and the compared numbers are always recorded as tags on
    the challenger's version, promoted or not.
    """
    from mlflow import MlflowClient

    from orpo.registry import ALIAS_CHAMPION, configure_mlflow, version_metrics

    configure_mlflow(config)
    client = MlflowClient()
    name = version.name
    # Stores return version numbers as int or str; compare and report them as strings.
    champion = _alias_version(client, name, ALIAS_CHAMPION)
    challenger_version = str(version.version)
    if champion == challenger_version:
        decision = GateDecision(True, "already the champion", challenger_version, champion, {})
        _record(client, version, decision)
        return decision

    challenger_metrics = version_metrics(client, name, challenger_version)
    champion_metrics = version_metrics(client, name, champion) if champion is not None else None
    decision = decide(
        challenger_metrics,
        champion_metrics,
        config.registry.gate,
        challenger_version=challenger_version,
        champion_version=champion,
    )
    if decision.promoted:
        client.set_registered_model_alias(name, ALIAS_CHAMPION, challenger_version)
        log.info("promoted %s version %s to %s: %s", name, challenger_version, ALIAS_CHAMPION, decision.reason)
    else:
        log.info("kept %s version %s as challenger: %s", name, challenger_version, decision.reason)
    _record(client, version, decision)
    return decision


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _record(client, version: RegisteredVersion, decision: GateDecision) -> None:
    tags = {
        TAG_DECISION: "promoted" if decision.promoted else "rejected",
        TAG_REASON: decision.reason[:4000],
        TAG_AGAINST: decision.champion_version or "none",
        TAG_COMPARED: json.dumps(decision.compared, sort_keys=True)[:4000],
    }
    # One short tag per compared metric, so the version page shows the numbers without parsing JSON.
    for metric, entry in decision.compared.items():
        tags[f"gate.delta.{metric}"] = f"{entry['delta']:+.4g} ({'pass' if entry['passed'] else 'fail'})"
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    from orpo.registry import refresh_description

    refresh_description(client, version.name, str(version.version))
