"""MT-Bench single-answer grading (1-10) exactly as FastChat's llm_judge runs it, scores per turn and category.

With FastChat's `judge_prompts.jsonl` (the official protocol): `single-v1` for turn 1, `single-v1-multi-turn`
for turn 2, and `single-math-v1` / `single-math-v1-multi-turn` with the GPT-4 reference answers
(`reference_answer/gpt-4.jsonl`) for math, reasoning and coding. The user prompt is the template filled
with `str.format` (so braces inside answers are kept as they are), sent after the prompt's system message,
with `n: 1`, `temperature: 0`, `max_tokens: 2048`. The rating is the first `[[x]]`, else the first `[x]`,
read with `ast.literal_eval` and kept as it is; -1 when there is none, and a request that failed for good
is recorded as FastChat's `$ERROR$` judgment with score -1. Judgments are FastChat's single-grading records
(`question_id, model, judge, user_prompt, judgment, score, turn, tstamp`), so `show_result.py` reads them.

`BUILTIN_PROMPTS`, written for this project, serve the offline demo's small local judge only; their
numbers are never reported under MT-Bench's name.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NEED_REFERENCE = ("math", "reasoning", "coding")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
# FastChat's judge decoding (common.py run_judge_single for its OpenAI judges).
JUDGE_REQUEST = {"n": 1, "temperature": 0, "max_tokens": 2048}
API_ERROR_OUTPUT = "$ERROR$"

_SCALE = (
    "Finish with your rating from 1 to 10 written exactly like this: [[rating]], for example [[6]]."
)
BUILTIN_PROMPTS: dict[str, dict[str, Any]] = {
    "builtin-single": {
        "system_prompt": "You grade answers of AI assistants fairly and strictly.",
        "prompt_template": (
            "Grade how well the assistant's answer serves the user: is it correct, relevant, complete, clear "
            "and appropriately detailed? Explain briefly. " + _SCALE + "\n\n"
            "Question:\n{question}\n\nAnswer:\n{answer}"
        ),
    },
    "builtin-single-ref": {
        "system_prompt": "You grade answers of AI assistants fairly and strictly.",
        "prompt_template": (
            "Compare the assistant's answer with the reference answer and grade its correctness first, then "
            "its helpfulness. Point out any mistake briefly. " + _SCALE + "\n\n"
            "Question:\n{question}\n\nReference answer:\n{ref_answer_1}\n\nAnswer:\n{answer}"
        ),
    },
    "builtin-multi": {
        "system_prompt": "You grade answers of AI assistants fairly and strictly.",
        "prompt_template": (
            "Below is a two-turn conversation. Grade only the assistant's second answer: is it correct, "
            "relevant and helpful given the whole conversation? Explain briefly. " + _SCALE + "\n\n"
            "User: {question_1}\nAssistant: {answer_1}\nUser: {question_2}\nAssistant: {answer_2}"
        ),
    },
    "builtin-multi-ref": {
        "system_prompt": "You grade answers of AI assistants fairly and strictly.",
        "prompt_template": (
            "Below is a two-turn conversation and reference answers for both turns. Grade only the "
            "assistant's second answer, correctness first. " + _SCALE + "\n\n"
            "Reference:\nUser: {question_1}\nReference answer: {ref_answer_1}\nUser: {question_2}\n"
            "Reference answer: {ref_answer_2}\n\n"
            "Conversation:\nUser: {question_1}\nAssistant: {answer_1}\nUser: {question_2}\nAssistant: {answer_2}"
        ),
    },
}
# FastChat's prompt names for (multi_turn, with_reference).
FASTCHAT_NAMES = {
    (False, False): "single-v1",
    (False, True): "single-math-v1",
    (True, False): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
BUILTIN_NAMES = {
    (False, False): "builtin-single",
    (False, True): "builtin-single-ref",
    (True, False): "builtin-multi",
    (True, True): "builtin-multi-ref",
}


def parse_rating(judgment: str | None) -> float | int | None:
    """The rating in the first `[[8]]` / `[[8.5]]`, else the first `[8]` (FastChat's patterns); None if none.

    Like FastChat, the value is kept as `ast.literal_eval` reads it, also outside 1-10.
    """
    if not judgment:
        return None
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    if not match:
        return None
    try:
        return ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None


def judgment_file_name(judge_model: str) -> str:
    """FastChat's judgment file name for a judge model (`gpt-4_single.jsonl`), safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", judge_model).strip("-") + "_single.jsonl"


@dataclass
class GradingPrompt:
    question_id: int
    turn: int
    prompt_name: str
    messages: list[dict[str, str]]


def grading_prompts(
    questions: Sequence[dict[str, Any]],
    answers: dict[int, list[str]],
    *,
    judge_prompts: dict[str, dict[str, Any]] | None = None,
    references: dict[int, list[str]] | None = None,
) -> list[GradingPrompt]:
    """One grading prompt per answered turn (turn 1, and turn 2 for two-turn questions), FastChat's way.

    With FastChat prompts, a math/reasoning/coding question without a reference answer is an error (FastChat
    has one for each); with the built-in prompts it falls back to the question's own `reference`.
    """
    prompts = []
    table = judge_prompts or BUILTIN_PROMPTS
    names = FASTCHAT_NAMES if judge_prompts else BUILTIN_NAMES
    for question in questions:
        qid = int(question["question_id"])
        turns = answers.get(qid)
        if not turns:
            continue
        with_ref = question["category"] in NEED_REFERENCE
        reference = (references or {}).get(qid)
        if with_ref and not reference and judge_prompts:
            raise ValueError(
                f"MT-Bench question {qid} ({question['category']}) has no reference answer; FastChat grades it "
                "with the GPT-4 reference: set eval.mt_bench_reference_answers to reference_answer/gpt-4.jsonl"
            )
        reference = reference or question.get("reference")
        if with_ref and not reference:
            log.warning("question %s (%s) has no reference answer; grading without", qid, question["category"])
            with_ref = False
        kwargs: dict[str, str] = {}
        if with_ref and reference:
            kwargs = {"ref_answer_1": reference[0], "ref_answer_2": reference[1] if len(reference) > 1 else ""}
        last_turn = 2 if len(question["turns"]) == 2 and len(turns) >= 2 else 1
        for turn in range(1, last_turn + 1):
            name = names[(turn == 2, with_ref)]
            if name not in table:
                raise ValueError(f"judge prompts have no {name!r} (FastChat judge_prompts.jsonl names)")
            record = table[name]
            if turn == 1:
                user_prompt = record["prompt_template"].format(question=question["turns"][0], answer=turns[0], **kwargs)
            else:
                user_prompt = record["prompt_template"].format(
                    question_1=question["turns"][0], question_2=question["turns"][1],
                    answer_1=turns[0], answer_2=turns[1], **kwargs,
                )
            # FastChat's conversation for an OpenAI judge: the system message, then the user prompt.
            messages = [{"role": "system", "content": record["system_prompt"]}, {"role": "user", "content": user_prompt}]
            prompts.append(GradingPrompt(question_id=qid, turn=turn, prompt_name=name, messages=messages))
    return prompts


def grade_answers(
    judge,
    questions: Sequence[dict[str, Any]],
    answer_records: Sequence[dict[str, Any]],
    *,
    judge_prompts: dict[str, dict[str, Any]] | None = None,
    references: dict[int, list[str]] | None = None,
    judge_model: str | None = None,
) -> list[dict[str, Any]]:
    """Grade FastChat answer records; returns FastChat single-grading judgment records.

    An endpoint judge gets FastChat's request (`judge_model`, default the judge's model; n 1, temperature 0,
    max_tokens 2048); a local hf judge generates with the prefill "Rating: [[" (a small model rarely
    writes the format by itself).
    """
    answers = {int(r["question_id"]): list(r["choices"][0]["turns"]) for r in answer_records}
    model_ids = {int(r["question_id"]): r.get("model_id", "model") for r in answer_records}
    prompts = grading_prompts(questions, answers, judge_prompts=judge_prompts, references=references)
    name = judge_model or judge.model
    if getattr(judge, "kind", "") == "hf":
        completions = judge.complete([p.messages for p in prompts], prefill="Rating: [[")
    else:
        replies = judge.chat([{"model": name, "messages": p.messages, **JUDGE_REQUEST} for p in prompts])
        completions = [API_ERROR_OUTPUT if r.failed else r.text for r in replies]
    judgments = []
    for prompt, completion in zip(prompts, completions):
        rating = parse_rating(completion)
        judgments.append(
            {
                "question_id": prompt.question_id,
                "model": model_ids[prompt.question_id],
                "judge": [name, prompt.prompt_name],
                "user_prompt": prompt.messages[-1]["content"],
                "judgment": completion if completion is not None else API_ERROR_OUTPUT,
                "score": -1 if rating is None else rating,
                "turn": prompt.turn,
                "tstamp": time.time(),
            }
        )
    return judgments


@dataclass
class MTBenchScores:
    """Mean scores over parseable judgments: overall, per turn, per category; failures counted apart."""

    score: float
    turn_1: float
    turn_2: float
    categories: dict[str, float] = field(default_factory=dict)
    n_judgments: int = 0
    parse_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def mt_bench_scores(
    judgments: Sequence[dict[str, Any]], questions: Sequence[dict[str, Any]] | None = None, model: str | None = None
) -> MTBenchScores:
    """FastChat's `show_result` arithmetic: means of scores != -1; categories need the questions."""
    rows = [j for j in judgments if model is None or j.get("model") == model]
    models = {j.get("model") for j in rows}
    if len(models) > 1:
        raise ValueError(f"judgments of several models {sorted(map(str, models))}; pass model=")
    valid = [j for j in rows if float(j["score"]) != -1]
    category_of = {int(q["question_id"]): q["category"] for q in questions or []}
    categories: dict[str, list[float]] = {}
    for j in valid:
        category = category_of.get(int(j["question_id"]))
        if category:
            categories.setdefault(category, []).append(float(j["score"]))
    return MTBenchScores(
        score=_mean([float(j["score"]) for j in valid]),
        turn_1=_mean([float(j["score"]) for j in valid if int(j["turn"]) == 1]),
        turn_2=_mean([float(j["score"]) for j in valid if int(j["turn"]) == 2]),
        categories={c: _mean(v) for c, v in sorted(categories.items())},
        n_judgments=len(rows),
        parse_failures=len(rows) - len(valid),
    )


def radar_chart(series: dict[str, dict[str, float]], path: str | Path, title: str = "MT-Bench") -> Path:
    """A FastChat-style radar chart of per-category scores (0-10) for one or more models, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    categories = sorted({c for scores in series.values() for c in scores})
    if not categories:
        raise ValueError("no category scores to plot")
    angles = np.linspace(0, 2 * np.pi, len(categories), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for label, scores in series.items():
        values = [scores.get(c, 0.0) if not math.isnan(scores.get(c, 0.0)) else 0.0 for c in categories]
        ax.plot(angles + angles[:1], values + values[:1], label=label)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels(categories)
    ax.set_ylim(0, 10)
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
