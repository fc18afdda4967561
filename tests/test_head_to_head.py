"""The head-to-head gate on evaluation files, with a deterministic judge that prefers the longer answer:
identical outputs are kept with "no significant difference" (and cost no judge), a clearly preferred
challenger is promoted with its interval above the margin, a bare majority of few prompts is kept, a
significant regression on a guard metric blocks the promotion. No MLflow here (see test_gate.py)."""

from __future__ import annotations

import json
import re

import pytest
from gate_helpers import LongerAnswerJudge, NoJudge, judgments, long, margins, outputs, short

from orpo.config import GateConfig
from orpo.gate import KEPT, NO_DIFFERENCE, PROMOTED, decide_head_to_head
from orpo.head_to_head import (
    HEAD_TO_HEAD_WIN_RATE,
    MT_BENCH_SCORE,
    PREFERENCE_ACCURACY,
    EvaluationFiles,
    compare_evaluations,
    model_estimates,
    read_evaluation,
)


def files(alpaca, mt=None, pref=None, answers=None):
    return EvaluationFiles(root=None, alpaca_outputs=alpaca, mt_bench_judgments=mt, preference_margins=pref,
                           mt_bench_answers=answers)


def run_gate(champion, challenger, judge, gate=None):
    gate = gate or GateConfig()
    result = compare_evaluations(champion, challenger, lambda: judge, metrics=gate.gated_metrics,
                                 confidence=gate.confidence, n_resamples=gate.bootstrap_resamples, seed=gate.seed)
    return result, decide_head_to_head(result, gate, challenger_version="2", champion_version="1")


def test_identical_outputs_are_ties_kept_with_no_significant_difference():
    texts = [short(i) for i in range(20)]
    scores = {(q, t): 5.0 + q % 3 for q in range(8) for t in (1, 2)}
    champion = files(outputs("v1", texts), judgments("v1", scores), margins([0.5, -0.2] * 10))
    challenger = files(outputs("v2", texts), judgments("v2", scores), margins([0.5, -0.2] * 10))
    result, decision = run_gate(champion, challenger, NoJudge())
    assert not decision.promoted and decision.outcome == NO_DIFFERENCE
    assert "does not lie above 50%" in decision.reason
    win = decision.compared[HEAD_TO_HEAD_WIN_RATE]
    assert (win["estimate"], win["low"], win["high"], win["n"]) == (50.0, 50.0, 50.0, 20)
    assert win["n_ties"] == 20 and win["seed"] == 0 and "bootstrap" in win["test"]
    assert all(a["preference"] == 1.5 for a in result.annotations)
    assert decision.compared[MT_BENCH_SCORE]["estimate"] == 0.0
    assert decision.compared[PREFERENCE_ACCURACY]["verdict"] == "no significant difference"


def test_a_challenger_the_judge_prefers_on_most_prompts_is_promoted_above_the_margin():
    n = 40
    champion_texts = [short(i) for i in range(n)]
    challenger_texts = [long(i) if i % 10 else f"R{i}" for i in range(n)]  # 36 longer, 4 shorter
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    result, decision = run_gate(files(outputs("v1", champion_texts)), files(outputs("v2", challenger_texts)), judge)
    assert judge.calls == n
    win = decision.compared[HEAD_TO_HEAD_WIN_RATE]
    assert win["estimate"] == pytest.approx(90.0)
    assert win["low"] > 50.0 and win["margin"] == 50.0 and win["verdict"] == "above the margin"
    assert decision.promoted and decision.outcome == PROMOTED, decision.reason
    # The other gated metrics had no data on either side: not compared, said so, not blocking.
    assert "missing" in decision.compared[MT_BENCH_SCORE]
    assert "not compared" in decision.reason
    # The annotations are AlpacaEval's: champion output_1, challenger output_2, both orders shown.
    assert {a["output_1"] for a in result.annotations} == set(champion_texts)
    assert 0 < sum(a["is_swapped"] for a in result.annotations) < n


def test_a_bare_majority_of_few_prompts_is_kept():
    # 7 of 12 prompts longer: a 58% win rate whose interval still holds 50%.
    champion_texts = [short(i) for i in range(12)]
    challenger_texts = [long(i) if i < 7 else f"R{i}" for i in range(12)]
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    _, decision = run_gate(files(outputs("v1", champion_texts)), files(outputs("v2", challenger_texts)), judge)
    win = decision.compared[HEAD_TO_HEAD_WIN_RATE]
    assert win["estimate"] == pytest.approx(100 * 7 / 12)
    assert win["low"] < 50.0 < win["high"]
    assert not decision.promoted and decision.outcome == NO_DIFFERENCE


def test_too_few_prompts_never_promote():
    champion_texts = [short(i) for i in range(4)]
    challenger_texts = [long(i) for i in range(4)]
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    _, decision = run_gate(files(outputs("v1", champion_texts)), files(outputs("v2", challenger_texts)), judge)
    assert decision.compared[HEAD_TO_HEAD_WIN_RATE]["low"] == 100.0  # 4 of 4: the bootstrap cannot vary
    assert not decision.promoted and decision.outcome == KEPT and "min_prompts" in decision.reason


def test_a_significant_regression_on_a_guard_metric_blocks_the_promotion():
    champion_texts = [short(i) for i in range(30)]
    challenger_texts = [long(i) for i in range(30)]
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    champion_scores = {(q, t): 8.0 for q in range(20) for t in (1, 2)}
    challenger_scores = {(q, t): 5.0 + (q % 2) for q in range(20) for t in (1, 2)}
    _, decision = run_gate(files(outputs("v1", champion_texts), judgments("v1", champion_scores)),
                           files(outputs("v2", challenger_texts), judgments("v2", challenger_scores)), judge)
    mt = decision.compared[MT_BENCH_SCORE]
    assert mt["estimate"] == pytest.approx(-2.5) and mt["high"] < 0 and mt["n"] == 20  # n counts questions
    assert mt["verdict"] == "significantly worse" and mt["role"] == "guard"
    assert not decision.promoted and decision.outcome == KEPT
    assert "significantly worse" in decision.reason and "MT-Bench" in decision.reason


def test_a_worse_challenger_is_kept_because_the_champion_is_better():
    champion_texts = [long(i) for i in range(30)]
    challenger_texts = [short(i) for i in range(30)]
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    _, decision = run_gate(files(outputs("v1", champion_texts)), files(outputs("v2", challenger_texts)), judge)
    assert decision.compared[HEAD_TO_HEAD_WIN_RATE]["high"] < 50
    assert decision.outcome == KEPT and "significantly worse" in decision.reason


def test_mt_bench_pairs_by_question_and_turn_and_drops_failures():
    champion = judgments("v1", {(1, 1): 6, (1, 2): 5, (2, 1): 7, (2, 2): -1, (3, 1): 4})
    challenger = judgments("v2", {(1, 1): 7, (1, 2): 5, (2, 1): 9, (2, 2): 8, (4, 1): 9})
    result, _ = run_gate(files(None, champion), files(None, challenger), NoJudge(),
                         GateConfig(primary_metric="mt_bench/score", gated_metrics=["mt_bench/score"]))
    difference = result.differences[MT_BENCH_SCORE]
    assert difference.interval.estimate == pytest.approx((1 + 0 + 2) / 3)
    assert difference.n_failed == 1 and difference.interval.n == 2  # questions 1 and 2
    # A different judge on one side makes single-grading scores incomparable.
    other = judgments("v2", {(1, 1): 7}, judge="judge-y")
    result, decision = run_gate(files(None, champion), files(None, other), NoJudge(),
                                GateConfig(primary_metric="mt_bench/score", gated_metrics=["mt_bench/score"]))
    assert "different judges" in result.missing[MT_BENCH_SCORE]
    assert decision.outcome == KEPT and "could not be compared" in decision.reason


def test_mt_bench_judged_with_other_prompts_is_not_compared():
    """The same judge model grading with FastChat's prompts on one side and the built-in ones on the other
    gives scores on different scales: not a difference between the models."""
    champion = judgments("v1", {(q, t): 5 for q in range(1, 11) for t in (1, 2)})
    challenger = [{**j, "judge": ["judge-x", "builtin-single" if j["turn"] == 1 else "builtin-multi"], "score": 9}
                  for j in judgments("v2", {(q, t): 9 for q in range(1, 11) for t in (1, 2)})]
    result, decision = run_gate(files(None, champion), files(None, challenger), NoJudge(),
                                GateConfig(primary_metric="mt_bench/score", gated_metrics=["mt_bench/score"]))
    assert MT_BENCH_SCORE not in result.differences
    assert "different judge prompts" in result.missing[MT_BENCH_SCORE]
    assert decision.outcome == KEPT


def test_alpaca_win_rates_read_annotations_as_alpaca_eval_does():
    """Preference 0 is alpaca_eval's old code for a draw and values outside [1, 2] are not preferences:
    get_winrate counts the first as 1.5 and leaves the others out, and so must every win rate read from files."""
    from alpaca_eval.metrics import get_winrate

    from orpo.head_to_head import win_rate_difference

    preferences = [2.0, 1.0, 0.0, 0.0, 1.75, 1.5, float("nan"), -1.0, 3.0, 2.0, 1.2, 0.0]
    annotations = [{"preference": p} for p in preferences]
    official = get_winrate(annotations)
    estimate = model_estimates(EvaluationFiles(root=None, annotations=annotations))["alpaca/win_rate"]
    assert estimate.estimate == pytest.approx(official["win_rate"], abs=1e-9)
    assert estimate.n == official["n_total"]
    head = win_rate_difference(annotations, confidence=0.95, n_resamples=200, seed=0)
    assert head.interval.estimate == pytest.approx(official["win_rate"], abs=1e-9)
    assert head.n_failed == len(preferences) - official["n_total"]


def test_identical_mt_bench_conversations_differ_by_zero_whatever_the_judge_said():
    answers = [{"question_id": 1, "model_id": "m", "choices": [{"index": 0, "turns": ["a", "b"]}]}]
    changed = [{"question_id": 1, "model_id": "m", "choices": [{"index": 0, "turns": ["a", "c"]}]}]
    champion = files(None, judgments("v1", {(1, 1): 6, (1, 2): 5}), answers=answers)
    challenger = files(None, judgments("v2", {(1, 1): 8, (1, 2): 9}), answers=changed)
    result, _ = run_gate(champion, challenger, NoJudge(),
                         GateConfig(primary_metric="mt_bench/score", gated_metrics=["mt_bench/score"]))
    difference = result.differences[MT_BENCH_SCORE]
    assert difference.n_ties == 1  # turn 1 is the same conversation; turn 2 differs
    assert difference.interval.estimate == pytest.approx((0 + 4) / 2)


def test_preference_accuracy_pairs_by_pair_id():
    champion = margins([1.0] * 20 + [-1.0] * 20)
    challenger = list(reversed(margins([1.0] * 35 + [-1.0] * 5)))  # another order: paired by id, not position
    result, _ = run_gate(files(None, pref=champion), files(None, pref=challenger), NoJudge(),
                         GateConfig(primary_metric="preference/accuracy", gated_metrics=["preference/accuracy"]))
    interval = result.differences[PREFERENCE_ACCURACY].interval
    assert interval.estimate == pytest.approx(15 / 40) and interval.low > 0 and interval.p_value < 0.001
    foreign = [{**m, "pair_id": "other" + m["pair_id"]} for m in challenger]
    result, _ = run_gate(files(None, pref=champion), files(None, pref=foreign), NoJudge(),
                         GateConfig(primary_metric="preference/accuracy", gated_metrics=["preference/accuracy"]))
    assert "different preference pairs" in result.missing[PREFERENCE_ACCURACY]


def test_nothing_saved_on_the_champion_keeps_it_and_says_what_is_missing():
    result, decision = run_gate(files(None), files(outputs("v2", ["x"])), NoJudge())
    assert decision.outcome == KEPT
    assert "model_outputs.json" in decision.reason and "the champion" in decision.reason


def test_the_reader_prefers_the_new_layout_and_falls_back_to_todays(tmp_path):
    today = tmp_path / "today"
    today.mkdir()
    (today / "model_judgment.jsonl").write_text(json.dumps({"question_id": 1, "turn": 1, "score": 3}) + "\n")
    (today / "preference_margins.json").write_text(json.dumps(margins([0.1])))
    assert read_evaluation(today).mt_bench_judgments[0]["score"] == 3
    new = tmp_path / "new"
    (new / "model_judgment").mkdir(parents=True)
    (new / "model_judgment" / "gpt-4_single.jsonl").write_text(json.dumps({"question_id": 1, "turn": 1, "score": 9}))
    (new / "model_judgment.jsonl").write_text(json.dumps({"question_id": 1, "turn": 1, "score": 1}))
    files_new = read_evaluation(new)
    assert files_new.mt_bench_judgments[0]["score"] == 9 and files_new.alpaca_outputs is None


def test_model_estimates_carry_intervals_and_the_start_model():
    pref = [{**m, "base_margin": -m["margin"]} for m in margins([1.0] * 15 + [-1.0] * 5)]
    annotations = [{"preference": 2.0 if i % 4 else 1.0} for i in range(20)]
    estimates = model_estimates(EvaluationFiles(root=None, annotations=annotations, preference_margins=pref,
                                                mt_bench_judgments=judgments("m", {(1, 1): 6, (2, 1): 8})))
    assert estimates["alpaca/win_rate"].estimate == pytest.approx(75.0)
    assert estimates["mt_bench/score"].estimate == pytest.approx(7.0)
    assert estimates["preference/accuracy"].estimate == pytest.approx(0.75)
    start = model_estimates(EvaluationFiles(root=None, preference_margins=pref), start_model=True)
    assert set(start) == {"preference/accuracy"} and start["preference/accuracy"].estimate == pytest.approx(0.25)


def test_summary_chart_draws_models_and_differences(tmp_path):
    from orpo.gate_plots import summary_chart

    champion_texts = [short(i) for i in range(30)]
    challenger_texts = [long(i) for i in range(30)]
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    pref = margins([1.0] * 25 + [-1.0] * 5)
    _, decision = run_gate(files(outputs("v1", champion_texts), pref=pref),
                           files(outputs("v2", challenger_texts), pref=pref), judge)
    models = {"start model": {}, "champion v1": model_estimates(files(None, pref=pref)),
              "challenger v2": model_estimates(files(None, pref=pref))}
    png = summary_chart(models, decision.compared, tmp_path / "summary.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert re.search(r"\[\d", decision.compared[HEAD_TO_HEAD_WIN_RATE]["text"])


def test_the_evaluation_summary_chart_shows_the_start_model_and_the_model(tmp_path):
    from gate_helpers import write_evaluation

    from orpo.gate_plots import evaluation_summary_chart

    assert evaluation_summary_chart(write_evaluation(tmp_path / "empty"), "m") is None
    pref = [{**m, "base_margin": 0.1} for m in margins([1.0, -1.0] * 10)]
    report = write_evaluation(tmp_path / "full", mt=judgments("m", {(1, 1): 6, (2, 1): 8}), pref=pref)
    png = evaluation_summary_chart(report, "my-model")
    assert png == report / "summary.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_margin_above_no_difference_must_be_cleared_by_the_whole_interval():
    champion_texts = [short(i) for i in range(40)]
    challenger_texts = [long(i) if i % 4 else f"R{i}" for i in range(40)]  # 75% wins
    judge = LongerAnswerJudge(champion_texts + challenger_texts)
    _, decision = run_gate(files(outputs("v1", champion_texts)), files(outputs("v2", challenger_texts)), judge,
                           GateConfig(margin=70.0))
    win = decision.compared[HEAD_TO_HEAD_WIN_RATE]
    assert win["margin"] == 70.0 and 50.0 < win["low"] < 70.0
    assert decision.outcome == KEPT and "does not lie above 70%" in decision.reason


def test_a_corrupt_evaluation_file_is_named(tmp_path):
    (tmp_path / "model_outputs.json").write_text('[{"instruction": ')
    with pytest.raises(ValueError, match="model_outputs.json: not valid JSON"):
        read_evaluation(tmp_path)


def test_preference_accuracy_promotes_only_when_mcnemars_test_agrees():
    """On 1000 pairs where the challenger alone is right on 14 and the champion alone on 5, the Agresti-Min
    interval excludes 0 but McNemar's exact test, the test the decision reports, gives p = 0.064: that is not a
    significant improvement at 95%, so it must not promote (and must not be called significantly better).
    With 15 against 5 both agree (p = 0.041) and it promotes."""
    from orpo.head_to_head import Difference, HeadToHead
    from orpo.stats import paired_accuracy_difference

    gate = GateConfig(primary_metric=PREFERENCE_ACCURACY, gated_metrics=[PREFERENCE_ACCURACY])

    def decide_on(only_challenger: int, only_champion: int):
        both = 1000 - only_challenger - only_champion
        challenger = [True] * only_challenger + [False] * only_champion + [True] * both
        champion = [False] * only_challenger + [True] * only_champion + [True] * both
        interval = paired_accuracy_difference(challenger, champion, confidence=gate.confidence)
        result = HeadToHead(differences={PREFERENCE_ACCURACY: Difference(PREFERENCE_ACCURACY, interval)})
        return interval, decide_head_to_head(result, gate, challenger_version="2", champion_version="1")

    interval, decision = decide_on(14, 5)
    assert interval.low > 0 and interval.p_value == pytest.approx(0.0636, abs=1e-3)  # the two disagree here
    assert not decision.promoted
    assert decision.compared[PREFERENCE_ACCURACY]["verdict"] == "no significant difference"
    interval, decision = decide_on(15, 5)
    assert interval.low > 0 and interval.p_value < 0.05
    assert decision.promoted and decision.outcome == PROMOTED
