"""The promotion gate: the pure rule (`decide`) for win / loss / tie / no champion, and `promote`
moving the `champion` alias and recording its decision on a sqlite MLflow store."""

from __future__ import annotations

import json

import pytest
from test_registry_helpers import fake_version

from orpo.config import GateConfig, PipelineConfig
from orpo.gate import GATED_METRICS, decide, promote

CHAMPION = {"mt_bench/score": 6.0, "alpaca/win_rate": 12.0, "preference/accuracy": 0.70}


def test_win_promotes_and_reports_every_delta():
    challenger = {"mt_bench/score": 6.5, "alpaca/win_rate": 13.5, "preference/accuracy": 0.72}
    decision = decide(challenger, CHAMPION, GateConfig(), challenger_version="2", champion_version="1")
    assert decision.promoted, decision.reason
    assert (decision.challenger_version, decision.champion_version) == ("2", "1")
    assert set(decision.compared) == set(GATED_METRICS)
    assert decision.compared["mt_bench/score"]["delta"] == pytest.approx(0.5)
    assert decision.compared["alpaca/win_rate"]["delta"] == pytest.approx(1.5)
    assert decision.compared["preference/accuracy"]["champion"] == 0.70
    assert all(entry["passed"] for entry in decision.compared.values())


def test_loss_on_mt_bench_is_rejected_and_named():
    challenger = {**CHAMPION, "mt_bench/score": 5.9}
    decision = decide(challenger, CHAMPION, GateConfig())
    assert not decision.promoted
    assert "mt_bench/score" in decision.reason
    assert decision.compared["mt_bench/score"]["passed"] is False
    assert decision.compared["alpaca/win_rate"]["passed"] is True


def test_tie_passes_at_zero_delta_and_fails_when_a_margin_is_required():
    assert decide(dict(CHAMPION), CHAMPION, GateConfig()).promoted
    # A tie computed through float arithmetic still counts as a tie.
    assert decide({"mt_bench/score": 0.1 + 0.2}, {"mt_bench/score": 0.3}, GateConfig()).promoted
    strict = GateConfig(min_mt_bench_delta=0.25)
    decision = decide(dict(CHAMPION), CHAMPION, strict)
    assert not decision.promoted
    assert "champion + 0.25" in decision.compared["mt_bench/score"]["rule"]
    assert decide({**CHAMPION, "mt_bench/score": 6.25}, CHAMPION, strict).promoted


def test_win_rate_may_drop_by_at_most_epsilon():
    gate = GateConfig(max_win_rate_drop=1.0)
    assert decide({**CHAMPION, "mt_bench/score": 6.4, "alpaca/win_rate": 11.0}, CHAMPION, gate).promoted
    decision = decide({**CHAMPION, "mt_bench/score": 6.4, "alpaca/win_rate": 10.9}, CHAMPION, gate)
    assert not decision.promoted and "alpaca/win_rate" in decision.reason


def test_preference_accuracy_may_not_drop_by_default():
    decision = decide({**CHAMPION, "preference/accuracy": 0.69}, CHAMPION, GateConfig())
    assert not decision.promoted and "preference/accuracy" in decision.reason
    loose = GateConfig(max_preference_accuracy_drop=0.02)
    assert decide({**CHAMPION, "preference/accuracy": 0.69}, CHAMPION, loose).promoted


def test_no_champion_promotes_the_first_passing_version():
    decision = decide({"mt_bench/score": 1.0}, None, GateConfig(), challenger_version="1")
    assert decision.promoted and decision.champion_version is None and "no champion" in decision.reason
    required = GateConfig(require_metrics=True)
    refused = decide({"mt_bench/score": 1.0}, None, required)
    assert not refused.promoted and "alpaca/win_rate" in refused.reason
    assert decide(dict(CHAMPION), None, required).promoted


def test_missing_metrics_are_skipped_unless_required():
    partial = {"mt_bench/score": 6.2}
    decision = decide(partial, CHAMPION, GateConfig())
    assert decision.promoted and set(decision.compared) == {"mt_bench/score"}
    assert "skipped" in decision.reason
    assert not decide(partial, CHAMPION, GateConfig(require_metrics=True)).promoted
    # NaN is no measurement.
    assert set(decide({**partial, "alpaca/win_rate": float("nan")}, CHAMPION, GateConfig()).compared) == {
        "mt_bench/score"
    }


def test_nothing_comparable_is_not_a_promotion():
    decision = decide({"diversity/distinct_2": 0.9}, CHAMPION, GateConfig())
    assert not decision.promoted
    assert decision.compared == {}


def _config(tmp_path, **gate) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"workdir": str(tmp_path / "work"), "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'gate.db'}",
                                                         "gate": gate}}
    )


@pytest.mark.slow  # the first MLflow import and a fresh sqlite schema take ~15-35 s here
def test_promote_moves_the_champion_alias_and_records_the_decision(tmp_path):
    from mlflow import MlflowClient

    from orpo.registry import RegisteredVersion, champion_uri, configure_mlflow

    config = _config(tmp_path, min_mt_bench_delta=0.1)
    configure_mlflow(config)
    name = config.registry.registered_model_name
    client = MlflowClient()

    def version(metrics):
        number = fake_version(name, metrics)
        run_id = client.get_model_version(name, number).run_id
        return RegisteredVersion(name, number, run_id, f"models:/{name}/{number}", True)

    assert champion_uri(config) is None
    first = version({"mt_bench/score": 5.0, "alpaca/win_rate": 10.0})
    decision = promote(config, first)
    assert decision.promoted and decision.champion_version is None
    assert champion_uri(config) == f"models:/{name}@champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version

    worse = version({"mt_bench/score": 5.05, "alpaca/win_rate": 10.0})  # below the required +0.1
    decision = promote(config, worse)
    assert not decision.promoted and decision.champion_version == first.version
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    tags = client.get_model_version(name, worse.version).tags
    assert tags["gate.decision"] == "rejected"
    assert tags["gate.champion_version"] == first.version
    compared = json.loads(tags["gate.compared"])
    assert compared["mt_bench/score"]["challenger"] == pytest.approx(5.05)
    assert compared["mt_bench/score"]["passed"] is False
    assert "fail" in tags["gate.delta.mt_bench/score"]
    assert "Gate: rejected" in client.get_model_version(name, worse.version).description

    better = version({"mt_bench/score": 5.5, "alpaca/win_rate": 9.5})
    decision = promote(config, better)
    assert decision.promoted, decision.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == better.version
    assert client.get_model_version(name, better.version).tags["gate.decision"] == "promoted"
    # Gating the champion against itself changes nothing.
    assert promote(config, better).promoted
