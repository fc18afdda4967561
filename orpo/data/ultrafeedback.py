"""The UltraFeedback record schema, its validation, and the recipes that turn a record into one pair.

A raw `openbmb/UltraFeedback` record is one instruction with (usually four) completions, each rated by
GPT-4 on four aspects (`instruction_following, honesty, truthfulness, helpfulness`; ratings are strings
"1".."5" or "N/A") and given an `overall_score` (1-10) by a critique model. A recipe picks one chosen and
one rejected completion:

- `h4` (HuggingFaceH4/ultrafeedback_binarized): chosen = highest `overall_score`; rejected = a seeded
  random other completion whose response text differs from the chosen one.
- `argilla` (argilla/ultrafeedback-binarized-preferences[-cleaned]): score = mean of the numeric aspect
  ratings; chosen = highest mean; rejected = a seeded random completion with a strictly lower mean.
- `max-min`: chosen = highest mean, rejected = lowest mean, strictly lower.

Records that were already binarized (the H4 and argilla hub layouts, or this project's own output) are
normalized to the same `Pair`. Everything here is pure Python on one record at a time; reading files,
filtering and writing live in `orpo.data.binarize`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orpo.errors import OrpoError

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
RECIPES = ("h4", "argilla", "max-min")

# Why a record produced no pair. Every input record ends up in exactly one split or one of these.
MALFORMED = "malformed"
EMPTY_PROMPT = "empty_prompt"
DECONTAMINATED = "decontaminated"
TOO_FEW_COMPLETIONS = "too_few_completions"
ALL_TIED = "all_tied"
IDENTICAL_RESPONSES = "identical_responses"
TOO_LONG = "too_long"
DUPLICATE = "duplicate"
DROP_REASONS = (
    MALFORMED, EMPTY_PROMPT, DECONTAMINATED, TOO_FEW_COMPLETIONS, ALL_TIED, IDENTICAL_RESPONSES, TOO_LONG, DUPLICATE,
)

# The 2023 UltraFeedback bug: a critique rating of 1 was parsed as 10 (openbmb/UltraFeedback issue 8).
BUGGY_OVERALL_SCORE = 10.0
FIXED_OVERALL_SCORE = 1.0
BUG_MAX_FINE_GRAINED = 2.0


class MalformedRecordError(OrpoError, ValueError):
    """A record that does not follow the schema: says where (file:line) and which field."""

    def __init__(self, location: str, field: str, problem: str) -> None:
        self.location = location
        self.field = field
        self.problem = problem
        super().__init__(
            f"{location}: field {field!r}: {problem}. Fix the record, or pass --on-error skip "
            "(data.on_error=skip) to count it as malformed and go on"
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """One rated completion of a raw record. Ratings that are not numbers are None."""

    model: str
    response: str
    ratings: tuple[float | None, ...]  # in ASPECTS order
    overall_score: float | None
    fine_grained_score: float | None

    @property
    def mean_rating(self) -> float | None:
        numbers = [r for r in self.ratings if r is not None]
        return sum(numbers) / len(numbers) if numbers else None

    @property
    def is_blank(self) -> bool:
        return not self.response.strip()


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A validated raw UltraFeedback record."""

    source: str
    prompt: str
    completions: tuple[Completion, ...]
    non_numeric_ratings: int  # aspect ratings that were "N/A", missing or not numbers
    non_numeric_overall: int  # overall_score values that were not numbers


@dataclass(frozen=True, slots=True)
class Pair:
    """One preference pair, before it becomes an output row."""

    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float
    source: str
    chosen_model: str
    rejected_model: str
    prompt_id: str = ""  # filled in from the prompt when not given

    def __post_init__(self) -> None:
        if not self.prompt_id:
            object.__setattr__(self, "prompt_id", prompt_id(self.prompt))

    def to_row(self) -> dict[str, Any]:
        """The output row, in the layout of HuggingFaceH4/ultrafeedback_binarized."""
        return {
            "prompt": self.prompt,
            "prompt_id": self.prompt_id,
            "chosen": [{"content": self.prompt, "role": "user"}, {"content": self.chosen, "role": "assistant"}],
            "rejected": [{"content": self.prompt, "role": "user"}, {"content": self.rejected, "role": "assistant"}],
            "score_chosen": self.score_chosen,
            "score_rejected": self.score_rejected,
            "source": self.source,
            "chosen_model": self.chosen_model,
            "rejected_model": self.rejected_model,
        }


@dataclass(frozen=True, slots=True)
class Dropped:
    """A record that produced no pair, and why (one of DROP_REASONS)."""

    reason: str
    detail: str = ""


def prompt_id(prompt: str) -> str:
    """sha256 hex of the prompt's UTF-8 bytes, as in HuggingFaceH4/ultrafeedback_binarized."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def seeded_index(seed: int, key: str, n: int) -> int:
    """A choice in range(n) that depends only on (seed, key): stable when other records change."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


# ----------------------------------------------------------------------------------------------------
# Parsing and validation


def parse_number(value: Any) -> float | None:
    """A rating or score as a float; None for "N/A", booleans, non-numeric strings, NaN and infinities."""
    kind = type(value)
    if kind is str:  # the raw data's ratings are strings: the hot path
        try:
            number = float(value)
        except ValueError:
            return None
    elif kind is float or kind is int or (isinstance(value, (int, float)) and kind is not bool):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def parse_record(data: Any, location: str, *, require_overall_score: bool = False) -> RawRecord:
    """Validate one raw record; raise MalformedRecordError naming the field on a schema violation.

    Missing values that the data legitimately has ("N/A" ratings, a missing aspect) are not errors: they
    are ignored for the mean and counted. A completion without an `annotations` object, or whose aspect
    entries lack a `Rating`, is malformed; so is one without `overall_score` when the recipe needs it.
    """
    if type(data) is not dict and not isinstance(data, Mapping):
        raise MalformedRecordError(location, "(record)", f"expected a JSON object, got {type(data).__name__}")
    prompt = data.get("instruction")
    if not isinstance(prompt, str):
        raise MalformedRecordError(location, "instruction", _missing_or_type(data, "instruction", "a string"))
    raw_completions = data.get("completions")
    if not isinstance(raw_completions, list):
        raise MalformedRecordError(location, "completions", _missing_or_type(data, "completions", "a list"))
    source = data.get("source") or ""
    if not isinstance(source, str):
        raise MalformedRecordError(location, "source", f"expected a string, got {type(source).__name__}")
    completions = []
    non_numeric = non_numeric_overall = 0
    for index, raw in enumerate(raw_completions):
        where = f"completions[{index}]"
        completion, bad_ratings, bad_overall = _parse_completion(raw, location, where, require_overall_score)
        completions.append(completion)
        non_numeric += bad_ratings
        non_numeric_overall += bad_overall
    return RawRecord(source, prompt, tuple(completions), non_numeric, non_numeric_overall)


def _missing_or_type(data: Mapping, key: str, expected: str) -> str:
    if key not in data or data[key] is None:
        return "missing"
    return f"expected {expected}, got {type(data[key]).__name__}"


def _parse_completion(
    raw: Any, location: str, where: str, require_overall_score: bool
) -> tuple[Completion, int, int]:
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise MalformedRecordError(location, where, f"expected an object, got {type(raw).__name__}")
    response = raw.get("response")
    if not isinstance(response, str):
        raise MalformedRecordError(location, f"{where}.response", _missing_or_type(raw, "response", "a string"))
    annotations = raw.get("annotations")
    if type(annotations) is not dict and not isinstance(annotations, Mapping):
        raise MalformedRecordError(
            location, f"{where}.annotations", _missing_or_type(raw, "annotations", "an object of aspect ratings")
        )
    ratings: list[float | None] = []
    present = 0
    for aspect in ASPECTS:
        entry = annotations.get(aspect)
        if entry is None:
            ratings.append(None)
            continue
        present += 1
        if type(entry) is list and len(entry) == 1:  # some exports wrap each aspect in a list
            entry = entry[0]
        rating = entry.get("Rating") if type(entry) is dict or isinstance(entry, Mapping) else None
        if rating is None:
            raise MalformedRecordError(location, f"{where}.annotations.{aspect}.Rating", "missing")
        ratings.append(parse_number(rating))
    if present == 0:
        raise MalformedRecordError(
            location, f"{where}.annotations", f"none of the aspect ratings {', '.join(ASPECTS)} is present"
        )
    raw_overall = raw.get("overall_score")
    if require_overall_score and raw_overall is None:
        raise MalformedRecordError(location, f"{where}.overall_score", "missing (the h4 recipe ranks by it)")
    overall = parse_number(raw_overall)
    model = raw.get("model")
    completion = Completion(
        model=model if isinstance(model, str) else "",
        response=response,
        ratings=tuple(ratings),
        overall_score=overall,
        fine_grained_score=parse_number(raw.get("fine-grained_score")),
    )
    bad_overall = int(raw_overall is not None and overall is None)
    return completion, sum(r is None for r in ratings), bad_overall


def fix_overall_score(completion: Completion) -> Completion:
    """Undo the 2023 bug: an overall_score of 10 on a completion whose fine-grained ratings are <= 2 was 1.

    The fine-grained score is the record's `fine-grained_score` when it is a number, else the mean of the
    aspect ratings.
    """
    if completion.overall_score != BUGGY_OVERALL_SCORE:
        return completion
    fine = completion.fine_grained_score if completion.fine_grained_score is not None else completion.mean_rating
    if fine is None or fine > BUG_MAX_FINE_GRAINED:
        return completion
    return Completion(
        completion.model, completion.response, completion.ratings, FIXED_OVERALL_SCORE, completion.fine_grained_score
    )


# ----------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True, slots=True)
class Scored:
    completion: Completion
    score: float


Recipe = Callable[[list[Scored], int, str], "tuple[Scored, Scored] | Dropped"]


def _distinct_from(chosen: Scored, candidates: list[Scored]) -> list[Scored]:
    text = chosen.completion.response.strip()
    return [c for c in candidates if c is not chosen and c.completion.response.strip() != text]


def _best(scored: list[Scored]) -> Scored:
    # max() keeps the first of equal scores: ties go to the earlier completion, deterministically.
    return max(scored, key=lambda s: s.score)


def recipe_h4(scored: list[Scored], seed: int, key: str) -> tuple[Scored, Scored] | Dropped:
    """Chosen = highest overall_score; rejected = a seeded random other completion with different text."""
    chosen = _best(scored)
    candidates = _distinct_from(chosen, scored)
    if not candidates:
        return Dropped(IDENTICAL_RESPONSES, "every other completion repeats the chosen response")
    return chosen, candidates[seeded_index(seed, key, len(candidates))]


def recipe_argilla(scored: list[Scored], seed: int, key: str) -> tuple[Scored, Scored] | Dropped:
    """Chosen = highest mean rating; rejected = a seeded random completion with a strictly lower mean."""
    chosen = _best(scored)
    lower = [s for s in scored if s.score < chosen.score]
    if not lower:
        return Dropped(ALL_TIED, f"all {len(scored)} usable completions have mean rating {chosen.score:g}")
    candidates = _distinct_from(chosen, lower)
    if not candidates:
        return Dropped(IDENTICAL_RESPONSES, "every lower-rated completion repeats the chosen response")
    return chosen, candidates[seeded_index(seed, key, len(candidates))]


def recipe_max_min(scored: list[Scored], seed: int, key: str) -> tuple[Scored, Scored] | Dropped:
    """Chosen = highest mean rating; rejected = lowest mean rating (the first of equals), strictly lower."""
    chosen = _best(scored)
    candidates = _distinct_from(chosen, [s for s in scored if s.score < chosen.score])
    if not candidates:
        tied = all(s.score == chosen.score for s in scored)
        return Dropped(ALL_TIED if tied else IDENTICAL_RESPONSES, "no strictly lower-rated, different response")
    return chosen, min(candidates, key=lambda s: s.score)


RECIPE_FUNCTIONS: dict[str, Recipe] = {"h4": recipe_h4, "argilla": recipe_argilla, "max-min": recipe_max_min}


def score_of(completion: Completion, recipe: str) -> float | None:
    """The number a recipe ranks by: overall_score for h4, the mean aspect rating otherwise."""
    return completion.overall_score if recipe == "h4" else completion.mean_rating


def binarize_record(record: RawRecord, recipe: str, seed: int, *, fix_scores: bool = False) -> Pair | Dropped:
    """Apply a recipe to one validated record."""
    if recipe not in RECIPE_FUNCTIONS:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if not record.prompt.strip():
        return Dropped(EMPTY_PROMPT)
    scored = []
    for completion in record.completions:
        if completion.is_blank:
            continue  # an empty response is never chosen or rejected
        if fix_scores:
            completion = fix_overall_score(completion)
        score = score_of(completion, recipe)
        if score is not None:
            scored.append(Scored(completion, score))
    if len(scored) < 2:
        return Dropped(TOO_FEW_COMPLETIONS, f"{len(scored)} usable of {len(record.completions)} completions")
    pid = prompt_id(record.prompt)
    picked = RECIPE_FUNCTIONS[recipe](scored, seed, pid)
    if isinstance(picked, Dropped):
        return picked
    chosen, rejected = picked
    return Pair(
        prompt_id=pid,
        prompt=record.prompt,
        chosen=chosen.completion.response,
        rejected=rejected.completion.response,
        score_chosen=chosen.score,
        score_rejected=rejected.score,
        source=record.source,
        chosen_model=chosen.completion.model,
        rejected_model=rejected.completion.model,
    )


# ----------------------------------------------------------------------------------------------------
# Already-binarized layouts (HuggingFaceH4/ultrafeedback_binarized, argilla ...-cleaned, our own output)


def is_binarized(data: Mapping) -> bool:
    """True for a row that already holds a chosen/rejected pair rather than raw completions."""
    return "chosen" in data and "rejected" in data and "completions" not in data


def _not_single_turn(location: str, field: str, messages: list) -> MalformedRecordError:
    roles = [m.get("role") if isinstance(m, Mapping) else type(m).__name__ for m in messages]
    return MalformedRecordError(
        location, field, f"a conversation with roles {roles}: only single-turn user -> assistant pairs are "
        "supported (a system prompt or earlier turns would be lost)",
    )


def _response_text(value: Any, location: str, field: str) -> str:
    """The assistant response of a `chosen`/`rejected` value: a message list (last message) or a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        last = value[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise MalformedRecordError(location, f"{field}[-1]", "expected an assistant message with content")
        # A pair is (prompt, last answer): a system prompt or earlier turns would be dropped and the answer
        # paired with the wrong context, so only [assistant] or [user, assistant] is accepted.
        context = value[:-1]
        if len(context) > 1 or (context and (not isinstance(context[0], Mapping) or context[0].get("role") != "user")):
            raise _not_single_turn(location, field, value)
        return last["content"]
    raise MalformedRecordError(location, field, "expected a list of {role, content} messages or a string")


def _prompt_of(data: Mapping, location: str) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:  # TRL's conversational layout: the prompt's messages
        first = prompt[0]
        if len(prompt) > 1 or not isinstance(first, Mapping) or first.get("role") != "user":
            raise _not_single_turn(location, "prompt", prompt)
        if isinstance(first.get("content"), str):
            return first["content"]
    chosen = data.get("chosen")
    if isinstance(chosen, list) and chosen and isinstance(chosen[0], Mapping) and chosen[0].get("role") == "user":
        content = chosen[0].get("content")
        if isinstance(content, str):
            return content
    raise MalformedRecordError(location, "prompt", _missing_or_type(data, "prompt", "a string"))


def _first_number(data: Mapping, keys: tuple[str, ...]) -> float:
    for key in keys:
        number = parse_number(data.get(key))
        if number is not None:
            return number
    return float("nan")


def _first_string(data: Mapping, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str):
            return value
    return ""


def normalize_binarized(data: Mapping, location: str) -> Pair | Dropped:
    """Turn an already-binarized row (H4, argilla-cleaned or our layout) into a Pair, applying the same rules."""
    prompt = _prompt_of(data, location)
    chosen = _response_text(data.get("chosen"), location, "chosen")
    rejected = _response_text(data.get("rejected"), location, "rejected")
    if not prompt.strip():
        return Dropped(EMPTY_PROMPT)
    if not chosen.strip() or not rejected.strip():
        return Dropped(TOO_FEW_COMPLETIONS, "the chosen or rejected response is empty")
    if chosen.strip() == rejected.strip():
        return Dropped(IDENTICAL_RESPONSES, "chosen and rejected responses are identical")
    return Pair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        score_chosen=_first_number(data, ("score_chosen", "chosen-rating", "chosen_rating")),
        score_rejected=_first_number(data, ("score_rejected", "rejected-rating", "rejected_rating")),
        source=_first_string(data, ("source",)),
        chosen_model=_first_string(data, ("chosen_model", "chosen-model")),
        rejected_model=_first_string(data, ("rejected_model", "rejected-model")),
    )
