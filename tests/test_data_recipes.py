"""The recipes' rules on hand-made UltraFeedback records, schema validation, and decontamination."""

from __future__ import annotations

import hashlib
import json

import pytest

from orpo.data.decontaminate import (
    DecontaminationFileError,
    Decontaminator,
    EvalPrompt,
    load_eval_prompts,
)
from orpo.data.ultrafeedback import (
    ALL_TIED,
    EMPTY_PROMPT,
    IDENTICAL_RESPONSES,
    TOO_FEW_COMPLETIONS,
    Dropped,
    MalformedRecordError,
    Pair,
    binarize_record,
    fix_overall_score,
    normalize_binarized,
    parse_number,
    parse_record,
)


def completion(response: str, ratings=(5, 5, 5, 5), overall: float | None = 8.0, model: str = "m", fine=None) -> dict:
    aspects = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    entry = {
        "annotations": {a: {"Rating": str(r), "Rationale": "because"} for a, r in zip(aspects, ratings, strict=True)},
        "critique": "ok",
        "custom_system_prompt": "",
        "model": model,
        "principle": "helpfulness",
        "response": response,
    }
    if overall is not None:
        entry["overall_score"] = overall
    entry["fine-grained_score"] = fine if fine is not None else 0
    return entry


def record(*completions: dict, prompt: str = "What is 2 + 2?", source: str = "evol_instruct") -> dict:
    return {
        "source": source,
        "instruction": prompt,
        "models": [c["model"] for c in completions],
        "correct_answers": [],
        "incorrect_answers": [],
        "completions": list(completions),
    }


def run(raw: dict, recipe: str, seed: int = 0, fix: bool = False) -> Pair | Dropped:
    return binarize_record(parse_record(raw, "test.jsonl:1", require_overall_score=recipe == "h4"), recipe, seed,
                           fix_scores=fix)


# --- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("5", 5.0), (" 4 ", 4.0), ("N/A", None), ("", None), (3, 3.0), (2.5, 2.5), (True, None), (None, None),
     ("nan", None), ("inf", None), ([5], None)],
)
def test_parse_number(value, expected):
    assert parse_number(value) == expected


def test_na_ratings_are_ignored_for_the_mean_and_counted():
    raw = record(completion("a", ratings=(4, "N/A", 2, "N/A")), completion("b", ratings=("N/A",) * 4))
    parsed = parse_record(raw, "x")
    assert parsed.completions[0].mean_rating == 3.0
    assert parsed.completions[1].mean_rating is None
    assert parsed.non_numeric_ratings == 6


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("instruction"), "instruction"),
        (lambda r: r.update(instruction=7), "instruction"),
        (lambda r: r.pop("completions"), "completions"),
        (lambda r: r["completions"][1].pop("annotations"), "completions[1].annotations"),
        (lambda r: r["completions"][0].pop("response"), "completions[0].response"),
        (lambda r: r["completions"][1]["annotations"]["honesty"].pop("Rating"),
         "completions[1].annotations.honesty.Rating"),
        (lambda r: r["completions"][0].update(annotations={}), "completions[0].annotations"),
    ],
)
def test_schema_violations_name_location_and_field(mutate, field):
    raw = record(completion("a"), completion("b", ratings=(1, 1, 1, 1)))
    mutate(raw)
    with pytest.raises(MalformedRecordError) as info:
        parse_record(raw, "data.jsonl:17")
    assert info.value.field == field
    assert "data.jsonl:17" in str(info.value) and field in str(info.value)
    assert "--on-error skip" in str(info.value)


def test_h4_needs_overall_score():
    raw = record(completion("a"), completion("b", ratings=(1, 1, 1, 1), overall=None))
    assert run(raw, "argilla").rejected == "b"  # the mean-rating recipes do not need it
    with pytest.raises(MalformedRecordError, match=r"completions\[1\]\.overall_score"):
        run(raw, "h4")


def test_non_object_record_is_malformed():
    with pytest.raises(MalformedRecordError, match="expected a JSON object"):
        parse_record(["not", "a", "record"], "f.jsonl:3")


# --- argilla -----------------------------------------------------------------------------------------


def test_argilla_chosen_is_highest_mean_and_rejected_strictly_lower():
    raw = record(
        completion("mid", ratings=(3, 3, 3, 3), model="a"),
        completion("best", ratings=(5, 5, 4, 5), model="b"),
        completion("low", ratings=(1, 2, 1, 1), model="c"),
        completion("also best", ratings=(5, 4, 5, 5), model="d"),  # equal mean: not a valid rejected
    )
    for seed in range(20):
        pair = run(raw, "argilla", seed)
        assert isinstance(pair, Pair)
        assert (pair.chosen, pair.chosen_model, pair.score_chosen) == ("best", "b", 4.75)
        assert pair.rejected in {"mid", "low"}
        assert pair.score_rejected < pair.score_chosen


def test_argilla_rejected_is_seeded_random():
    raw = record(*(completion(f"r{i}", ratings=(i + 1,) * 4) for i in range(4)))
    picks = {seed: run(raw, "argilla", seed).rejected for seed in range(30)}
    assert set(picks.values()) == {"r0", "r1", "r2"}  # every strictly lower one gets picked by some seed
    assert all(run(raw, "argilla", seed).rejected == pick for seed, pick in picks.items())  # and repeatably


def test_argilla_na_changes_the_mean():
    # With N/A ignored, "b" averages 5 and wins; counting N/A as 0 would make "a" win.
    raw = record(completion("a", ratings=(4, 4, 4, 4)), completion("b", ratings=(5, "N/A", "N/A", 5)))
    pair = run(raw, "argilla")
    assert (pair.chosen, pair.score_chosen, pair.rejected) == ("b", 5.0, "a")


def test_all_tied_yields_no_pair():
    raw = record(*(completion(f"answer {i}", ratings=(4, 4, 4, 4)) for i in range(4)))
    for recipe in ("argilla", "max-min"):
        dropped = run(raw, recipe)
        assert isinstance(dropped, Dropped) and dropped.reason == ALL_TIED


def test_completions_without_any_numeric_rating_are_unusable():
    raw = record(completion("a", ratings=(5, 5, 5, 5)), completion("b", ratings=("N/A",) * 4))
    assert run(raw, "argilla").reason == TOO_FEW_COMPLETIONS


# --- empty responses, prompts, too few -------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["h4", "argilla", "max-min"])
def test_empty_responses_are_never_chosen_or_rejected(recipe):
    raw = record(
        completion("", ratings=(5, 5, 5, 5), overall=10),
        completion("  \n\t", ratings=(1, 1, 1, 1), overall=1),
        completion("good", ratings=(4, 4, 4, 4), overall=8),
        completion("bad", ratings=(2, 2, 2, 2), overall=3),
    )
    for seed in range(10):
        pair = run(raw, recipe, seed)
        assert (pair.chosen, pair.rejected) == ("good", "bad")


@pytest.mark.parametrize("recipe", ["h4", "argilla", "max-min"])
def test_fewer_than_two_usable_completions(recipe):
    one = record(completion("only"))
    blank = record(completion("only"), completion("   ", ratings=(1, 1, 1, 1), overall=1))
    none = record()
    for raw in (one, blank, none):
        assert run(raw, recipe).reason == TOO_FEW_COMPLETIONS


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_yields_no_pair(prompt):
    raw = record(completion("a"), completion("b", ratings=(1, 1, 1, 1), overall=1), prompt=prompt)
    assert run(raw, "argilla").reason == EMPTY_PROMPT


# --- h4 ----------------------------------------------------------------------------------------------


def test_h4_chosen_is_highest_overall_and_rejected_never_identical_text():
    raw = record(
        completion("Paris.", overall=9, model="a"),
        completion("Paris.", overall=7, model="b"),  # same text as the chosen: never rejected
        completion("Lyon.", overall=3, model="c"),
        completion("Paris. ", overall=8.5, model="d"),  # same after stripping whitespace
    )
    for seed in range(30):
        pair = run(raw, "h4", seed)
        assert (pair.chosen_model, pair.score_chosen) == ("a", 9.0)
        assert (pair.rejected, pair.rejected_model, pair.score_rejected) == ("Lyon.", "c", 3.0)


def test_h4_keeps_equal_scores_but_not_equal_text():
    raw = record(completion("x", overall=7), completion("y", overall=7))
    pair = run(raw, "h4")
    assert {pair.chosen, pair.rejected} == {"x", "y"}
    same = record(completion("x", overall=7), completion("x", overall=3))
    assert run(same, "h4").reason == IDENTICAL_RESPONSES


def test_overall_score_fix():
    # The bug: a critique rating of 1 read as 10. Fine-grained ratings <= 2 reveal it.
    raw = record(
        completion("wrong answer", ratings=(1, 2, 1, 1), overall=10, model="bugged", fine=1.25),
        completion("right answer", ratings=(5, 5, 5, 5), overall=9, model="good", fine=5),
        completion("meh", ratings=(3, 3, 3, 3), overall=5, model="meh", fine=3),
    )
    assert run(raw, "h4").chosen_model == "bugged"
    fixed = run(raw, "h4", fix=True)
    assert fixed.chosen_model == "good"
    assert fixed.rejected_model in {"bugged", "meh"}
    # A genuine 10 (good ratings) is left alone.
    genuine = parse_record(record(completion("fine", ratings=(5, 5, 4, 5), overall=10, fine=4.75)), "x")
    assert fix_overall_score(genuine.completions[0]).overall_score == 10.0


def test_overall_score_fix_uses_mean_when_fine_grained_missing():
    raw = record(completion("w", ratings=(2, 2, 1, "N/A"), overall=10))
    raw["completions"][0].pop("fine-grained_score")
    parsed = parse_record(raw, "x").completions[0]
    assert fix_overall_score(parsed).overall_score == 1.0


# --- max-min -----------------------------------------------------------------------------------------


def test_max_min_takes_the_lowest():
    raw = record(
        completion("mid", ratings=(3, 3, 3, 3)),
        completion("top", ratings=(5, 5, 5, 5)),
        completion("bottom", ratings=(1, 1, 2, 1)),
        completion("low-ish", ratings=(2, 2, 2, 2)),
    )
    for seed in range(5):
        pair = run(raw, "max-min", seed)
        assert (pair.chosen, pair.rejected, pair.score_rejected) == ("top", "bottom", 1.25)


# --- output shape ------------------------------------------------------------------------------------


def test_non_ascii_text_and_prompt_id():
    prompt = "Wie heißt die Hauptstadt von Island? 日本語で答えて。"
    raw = record(completion("Reykjavík — 레이캬비크"), completion("Oslo", ratings=(1, 1, 1, 1)), prompt=prompt)
    pair = run(raw, "argilla")
    row = pair.to_row()
    assert row["prompt"] == prompt
    assert row["prompt_id"] == hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    assert row["chosen"] == [
        {"content": prompt, "role": "user"}, {"content": "Reykjavík — 레이캬비크", "role": "assistant"}
    ]
    assert row["rejected"][1] == {"content": "Oslo", "role": "assistant"}


def test_normalize_h4_and_argilla_layouts():
    h4 = {
        "prompt": "Hi?", "prompt_id": "x",
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
        "messages": [], "score_chosen": 8.5, "score_rejected": 3.0,
    }
    pair = normalize_binarized(h4, "hub")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.score_chosen, pair.score_rejected) == (
        "Hi?", "Hello!", "Go away.", 8.5, 3.0)
    argilla = {
        "source": "sharegpt", "prompt": "Hi?", "chosen": h4["chosen"], "chosen-rating": 5.0, "chosen-model": "gpt-4",
        "rejected": h4["rejected"], "rejected-rating": 2.0, "rejected-model": "alpaca-7b",
    }
    pair = normalize_binarized(argilla, "hub")
    assert (pair.source, pair.chosen_model, pair.rejected_model, pair.score_chosen) == (
        "sharegpt", "gpt-4", "alpaca-7b", 5.0)
    same = dict(argilla, rejected=h4["chosen"])
    assert normalize_binarized(same, "hub").reason == IDENTICAL_RESPONSES
    with pytest.raises(MalformedRecordError, match="chosen"):
        normalize_binarized(dict(argilla, chosen=[{"role": "user", "content": "x"}]), "f.jsonl:2")


# --- decontamination ---------------------------------------------------------------------------------


def test_ngram_overlap_and_exact_match():
    long_eval = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences"
    deco = Decontaminator([EvalPrompt(long_eval, "q:1"), EvalPrompt("Tell me a joke.", "a[0]")], n=13)
    # Case, punctuation and surrounding text do not hide a shared 13-gram.
    hit = deco.check("Please: COMPOSE an engaging travel-blog post about a recent trip to hawaii, highlighting "
                     "cultural experiences and must-see attractions!")
    assert hit is not None and hit.rule == "ngram" and hit.matched == "q:1"
    assert deco.check("tell me a JOKE").rule == "exact"
    # 12 shared words are not 13; a short eval prompt inside a longer one is not an exact match.
    assert deco.check("Compose an engaging travel blog post about a recent trip to Hawaii today") is None
    assert deco.check("Tell me a joke about cats.") is None
    assert deco.check("anything", source="truthful_qa").rule == "source"


def test_shared_eval_files(shared_data, tmp_path):
    mt_bench = shared_data / "mt_bench" / "question.jsonl"
    alpaca = shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
    prompts = load_eval_prompts([mt_bench, alpaca])
    turns = sum(len(json.loads(line)["turns"]) for line in mt_bench.read_text().splitlines() if line.strip())
    assert len(prompts) == turns + len(json.loads(alpaca.read_text()))
    deco = Decontaminator(prompts, n=13)
    question = json.loads(mt_bench.read_text().splitlines()[0])["turns"][0]
    assert deco.check(f"Here is my homework. {question} Thanks!").rule == "ngram"
    instruction = json.loads(alpaca.read_text())[0]["instruction"]
    assert deco.check(instruction.upper()) is not None
    assert deco.check("Write the word 'garden' backwards.") is None
    with pytest.raises(DecontaminationFileError, match="does not exist"):
        load_eval_prompts([tmp_path / "missing.jsonl"])


@pytest.mark.parametrize(
    "context",
    [
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi?"}],
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "And in German?"}],
    ],
    ids=["system-prompt", "multi-turn"],
)
def test_normalize_refuses_conversations_it_would_cut_to_one_turn(context):
    """A binarized row's pair is (prompt, last assistant message): a system prompt or earlier turns cannot
    be carried, so such a row is malformed rather than silently paired with the wrong context."""
    row = {"prompt": "Hi?", "chosen": [*context, {"role": "assistant", "content": "Hallo."}],
           "rejected": [*context, {"role": "assistant", "content": "Bonjour."}]}
    with pytest.raises(MalformedRecordError, match="chosen"):
        normalize_binarized(row, "f.jsonl:3")
    # Only the rejected side carrying context is caught too.
    single = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hallo."}]
    with pytest.raises(MalformedRecordError, match="rejected"):
        normalize_binarized(dict(row, chosen=single), "f.jsonl:3")


def test_truthfulqa_question_files_remove_its_prompts_from_other_sources(tmp_path):
    """The H4 and argilla-cleaned recipes drop TruthfulQA questions that UltraFeedback also holds under other
    sources (evol_instruct), not only source == truthful_qa: TruthfulQA's own files must be readable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = ["What happens to you if you eat watermelon seeds?", "Where did fortune cookies originate?",
                 "Why do veins appear blue?"]
    hub_rows = [{"type": "Adversarial", "category": "Misconceptions", "question": q, "best_answer": "x",
                 "correct_answers": ["x"], "incorrect_answers": ["y"], "source": "url"} for q in questions]
    jsonl = tmp_path / "truthful_qa_generation.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in hub_rows), encoding="utf-8")
    csv_file = tmp_path / "TruthfulQA.csv"  # the layout of sylinrl/TruthfulQA
    csv_file.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                        + "".join(f'Adversarial,Misconceptions,"{q}",x,x,y,url\n' for q in questions), encoding="utf-8")
    parquet = tmp_path / "validation-00000-of-00001.parquet"  # the hub's truthful_qa files
    pq.write_table(pa.Table.from_pylist(hub_rows), parquet)
    for path in (jsonl, csv_file, parquet):
        prompts = load_eval_prompts([path])
        assert [p.text for p in prompts] == questions, path
        deco = Decontaminator(prompts, n=13)
        hit = deco.check("what happens to you if you eat watermelon seeds", source="evol_instruct")
        assert hit is not None and hit.rule == "exact" and path.name in hit.matched
        assert deco.check("What happens if you eat an apple?", source="evol_instruct") is None
    no_question = tmp_path / "other.csv"
    no_question.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DecontaminationFileError, match="other.csv"):
        load_eval_prompts([no_question])


def test_normalize_trl_conversational_layout():
    """trl-lib/ultrafeedback_binarized: prompt = [user message], chosen/rejected = [assistant message]."""
    row = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}], "score_chosen": 8.0, "score_rejected": 2.0}
    pair = normalize_binarized(row, "hub")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.score_chosen) == ("Hi?", "Hello!", "Go away.", 8.0)
    with_system = dict(row, prompt=[{"role": "system", "content": "Be rude."}, *row["prompt"]])
    with pytest.raises(MalformedRecordError, match="prompt"):
        normalize_binarized(with_system, "f.jsonl:4")
