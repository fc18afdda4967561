"""MT-Bench: rating parsing, FastChat prompts and scores, the CLI, two-turn generation on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

import evals.generate as generate_module
from evals.cli import app
from evals.generate import MT_BENCH_TEMPERATURES, generate_mt_bench_answers
from evals.mt_bench import (
    grade_answers,
    grading_prompts,
    mt_bench_scores,
    parse_rating,
    radar_chart,
)
from evals.sources import (
    load_judge_prompts,
    load_mt_bench_questions,
    load_reference_answers,
)

SAMPLE_QUESTIONS = "data/samples/eval/mt_bench_questions.jsonl"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is fine. Rating: [[8]]", 8.0),
        ("Rating: [[8.5]]", 8.5),
        ("I would give it [7] overall", 7.0),
        ("[[3]] but later [[9]]", 3.0),  # FastChat takes the first match
        ("[[10]]", 10.0),
        ("no rating here", None),
        ("Rating: [[eight]]", None),
        ("Rating: [[42]]", 42),  # FastChat keeps what literal_eval reads, also outside 1-10
        ("", None),
        (None, None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def _judgment(qid, turn, score, model="m"):
    return {"question_id": qid, "model": model, "judge": ["gpt-4", "single-v1"], "score": score, "turn": turn}


def test_scores_per_turn_category_and_failures():
    questions = [{"question_id": 1, "category": "math"}, {"question_id": 2, "category": "writing"}]
    judgments = [_judgment(1, 1, 4), _judgment(1, 2, 6), _judgment(2, 1, 9), _judgment(2, 2, -1)]
    scores = mt_bench_scores(judgments, questions)
    assert scores.score == pytest.approx((4 + 6 + 9) / 3)
    assert scores.turn_1 == pytest.approx(6.5) and scores.turn_2 == pytest.approx(6.0)
    assert scores.categories == {"math": 5.0, "writing": 9.0}
    assert scores.parse_failures == 1 and scores.n_judgments == 4
    with pytest.raises(ValueError, match="several models"):
        mt_bench_scores([*judgments, _judgment(1, 1, 5, model="other")])


def test_mt_bench_score_cli(tmp_path, shared_data):
    path = tmp_path / "judgment.jsonl"
    rows = [_judgment(81, 1, 8), _judgment(81, 2, 6), _judgment(101, 1, 3), _judgment(101, 2, 5),
            _judgment(81, 1, 2, model="other")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chart = tmp_path / "radar.png"
    result = CliRunner().invoke(app, ["mt-bench-score", "--judgments", str(path), "--questions",
                                      str(shared_data / "mt_bench" / "question.jsonl"), "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["m"]["score"] == pytest.approx(5.5) and out["other"]["score"] == pytest.approx(2.0)
    assert out["m"]["categories"] == {"reasoning": 4.0, "writing": 7.0}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mt_bench_score_cli_names_the_bad_line(tmp_path):
    path = tmp_path / "judgment.jsonl"
    path.write_text(json.dumps(_judgment(1, 1, 5)) + "\n" + json.dumps({"question_id": 2}) + "\n")
    result = CliRunner().invoke(app, ["mt-bench-score", "--judgments", str(path)])
    assert result.exit_code == 2 and "judgment.jsonl:2" in result.output


def test_fastchat_prompts_use_references_for_math(shared_data):
    data = shared_data / "mt_bench"
    questions = [q for q in load_mt_bench_questions(str(data / "question.jsonl")) if q["question_id"] in (81, 111)]
    references = load_reference_answers(data / "reference_answer_gpt-4.jsonl")
    answers = {81: ["a1", "a2"], 111: ["m1", "m2"]}
    prompts = grading_prompts(questions, answers, judge_prompts=load_judge_prompts(data / "judge_prompts.jsonl"),
                              references=references)
    names = {(p.question_id, p.turn): p.prompt_name for p in prompts}
    assert names == {(81, 1): "single-v1", (81, 2): "single-v1-multi-turn",
                     (111, 1): "single-math-v1", (111, 2): "single-math-v1-multi-turn"}
    math_turn_2 = next(p for p in prompts if (p.question_id, p.turn) == (111, 2)).messages[-1]["content"]
    assert references[111][1] in math_turn_2 and "m2" in math_turn_2 and "{" + "answer_2}" not in math_turn_2


def test_fastchat_prompts_are_filled_with_str_format(shared_data):
    """An answer holding a placeholder's text reaches the judge unchanged (FastChat fills with str.format)."""
    data = shared_data / "mt_bench"
    table = load_judge_prompts(data / "judge_prompts.jsonl")
    question = next(q for q in load_mt_bench_questions(str(data / "question.jsonl")) if q["question_id"] == 81)
    answers = {81: ["Turn one mentions {answer_2} and {question}.", "Second {ref_answer_1} turn"]}
    prompts = grading_prompts([question], answers, judge_prompts=table)
    turn_2 = prompts[1]
    expected = table["single-v1-multi-turn"]["prompt_template"].format(
        question_1=question["turns"][0], question_2=question["turns"][1],
        answer_1=answers[81][0], answer_2=answers[81][1])
    assert turn_2.messages == [{"role": "system", "content": table["single-v1-multi-turn"]["system_prompt"]},
                               {"role": "user", "content": expected}]
    assert "Turn one mentions {answer_2} and {question}." in turn_2.messages[1]["content"]


def test_builtin_prompts_grade_and_count_failures():
    questions = load_mt_bench_questions(SAMPLE_QUESTIONS)
    answers = [{"question_id": q["question_id"], "model_id": "m", "choices": [{"index": 0, "turns": ["x", "y"]}]}
               for q in questions]

    class Judge:
        kind, model = "hf", "fake"

        def complete(self, prompts, prefill=None):
            return ["Good. Rating: [[7]]" if i % 4 else "no idea" for i in range(len(prompts))]

    judgments = grade_answers(Judge(), questions, answers)
    assert len(judgments) == 2 * len(questions)
    scores = mt_bench_scores(judgments, questions)
    assert scores.parse_failures == len(questions) // 2 and scores.score == 7.0
    assert {j["judge"][1] for j in judgments} >= {"builtin-single", "builtin-multi", "builtin-single-ref"}


def test_two_turn_generation_sees_own_answer_and_uses_category_temperatures(tiny_model_and_tokenizer, monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer
    questions = load_mt_bench_questions(SAMPLE_QUESTIONS)
    calls = []
    real = generate_module.generate

    def spy(model, tokenizer, conversations, **kwargs):
        out = real(model, tokenizer, conversations, **kwargs)
        calls.append((kwargs["temperature"], [list(c) for c in conversations], out))
        return out

    monkeypatch.setattr(generate_module, "generate", spy)
    answers = generate_mt_bench_answers(model, tokenizer, questions, model_id="tiny", max_new_tokens=6,
                                        batch_size=4)
    by_id = {a["question_id"]: a for a in answers}
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for answer in answers:
        assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert len(answer["choices"][0]["turns"]) == 2
    category = {q["question_id"]: q["category"] for q in questions}
    for temperature, conversations, _ in calls:
        for conversation in conversations:
            qid = next(q["question_id"] for q in questions if q["turns"][0] == conversation[0]["content"])
            assert temperature == MT_BENCH_TEMPERATURES[category[qid]]
            if len(conversation) == 3:  # turn 2 carries the model's own turn-1 answer
                assert conversation[1] == {"role": "assistant", "content": by_id[qid]["choices"][0]["turns"][0]}
                assert conversation[2]["content"] == next(q for q in questions if q["question_id"] == qid)["turns"][1]
    assert {len(c) for _, convs, _ in calls for c in convs} == {1, 3}


def test_sampled_answers_keep_the_models_own_sampling_settings_as_fastchat_does(tiny_model_and_tokenizer,
                                                                                monkeypatch):
    """FastChat's gen_model_answer calls `model.generate(do_sample=True, temperature=t, max_new_tokens=n)`:
    the model's generation_config supplies top_p/top_k (Llama-3: top_p 0.9, Qwen2: 0.8); only the category
    temperature is FastChat's own."""
    model, tokenizer = tiny_model_and_tokenizer
    questions = [q for q in load_mt_bench_questions(SAMPLE_QUESTIONS) if q["category"] == "writing"][:1]
    monkeypatch.setattr(model.generation_config, "top_p", 0.9)
    monkeypatch.setattr(model.generation_config, "top_k", 20)
    used = []
    real = model.generate

    def spy(*args, **kwargs):
        used.append(model._prepare_generation_config(kwargs["generation_config"])[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_mt_bench_answers(model, tokenizer, questions, model_id="tiny", max_new_tokens=4, batch_size=1)
    assert used and all(c.do_sample and c.temperature == MT_BENCH_TEMPERATURES["writing"] for c in used)
    assert {(c.top_p, c.top_k) for c in used} == {(0.9, 20)}


def test_radar_chart_writes_png(tmp_path):
    path = radar_chart({"a": {"math": 3.0, "writing": 7.0, "stem": 5.0}, "b": {"math": 6.0, "stem": math.nan}},
                       tmp_path / "r.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
