"""The promotion gate on a sqlite MLflow store: the threshold rule (`decide`) for win / loss / tie / no
champion; `promote` in head_to_head mode reading both versions' evaluation files back from MLflow, keeping
the champion against an identical challenger, promoting a clearly preferred one, recording every
decision; the Prefect gate task; `orpo gate` (dry run and --promote). The head-to-head rule itself, without
MLflow, is in test_head_to_head.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gate_helpers import LongerAnswerJudge, NoJudge, judgments, long, margins, outputs, short, write_evaluation
from test_registry_helpers import fake_version

from orpo.config import GateConfig, PipelineConfig
from orpo.gate import GATED_METRICS, decide, promote

CHAMPION = {"mt_bench/score": 6.0, "alpaca_eval2/win_rate": 12.0, "preference/accuracy": 0.70}


def test_win_promotes_and_reports_every_delta():
    challenger = {"mt_bench/score": 6.5, "alpaca_eval2/win_rate": 13.5, "preference/accuracy": 0.72}
    decision = decide(challenger, CHAMPION, GateConfig(), challenger_version="2", champion_version="1")
    assert decision.promoted, decision.reason
    assert (decision.challenger_version, decision.champion_version) == ("2", "1")
    assert set(decision.compared) == set(GATED_METRICS)
    assert decision.compared["mt_bench/score"]["delta"] == pytest.approx(0.5)
    assert decision.compared["alpaca_eval2/win_rate"]["delta"] == pytest.approx(1.5)
    assert decision.compared["preference/accuracy"]["champion"] == 0.70
    assert all(entry["passed"] for entry in decision.compared.values())


def test_loss_on_mt_bench_is_rejected_and_named():
    challenger = {**CHAMPION, "mt_bench/score": 5.9}
    decision = decide(challenger, CHAMPION, GateConfig())
    assert not decision.promoted
    assert "mt_bench/score" in decision.reason
    assert decision.compared["mt_bench/score"]["passed"] is False
    assert decision.compared["alpaca_eval2/win_rate"]["passed"] is True


def test_tie_passes_at_zero_delta_and_fails_when_a_margin_is_required():
    assert decide(dict(CHAMPION), CHAMPION, GateConfig()).promoted
    # A tie computed through float arithmetic still counts as a tie.
    assert decide({"mt_bench/score": 0.1 + 0.2}, {"mt_bench/score": 0.3}, GateConfig()).promoted
    strict = GateConfig(min_mt_bench_delta=0.25)
    decision = decide(dict(CHAMPION), CHAMPION, strict)
    assert not decision.promoted
    assert "champion + 0.25" in decision.compared["mt_bench/score"]["rule"]
    assert decide({**CHAMPION, "mt_bench/score": 6.25}, CHAMPION, strict).promoted


def test_numbers_of_different_protocols_are_never_compared():
    """A local-judge win rate is no evidence against the leaderboard protocol's, however they differ."""
    challenger = {"alpaca_local_judge/win_rate": 90.0, "preference/accuracy": 0.70}
    champion = {"alpaca_eval2/win_rate": 10.0, "preference/accuracy": 0.70}
    decision = decide(challenger, champion, GateConfig())
    assert set(decision.compared) == {"preference/accuracy"}
    assert "alpaca_local_judge/win_rate" in decision.reason and "alpaca_eval2/win_rate" in decision.reason
    same = decide({**challenger, "alpaca_local_judge/win_rate": 40.0}, {**challenger, "alpaca_eval2/win_rate": 1.0},
                  GateConfig())
    assert not same.promoted and same.compared["alpaca_local_judge/win_rate"]["delta"] == pytest.approx(-50.0)


def test_win_rate_may_drop_by_at_most_epsilon():
    gate = GateConfig(max_win_rate_drop=1.0)
    assert decide({**CHAMPION, "mt_bench/score": 6.4, "alpaca_eval2/win_rate": 11.0}, CHAMPION, gate).promoted
    decision = decide({**CHAMPION, "mt_bench/score": 6.4, "alpaca_eval2/win_rate": 10.9}, CHAMPION, gate)
    assert not decision.promoted and "alpaca_eval2/win_rate" in decision.reason


def test_preference_accuracy_may_not_drop_by_default():
    decision = decide({**CHAMPION, "preference/accuracy": 0.69}, CHAMPION, GateConfig())
    assert not decision.promoted and "preference/accuracy" in decision.reason
    loose = GateConfig(max_preference_accuracy_drop=0.02)
    assert decide({**CHAMPION, "preference/accuracy": 0.69}, CHAMPION, loose).promoted


def test_no_champion_and_nothing_to_compare_with_promotes_only_when_configured():
    # The default (first_version: beat_start_model) needs the start model's metrics as the opponent.
    refused = decide({"mt_bench/score": 9.0}, None, GateConfig(), challenger_version="1")
    assert not refused.promoted and refused.champion_version is None
    for advice in ("orchestration.evaluate_base_model", "--start-report", "first_version: promote"):
        assert advice in refused.reason
    unchecked = GateConfig(first_version="promote")
    decision = decide({"mt_bench/score": 1.0}, None, unchecked, challenger_version="1")
    assert decision.promoted and decision.champion_version is None and "no champion" in decision.reason
    required = GateConfig(first_version="promote", require_metrics=True)
    refused = decide({"mt_bench/score": 1.0}, None, required)
    assert not refused.promoted and "alpaca_eval2/win_rate" in refused.reason
    assert decide(dict(CHAMPION), None, required).promoted


def test_the_start_model_as_opponent_is_named_in_the_rules_and_the_reason():
    start = {"mt_bench/score": 6.0}
    decision = decide({"mt_bench/score": 5.5}, start, GateConfig(), against="start model")
    assert not decision.promoted
    assert "vs start model 6" in decision.reason and "start model + 0" in decision.compared["mt_bench/score"]["rule"]


def test_missing_metrics_are_skipped_unless_required():
    partial = {"mt_bench/score": 6.2}
    decision = decide(partial, CHAMPION, GateConfig())
    assert decision.promoted and set(decision.compared) == {"mt_bench/score"}
    assert "skipped" in decision.reason
    assert not decide(partial, CHAMPION, GateConfig(require_metrics=True)).promoted
    # NaN is no measurement.
    assert set(decide({**partial, "alpaca_eval2/win_rate": float("nan")}, CHAMPION, GateConfig()).compared) == {
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

    # About the alias and the records: the first version is promoted without a comparison.
    config = _config(tmp_path, mode="threshold", min_mt_bench_delta=0.1, first_version="promote")
    configure_mlflow(config)
    name = config.registry.registered_model_name
    client = MlflowClient()

    def version(metrics):
        number = fake_version(name, metrics)
        run_id = client.get_model_version(name, number).run_id
        return RegisteredVersion(name, number, run_id, f"models:/{name}/{number}", True)

    assert champion_uri(config) is None
    first = version({"mt_bench/score": 5.0, "alpaca_eval2/win_rate": 10.0})
    decision = promote(config, first)
    assert decision.promoted and decision.champion_version is None
    assert champion_uri(config) == f"models:/{name}@champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version

    worse = version({"mt_bench/score": 5.05, "alpaca_eval2/win_rate": 10.0})  # below the required +0.1
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

    better = version({"mt_bench/score": 5.5, "alpaca_eval2/win_rate": 9.5})
    decision = promote(config, better)
    assert decision.promoted, decision.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == better.version
    assert client.get_model_version(name, better.version).tags["gate.decision"] == "promoted"
    # Gating the champion against itself changes nothing.
    assert promote(config, better).promoted


# --- head_to_head on MLflow ---------------------------------------------------------------------------

N_PROMPTS = 24
PLAIN = [short(i) for i in range(N_PROMPTS)]
BETTER = [long(i) for i in range(N_PROMPTS)]
TERSE = [f"Hi {i}." for i in range(N_PROMPTS)]
SCORES = {(q, t): 5.0 + q % 3 for q in range(6) for t in (1, 2)}
PAIRS = margins([0.4] * 15 + [-0.3] * 5)


@pytest.fixture(scope="module")
def h2h(tmp_path_factory):
    """A store with two evaluated versions of identical outputs, version 1 the champion."""
    from mlflow import MlflowClient

    from orpo.registry import configure_mlflow

    root = tmp_path_factory.mktemp("h2h")
    config = _config(root)
    configure_mlflow(config)
    state = {"root": root, "config": config, "client": MlflowClient(), "name": config.registry.registered_model_name,
             "texts": {}}
    first = evaluated_version(state, "v1", PLAIN)
    # No champion yet: version 1 beats its start model, whose answers are shorter still.
    start = write_evaluation(root / "start-model", alpaca=outputs("start", TERSE), mt=judgments("start", SCORES),
                             pref=PAIRS)
    assert promote(config, first, judge=LongerAnswerJudge(PLAIN + TERSE), start_report_dir=start).promoted
    state["v1"] = first
    state["v2"] = evaluated_version(state, "v2", PLAIN)
    return state


def evaluated_version(state, label, texts):
    from orpo.registry import RegisteredVersion, log_evaluation

    client, name = state["client"], state["name"]
    number = fake_version(name, {})
    version = RegisteredVersion(name, number, client.get_model_version(name, number).run_id,
                                f"models:/{name}/{number}", True)
    report = write_evaluation(state["root"] / f"report-{label}-{number}", alpaca=outputs(label, texts),
                              mt=judgments(label, SCORES), pref=PAIRS)
    log_evaluation(state["config"], version, {"mt_bench/score": 6.0}, report)
    state["texts"][number] = texts
    return version


def champion_of(state) -> str:
    return str(state["client"].get_model_version_by_alias(state["name"], "champion").version)


@pytest.mark.slow  # MLflow's first import and a fresh sqlite schema take ~15-35 s here
def test_an_identical_challenger_is_kept_with_no_significant_difference(h2h):
    config, client, name = h2h["config"], h2h["client"], h2h["name"]
    decision = promote(config, h2h["v2"], judge=NoJudge())  # identical outputs never reach a judge
    assert not decision.promoted and decision.outcome == "no significant difference", decision.reason
    assert champion_of(h2h) == h2h["v1"].version
    win = decision.compared["head_to_head/win_rate"]
    assert (win["estimate"], win["low"], win["high"], win["n"]) == (50.0, 50.0, 50.0, N_PROMPTS)
    assert decision.compared["mt_bench/score"]["estimate"] == 0.0  # paired from the two judgment files
    assert decision.compared["preference/accuracy"]["n"] == len(PAIRS)

    version = client.get_model_version(name, h2h["v2"].version)
    assert version.tags["gate.decision"] == "no significant difference"
    assert version.tags["gate.mode"] == "head_to_head" and version.tags["gate.champion_version"] == "1"
    assert "50% [50, 50]" in version.tags["gate.diff.head_to_head/win_rate"]
    assert "seed 0" in version.tags["gate.diff.head_to_head/win_rate"]
    assert json.loads(version.tags["gate.compared"])["head_to_head/win_rate"]["n"] == N_PROMPTS
    assert "| head_to_head/win_rate (primary) |" in version.description
    assert "Gate: no significant difference" in version.description
    logged = {a.path for a in client.list_artifacts(h2h["v2"].run_id, "gate")}
    assert {"gate/summary.png", "gate/decision.json", "gate/head_to_head_annotations.json"} <= logged


@pytest.mark.slow
def test_a_preferred_challenger_is_promoted_and_a_dry_run_changes_nothing(h2h):
    config, client, name = h2h["config"], h2h["client"], h2h["name"]
    better = evaluated_version(h2h, "v3", BETTER)
    judge = LongerAnswerJudge(PLAIN + BETTER)
    dry = promote(config, better, judge=judge, dry_run=True, out_dir=h2h["root"] / "dry")
    assert dry.promoted and champion_of(h2h) == h2h["v1"].version
    assert "gate.decision" not in client.get_model_version(name, better.version).tags
    assert (h2h["root"] / "dry" / "summary.png").is_file() and (h2h["root"] / "dry" / "decision.json").is_file()

    decision = promote(config, better, judge=judge)
    assert decision.promoted and decision.outcome == "promoted", decision.reason
    assert decision.compared["head_to_head/win_rate"]["low"] > 50.0
    assert champion_of(h2h) == better.version
    assert client.get_model_version(name, better.version).tags["gate.decision"] == "promoted"


@pytest.mark.slow
def test_the_gate_task_keeps_the_champion_against_an_identical_run(h2h, prefect_harness):
    """What a pipeline run forced on identical inputs does at its gate: version N+1, identical outputs,
    the judge never built (the config's judge is a local model that is not even loaded)."""
    from tasks.promote import gate_and_promote

    champion = champion_of(h2h)
    twin = evaluated_version(h2h, "twin", h2h["texts"][champion])
    decision = gate_and_promote.fn(h2h["config"], twin)
    assert not decision.promoted and decision.outcome == "no significant difference"
    assert champion_of(h2h) == champion


@pytest.mark.slow
def test_gate_command_dry_run_and_promote(h2h):
    import typer
    from typer.testing import CliRunner

    from orpo import registry_cli
    from orpo.config import dump_config

    app = typer.Typer()
    app.command("gate")(registry_cli.gate)
    app.command("noop")(lambda: None)
    config_path = dump_config(h2h["config"], h2h["root"] / "config.yaml")
    name = h2h["name"]
    twin = evaluated_version(h2h, "cli", h2h["texts"][champion_of(h2h)])
    before = champion_of(h2h)
    args = ["gate", "--config", str(config_path), "--challenger", f"models:/{name}/{twin.version}",
            "--champion", f"models:/{name}@champion"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "no significant difference" in result.output and "dry run" in result.output
    assert "head_to_head/win_rate (primary)" in result.output
    assert "gate.decision" not in h2h["client"].get_model_version(name, twin.version).tags
    result = CliRunner().invoke(app, [*args, "--promote"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert h2h["client"].get_model_version(name, twin.version).tags["gate.decision"] == "no significant difference"
    assert champion_of(h2h) == before
    result = CliRunner().invoke(app, ["gate", "--config", str(config_path), "--challenger", "models:/nope"])
    assert result.exit_code == 2 and "models:/NAME/VERSION" in result.output


# --- the first version against the start model ----------------------------------------------------------


def _first_versions(h2h, model_name, **gate):
    """A config on the h2h store for a registered model with no champion yet."""
    config = h2h["config"]
    registry = config.registry.model_copy(update={
        "registered_model_name": model_name, "gate": config.registry.gate.model_copy(update=gate)})
    return config.model_copy(update={"registry": registry}), {**h2h, "name": model_name}


def _has_champion(state) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        state["client"].get_model_version_by_alias(state["name"], "champion")
    except MlflowException:
        return False
    return True


@pytest.mark.slow
def test_a_first_version_becomes_champion_only_by_beating_its_start_model(h2h):
    """Equal to the start model, worse than it, or with no start evaluation: stays challenger, with the start
    model named as the opponent. Clearly better (every answer preferred): champion."""
    config, state = _first_versions(h2h, "first-h2h")
    client, root = state["client"], state["root"]
    start_plain = write_evaluation(root / "start-plain", alpaca=outputs("start", PLAIN), mt=judgments("s", SCORES),
                                   pref=PAIRS)
    start_better = write_evaluation(root / "start-better", alpaca=outputs("start", BETTER),
                                    mt=judgments("s", SCORES), pref=PAIRS)
    judge = LongerAnswerJudge(PLAIN + BETTER)

    equal = evaluated_version(state, "equal", PLAIN)
    decision = promote(config, equal, judge=NoJudge(), start_report_dir=start_plain)
    assert not decision.promoted and decision.outcome == "no significant difference", decision.reason
    assert decision.champion_version is None and decision.opponent == f"start model {config.model.name_or_path}"
    assert "against the start model" in decision.reason
    assert decision.compared["head_to_head/win_rate"]["estimate"] == 50.0
    assert not _has_champion(state)
    tags = client.get_model_version(state["name"], equal.version).tags
    assert tags["gate.decision"] == "no significant difference" and tags["gate.champion_version"] == "none"
    assert tags["gate.opponent"].startswith("start model ")
    assert "| metric | challenger vs start model |" in client.get_model_version(state["name"], equal.version).description
    recorded = json.loads((root / "work" / "gate" / f"first-h2h-v{equal.version}-vs-start" / "decision.json")
                          .read_text())
    assert recorded["champion_version"] is None and recorded["opponent"].startswith("start model")
    assert "gate/decision.json" in {a.path for a in client.list_artifacts(equal.run_id, "gate")}

    worse = evaluated_version(state, "worse", PLAIN)
    decision = promote(config, worse, judge=judge, start_report_dir=start_better)
    assert not decision.promoted and decision.outcome == "kept" and "significantly worse" in decision.reason
    assert decision.compared["head_to_head/win_rate"]["high"] < 50.0
    assert not _has_champion(state)

    unevaluated = promote(config, worse, judge=NoJudge())
    assert not unevaluated.promoted and unevaluated.outcome == "kept" and unevaluated.compared == {}
    assert "orchestration.evaluate_base_model" in unevaluated.reason and "first_version: promote" in unevaluated.reason
    assert client.get_model_version(state["name"], worse.version).tags["gate.opponent"].startswith("start model")
    assert not _has_champion(state)

    better = evaluated_version(state, "better", BETTER)
    decision = promote(config, better, judge=judge, start_report_dir=start_plain)
    assert decision.promoted and decision.outcome == "promoted", decision.reason
    assert decision.compared["head_to_head/win_rate"]["low"] > 50.0 and decision.champion_version is None
    assert champion_of(state) == better.version


@pytest.mark.slow
def test_first_version_promote_keeps_the_unchecked_promotion(h2h):
    config, state = _first_versions(h2h, "first-unchecked", first_version="promote")
    version = evaluated_version(state, "plain", PLAIN)
    decision = promote(config, version, judge=NoJudge())
    assert decision.promoted and decision.opponent is None and "first_version: promote" in decision.reason
    assert champion_of(state) == version.version
    assert state["client"].get_model_version(state["name"], version.version).tags["gate.opponent"] == "none"


@pytest.mark.slow
def test_threshold_first_version_against_the_start_models_metrics(h2h):
    from orpo.registry import RegisteredVersion

    config, state = _first_versions(h2h, "first-threshold", mode="threshold")
    client, name = state["client"], state["name"]
    start = write_evaluation(h2h["root"] / "start-threshold")
    (start / "report.json").write_text(json.dumps({"metrics": {"mt_bench/score": 6.0, "preference/accuracy": 0.7}}))

    def version(metrics):
        number = fake_version(name, metrics)
        return RegisteredVersion(name, number, client.get_model_version(name, number).run_id,
                                 f"models:/{name}/{number}", True)

    worse = version({"mt_bench/score": 5.5, "preference/accuracy": 0.7})
    decision = promote(config, worse, start_report_dir=start)
    assert not decision.promoted and decision.compared["mt_bench/score"]["delta"] == pytest.approx(-0.5)
    assert "vs start model 6" in decision.reason and not _has_champion(state)
    better = version({"mt_bench/score": 6.5, "preference/accuracy": 0.75})
    decision = promote(config, better, start_report_dir=start)
    assert decision.promoted, decision.reason
    assert champion_of(state) == better.version


@pytest.mark.slow
def test_gate_command_on_a_first_version_needs_the_start_report(h2h, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import evals.judges
    from orpo import registry_cli
    from orpo.config import dump_config

    app = typer.Typer()
    app.command("gate")(registry_cli.gate)
    app.command("noop")(lambda: None)
    config, state = _first_versions(h2h, "first-cli")
    config_path = dump_config(config, h2h["root"] / "first-cli.yaml")
    start = write_evaluation(Path(config.workdir) / "reports" / "base-start", alpaca=outputs("start", PLAIN))
    better = evaluated_version(state, "cli-better", BETTER)
    monkeypatch.setattr(evals.judges, "build_judge", lambda *a, **k: LongerAnswerJudge(PLAIN + BETTER))
    args = ["gate", "--config", str(config_path), "--challenger", f"models:/first-cli/{better.version}"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "--start-report" in result.output and str(start) in result.output
    result = CliRunner().invoke(app, [*args, "--start-report", str(start)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "promoted" in result.output and "against the start model" in result.output
    assert not _has_champion(state)  # a dry run
