"""The ablation report's math checked by hand, the arms' configs, and the report on synthetic outcomes."""

from __future__ import annotations

import json
import math

import pytest

from orpo.ablation.arms import Arm, arm_config, check_study, plan_arms, quick_config, require_trl
from orpo.ablation.report import (
    ArmOutcome,
    common_target,
    gradient_norm,
    odds_ratio_gradients,
    probability_ratio_gradients,
    spread,
    time_to_accuracy,
    write_report,
)
from orpo.config import ConfigError, load_config


def test_odds_ratio_gradient_at_0_7_and_0_4_by_hand():
    """odds(0.7) = 7/3, odds(0.4) = 2/3, so OR = 3.5 and d log sigmoid(z)/dz = sigmoid(-log 3.5) = 1/4.5 = 2/9.
    d log odds / d log P = 1/(1 - P): chosen 2/9 / 0.3 = 20/27, rejected -2/9 / 0.6 = -10/27."""
    chosen, rejected = odds_ratio_gradients(0.7, 0.4)
    assert chosen == pytest.approx(20 / 27)
    assert rejected == pytest.approx(-10 / 27)
    assert gradient_norm((chosen, rejected)) == pytest.approx(math.sqrt(500) / 27)


def test_probability_ratio_gradient_at_0_7_and_0_4_by_hand():
    """PR = 0.7 / 0.4 = 1.75; sigmoid(-log 1.75) = 1 / 2.75 = 4/11, the same size for both log-probabilities."""
    assert probability_ratio_gradients(0.7, 0.4) == pytest.approx((4 / 11, -4 / 11))


def test_or_gradients_match_autograd_through_the_training_loss():
    """The closed form agrees with autograd through orpo.loss.log_odds, the function training uses."""
    import torch

    from orpo.loss import log_odds

    for p_chosen, p_rejected in ((0.7, 0.4), (0.2, 0.05), (0.95, 0.9)):
        logps = torch.tensor([math.log(p_chosen), math.log(p_rejected)], dtype=torch.float64, requires_grad=True)
        odds = log_odds(logps)
        torch.nn.functional.logsigmoid(odds[0] - odds[1]).backward()
        assert logps.grad.tolist() == pytest.approx(list(odds_ratio_gradients(p_chosen, p_rejected)), rel=1e-9)


TIMELINE = [
    {"train_seconds": 30.0, "accuracy": 0.55},
    {"train_seconds": 10.0, "accuracy": 0.50},
    {"train_seconds": 20.0, "accuracy": 0.625},
    {"train_seconds": 40.0, "accuracy": 0.75},
]


def test_time_to_accuracy_is_the_first_probe_that_reaches_the_target():
    assert time_to_accuracy(TIMELINE, 0.6) == 20.0  # reached at 20 s, lost at 30 s: the first time counts
    assert time_to_accuracy(TIMELINE, 0.7) == 40.0
    assert time_to_accuracy(TIMELINE, 0.5) == 10.0
    assert time_to_accuracy(TIMELINE, 0.8) is None


def test_common_target_is_the_lowest_best_accuracy():
    other = [{"train_seconds": 5.0, "accuracy": 0.6}, {"train_seconds": 9.0, "accuracy": 0.7}]
    assert common_target([TIMELINE, other]) == 0.7
    assert common_target([TIMELINE, []]) is None  # an arm without probes cannot be timed


def test_spread():
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([0.5])["std"] == 0.0
    assert spread([math.nan])["n"] == 0


def _config(*extra: str):
    return load_config(None, ["train.eval_steps=5", "train.max_steps=30", *extra])


def test_arms_share_everything_but_the_objective():
    config = _config("ablation.orpo_lambdas=[0.1,0.5]", "ablation.seeds=[1,2]")
    arms = plan_arms(config)
    # headline arms (SFT, first lambda, SFT+DPO) for every seed first; the rest of the sweep last
    assert [a.run_name for a in arms] == ["sft-seed1", "sft-seed2", "orpo-0.1-seed1", "orpo-0.1-seed2",
                                          "sft-dpo-seed1", "sft-dpo-seed2", "orpo-0.5-seed1", "orpo-0.5-seed2"]
    assert [a.method for a in arms[::2]] == ["sft", "orpo", "sft+dpo", "orpo"]
    sft, orpo = arm_config(config, arms[0]), arm_config(config, arms[7])
    assert (sft.train.orpo_lambda, sft.train.seed, orpo.train.orpo_lambda, orpo.train.seed) == (0.0, 1, 0.5, 2)
    assert sft.registry.registered_model_name == "orpo-model-ablation"
    same = sft.train.model_dump(exclude={"orpo_lambda", "seed"})
    assert same == orpo.train.model_dump(exclude={"orpo_lambda", "seed"})


def test_quick_trims_the_study():
    quick = quick_config(_config("ablation.seeds=[1,2,3]"))
    assert quick.ablation.seeds == [1] and quick.ablation.orpo_lambdas == [0.1]
    assert quick.train.max_steps == 12 and quick.train.eval_steps == 4
    assert set(quick.eval.suites) <= {"preference", "diversity"}


def test_lambda_zero_is_refused_as_an_orpo_arm():
    with pytest.raises(ConfigError, match="lambda 0 is the SFT arm"):
        _config("ablation.orpo_lambdas=[0,0.1]")


def test_a_study_without_periodic_evaluation_is_refused():
    with pytest.raises(ConfigError, match="train.eval_steps"):
        check_study(load_config(None, ["ablation.dpo=false"]))


def test_missing_trl_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'orpo-pipeline\[ablation\]'"):
        require_trl()


def test_dpo_examples_are_trl_conversational_rows():
    from orpo.ablation.dpo import to_trl_example

    row = {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
           "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away"}]}
    assert to_trl_example(row) == {"prompt": [{"role": "user", "content": "Hi?"}],
                                   "chosen": [{"role": "assistant", "content": "Hello"}],
                                   "rejected": [{"role": "assistant", "content": "Go away"}]}


def _outcome(arm: Arm, tmp_path, accuracies, seconds_per_probe, logps):
    eval_dir = tmp_path / arm.run_name
    eval_dir.mkdir()
    (eval_dir / "diversity_samples.json").write_text(json.dumps([
        {"instruction": "a", "samples": ["one two three", "one two four"]},
        {"instruction": "b", "samples": ["five six", "seven eight"]},
    ]))
    return ArmOutcome(
        name=arm.name, method=arm.method, orpo_lambda=arm.orpo_lambda, seed=arm.seed, train_dir="", eval_dir=str(eval_dir),
        model_uri=f"models:/m/{arm.run_name}",
        metrics={"preference/accuracy": accuracies[-1], "preference/margin": 0.1},
        resources={"train_seconds": seconds_per_probe * len(accuracies), "wall_seconds": 99.0, "peak_memory_mb": 1000.0},
        timeline=[{"step": 5 * (i + 1), "train_seconds": seconds_per_probe * (i + 1), "accuracy": a}
                  for i, a in enumerate(accuracies)],
        curves=[{"step": 5 * (i + 1), "eval_logps/chosen": c, "eval_logps/rejected": r} for i, (c, r) in enumerate(logps)],
    )


def test_report_has_every_section_and_times_both_arms_to_the_same_accuracy(tmp_path):
    outcomes = [
        _outcome(Arm("sft", "orpo", 0.0, 1), tmp_path, [0.5, 0.55], 10.0, [(-2.0, -2.5), (-1.5, -2.0)]),
        _outcome(Arm("orpo-0.1", "orpo", 0.1, 1), tmp_path, [0.6, 0.7], 11.0, [(-2.0, -2.6), (-1.6, -2.6)]),
        _outcome(Arm("sft-dpo", "dpo", 0.0, 1), tmp_path, [0.5, 0.55, 0.65], 20.0, []),
    ]
    report = write_report(outcomes, tmp_path / "report", {"study": "s"})
    text = report.read_text()
    assert "## Held-out log-probabilities over training (claim 1)" in text
    assert "| sft-dpo | sft+dpo | 0 | 0.650 |" in text
    # ORPO's best is 0.7, SFT+DPO's 0.65: both are timed to 0.65 (ORPO at its 2nd probe, DPO at its 3rd)
    assert "| 1 | 0.650 | not reached | 22 s | 60 s |" in text
    assert "| log sigmoid(log OR) | 0.7407 | -0.3704 |" in text
    assert "| log sigmoid(log PR) | 0.3636 | -0.3636 |" in text
    summary = json.loads((tmp_path / "report" / "report.json").read_text())["summary"]
    # distinct-2 of input a: bigrams (one two)(two three)(one two)(two four) -> 3 unique of 4; input b: 2 of 2
    assert summary["arms"]["sft"]["per_input_distinct_2"]["mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["arms"]["orpo-0.1"]["eval_logps_rejected"]["mean"] == -2.6


def test_orpo_ablate_refuses_a_study_without_periodic_evaluation_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from orpo.cli import app

    result = CliRunner().invoke(app, ["ablate", f"workdir={tmp_path}", "ablation.dpo=false"])
    assert result.exit_code == 2
    assert "train.eval_steps" in result.output
    assert not (tmp_path / "ablation").exists()


def test_a_stopped_study_reports_the_arms_that_finished(tmp_path):
    from orpo.ablation.study import finished_outcomes, study_dir

    config = _config(f"workdir={tmp_path}", "ablation.study=s", "ablation.seeds=[1]")
    root = study_dir(config, "s")
    (root / "train" / "sft-seed1").mkdir(parents=True)
    (root / "train" / "sft-seed1" / "resources.json").write_text(json.dumps({"train_seconds": 5.0}))
    (root / "train" / "sft-seed1" / "timeline.jsonl").write_text('{"train_seconds": 5.0, "accuracy": 0.5}\n')
    (root / "eval" / "sft-seed1").mkdir(parents=True)
    (root / "eval" / "sft-seed1" / "report.json").write_text(json.dumps({"metrics": {"preference/accuracy": 0.5}}))
    (root / "train" / "orpo-0.1-seed1").mkdir(parents=True)  # trained part-way: no resources.json
    outcomes = finished_outcomes(config, "s", {"sft-seed1": "models:/m/1"})
    assert [(o.name, o.model_uri, o.metrics["preference/accuracy"]) for o in outcomes] == [("sft", "models:/m/1", 0.5)]
    assert outcomes[0].timeline == [{"train_seconds": 5.0, "accuracy": 0.5}]
