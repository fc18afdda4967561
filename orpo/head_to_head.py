"""The challenger against the champion on the same prompts, from their saved evaluation files.

Nothing of the champion is regenerated: its evaluation directory (logged under `evaluation/` of its
version's run) already holds its AlpacaEval outputs, its MT-Bench judgments and its per-pair preference
margins. With no champion yet, the start model's evaluation directory (the one the pipeline scores it into)
takes the champion's side, read the same way. Three paired differences, each with a confidence interval
(`orpo.stats`):

- `head_to_head/win_rate`: AlpacaEval-style pairwise annotations of challenger vs champion outputs on the
  instructions both answered (`evals.alpaca.judge_pairwise`, the champion's outputs as the reference,
  output_1). Win rate = mean(preference - 1) x 100, ties counting half, as alpaca_eval computes it.
  Identical outputs are ties (preference 1.5) without asking the judge, whatever the judge would say.
- `mt_bench/score`: per-(question, turn) score differences from the two single-grading judgment files,
  bootstrapped by question; a turn whose conversation is identical on both sides differs by 0.
- `preference/accuracy`: held-out preference accuracy on the same pairs, McNemar's exact test.

`read_evaluation` is the one place that knows the evaluation's file names.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpo.stats import Interval, bootstrap_mean, paired_accuracy_difference, proportion_interval

log = logging.getLogger(__name__)

HEAD_TO_HEAD_WIN_RATE = "head_to_head/win_rate"
MT_BENCH_SCORE = "mt_bench/score"
PREFERENCE_ACCURACY = "preference/accuracy"
ALPACA_WIN_RATE = "alpaca/win_rate"
HEAD_TO_HEAD_METRICS = (HEAD_TO_HEAD_WIN_RATE, MT_BENCH_SCORE, PREFERENCE_ACCURACY)

# Per metric: what it is called for people, its unit, and the value that means "no difference".
METRIC_INFO: dict[str, dict[str, Any]] = {
    HEAD_TO_HEAD_WIN_RATE: {"label": "head-to-head win rate", "unit": "%", "null": 50.0},
    MT_BENCH_SCORE: {"label": "MT-Bench score difference", "unit": " pts", "null": 0.0},
    PREFERENCE_ACCURACY: {"label": "preference accuracy difference", "unit": "", "null": 0.0},
}

PREFERENCE_MARGINS_FILE = "preference_margins.json"
TIE = 1.5


@dataclass
class EvaluationFiles:
    """What one evaluation directory holds that a paired comparison needs (None: not there)."""

    root: Path
    alpaca_outputs: list[dict[str, Any]] | None = None
    annotations: list[dict[str, Any]] | None = None
    mt_bench_answers: list[dict[str, Any]] | None = None
    mt_bench_judgments: list[dict[str, Any]] | None = None
    preference_margins: list[dict[str, Any]] | None = None
    report: dict[str, Any] | None = None


def _first(root: Path, patterns: Sequence[str]) -> Path | None:
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return None


def _load(path: Path | None) -> Any:
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); re-run that evaluation") from None


_READ = {
    "alpaca_outputs": ["model_outputs.json"],
    "annotations": ["annotations.json"],
    "mt_bench_answers": ["model_answer/*.jsonl", "model_answer.jsonl"],
    "mt_bench_judgments": ["model_judgment/*_single.jsonl", "model_judgment.jsonl"],
    "preference_margins": [PREFERENCE_MARGINS_FILE],
    "report": ["report.json"],
}


def read_evaluation(report_dir: str | Path) -> EvaluationFiles:
    """Read an evaluation directory, the reworked layout first, today's file names as the fallback.

    AlpacaEval: model_outputs.json, annotations.json. MT-Bench (FastChat layout):
    model_answer/<model_id>.jsonl and model_judgment/<judge>_single.jsonl, else model_answer.jsonl and
    model_judgment.jsonl. Per-pair preference margins: preference_margins.json. report.json.
    """
    root = Path(report_dir)
    return EvaluationFiles(root=root, **{name: _load(_first(root, patterns)) for name, patterns in _READ.items()})


def evaluation_files(report_dir: str | Path) -> list[Path]:
    """Every file in `report_dir` that `read_evaluation` could read as an evaluation's."""
    root = Path(report_dir)
    return sorted({path for patterns in _READ.values() for pattern in patterns for path in root.glob(pattern)
                   if path.is_file()})


@dataclass
class Difference:
    """One paired challenger-minus-champion comparison (a win rate for the head-to-head)."""

    metric: str
    interval: Interval
    n_failed: int = 0  # prompts dropped: unparseable judgments on either side
    n_ties: int = 0  # identical outputs (head-to-head) or identical conversations (MT-Bench)
    note: str = ""

    @property
    def label(self) -> str:
        return METRIC_INFO[self.metric]["label"]

    @property
    def unit(self) -> str:
        return METRIC_INFO[self.metric]["unit"]

    @property
    def null(self) -> float:
        return METRIC_INFO[self.metric]["null"]

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "label": self.label, "unit": self.unit, "null": self.null,
                **self.interval.as_dict(), "n_failed": self.n_failed, "n_ties": self.n_ties, "note": self.note}

    def text(self) -> str:
        i = self.interval
        signed = self.metric != HEAD_TO_HEAD_WIN_RATE
        seed = f", seed {i.seed}" if i.seed is not None else ""
        p = f", p={i.p_value:.3g}" if i.p_value is not None else ""
        return f"{self.label} {i.text(unit=self.unit, signed=signed)} (n={i.n}, {i.test}{seed}{p})"


@dataclass
class HeadToHead:
    """Every paired difference that could be computed, why the others could not, and the annotations."""

    differences: dict[str, Difference] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)


# --- AlpacaEval head-to-head -----------------------------------------------------------------------


def _tie(champion: dict[str, Any], challenger: dict[str, Any]) -> dict[str, Any]:
    return {
        "instruction": champion["instruction"],
        "output_1": champion["output"],
        "generator_1": champion.get("generator", "champion"),
        "dataset": champion.get("dataset", "alpaca_eval"),
        "output_2": challenger["output"],
        "generator_2": challenger.get("generator", "challenger"),
        "annotator": "identical outputs",
        "preference": TIE,
        "is_swapped": False,
        "raw_completion": None,
    }


def pair_outputs(
    champion: Sequence[dict[str, Any]], challenger: Sequence[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(champion, challenger) records of the instructions both answered, in the champion's order."""
    theirs = {}
    for record in challenger:
        theirs.setdefault(record["instruction"], record)
    return [(mine, theirs[mine["instruction"]]) for mine in champion if mine["instruction"] in theirs]


def judge_head_to_head(
    get_judge: Callable[[], Any],
    pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    *,
    seed: int = 0,
    protocol: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """AlpacaEval annotations, champion = output_1, challenger = output_2 (preference 2 = challenger wins).

    Identical outputs are ties (1.5) and never reach the judge; `get_judge` is called only when some pair
    differs, so two identical models cost no judge at all. `protocol`: `judge_pairwise` keyword arguments
    (`evals.alpaca.protocol_kwargs(config.eval)`), so the pairs are judged as the evaluation judges its own.
    """
    from evals.alpaca import judge_pairwise

    differing = [i for i, (a, b) in enumerate(pairs) if a["output"] != b["output"]]
    annotations = [_tie(a, b) for a, b in pairs]
    if differing:
        judged = judge_pairwise(
            get_judge(), [pairs[i][0] for i in differing],
            [{**pairs[i][1], "generator": pairs[i][1].get("generator", "challenger")} for i in differing],
            **(protocol if protocol is not None else {"seed": seed}),
        )
        for i, annotation in zip(differing, judged):
            annotations[i] = annotation
    return annotations


def _preference(annotation: dict[str, Any]) -> float | None:
    """The preference as alpaca_eval's get_winrate reads it: 0 (its old code for a draw) is 1.5, anything
    outside [1, 2] (NaN included) is not a preference."""
    value = annotation.get("preference")
    if value is None:
        return None
    value = float(value)
    if value == 0.0:
        return TIE
    return value if 1.0 <= value <= 2.0 else None


def win_rate_difference(annotations: Sequence[dict[str, Any]], *, confidence: float, n_resamples: int,
                        seed: int) -> Difference | None:
    """The challenger's win rate (%) over the champion, bootstrapped over prompts; None if nothing judged."""
    preferences = [_preference(a) for a in annotations]
    valid = [p for p in preferences if p is not None]
    if not valid:
        return None
    interval = bootstrap_mean([(p - 1.0) * 100.0 for p in valid], confidence=confidence,
                              n_resamples=n_resamples, seed=seed)
    ties = sum(a.get("annotator") == "identical outputs" for a in annotations)
    return Difference(HEAD_TO_HEAD_WIN_RATE, interval, n_failed=len(preferences) - len(valid), n_ties=ties)


# --- MT-Bench ----------------------------------------------------------------------------------------


def _judge_name(judgment: dict[str, Any]) -> str:
    judge = judgment.get("judge")
    return str(judge[0]) if isinstance(judge, (list, tuple)) and judge else str(judge)


def _judge_prompt(judgment: dict[str, Any]) -> str | None:
    """The judge prompt's name (FastChat's `single-v1`, ..., or the built-in ones); None when not recorded."""
    judge = judgment.get("judge")
    return str(judge[1]) if isinstance(judge, (list, tuple)) and len(judge) > 1 else None


def _score(judgment: dict[str, Any]) -> float | None:
    try:
        value = float(judgment.get("score"))
    except (TypeError, ValueError):
        return None
    # FastChat writes -1 for a judgment without a parseable [[rating]].
    return value if math.isfinite(value) and value >= 0 else None


def _conversations(answers: Sequence[dict[str, Any]] | None) -> dict[int, list[str]]:
    if not answers:
        return {}
    return {int(r["question_id"]): list(r["choices"][0]["turns"]) for r in answers}


def mt_bench_difference(champion: EvaluationFiles, challenger: EvaluationFiles, *, confidence: float,
                        n_resamples: int, seed: int, opponent: str = "the champion") -> Difference | str:
    """Per-(question, turn) score differences, bootstrapped by question; a reason string when impossible."""
    if not champion.mt_bench_judgments or not challenger.mt_bench_judgments:
        return "no MT-Bench judgments on " + (opponent if not champion.mt_bench_judgments else "the challenger")
    judges = {_judge_name(j) for j in champion.mt_bench_judgments} | {
        _judge_name(j) for j in challenger.mt_bench_judgments}
    if len(judges) > 1:
        return f"MT-Bench judged by different judges ({', '.join(sorted(judges))}); scores are not comparable"
    theirs = {(int(j["question_id"]), int(j["turn"])): _score(j) for j in champion.mt_bench_judgments}
    mine = {(int(j["question_id"]), int(j["turn"])): _score(j) for j in challenger.mt_bench_judgments}
    # The same judge with other prompts (FastChat's vs the built-in ones) grades on another scale.
    their_prompts = {(int(j["question_id"]), int(j["turn"])): _judge_prompt(j) for j in champion.mt_bench_judgments}
    my_prompts = {(int(j["question_id"]), int(j["turn"])): _judge_prompt(j) for j in challenger.mt_bench_judgments}
    mismatched = sorted({(their_prompts[k], my_prompts[k]) for k in set(theirs) & set(mine)
                         if their_prompts[k] != my_prompts[k]}, key=str)
    if mismatched:
        pairs = ", ".join(f"{a} vs {b}" for a, b in mismatched[:4])
        return f"MT-Bench graded with different judge prompts ({pairs}); scores are not comparable"
    old, new = _conversations(champion.mt_bench_answers), _conversations(challenger.mt_bench_answers)
    differences, groups, failed, ties = [], [], 0, 0
    for key in sorted(set(theirs) & set(mine)):
        question, turn = key
        same = question in old and question in new and old[question][:turn] == new[question][:turn]
        if same:
            differences.append(0.0)
            ties += 1
        elif theirs[key] is None or mine[key] is None:
            failed += 1
            continue
        else:
            differences.append(mine[key] - theirs[key])
        groups.append(question)
    if not differences:
        return "no MT-Bench (question, turn) is scored on both sides"
    interval = bootstrap_mean(differences, groups=groups, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return Difference(MT_BENCH_SCORE, interval, n_failed=failed, n_ties=ties,
                      note=f"{len(differences)} (question, turn) pairs")


# --- preference accuracy -----------------------------------------------------------------------------


def _pairing_keys(rows: Sequence[dict[str, Any]]) -> list[object]:
    if all(r.get("pair_id") for r in rows):
        return [r["pair_id"] for r in rows]
    return [r.get("index", i) for i, r in enumerate(rows)]


def preference_difference(champion: EvaluationFiles, challenger: EvaluationFiles, *,
                          confidence: float, opponent: str = "the champion") -> Difference | str:
    """Paired held-out preference accuracy on the pairs both scored (by pair id, else by index)."""
    if not champion.preference_margins or not challenger.preference_margins:
        side = opponent if not champion.preference_margins else "the challenger"
        return f"no per-pair preference margins ({PREFERENCE_MARGINS_FILE}) on {side}"
    theirs = dict(zip(_pairing_keys(champion.preference_margins), champion.preference_margins))
    mine = dict(zip(_pairing_keys(challenger.preference_margins), challenger.preference_margins))
    shared = [k for k in mine if k in theirs]
    if not shared:
        return f"{opponent} and the challenger were scored on different preference pairs"
    interval = paired_accuracy_difference(
        [float(mine[k]["margin"]) > 0 for k in shared], [float(theirs[k]["margin"]) > 0 for k in shared],
        confidence=confidence,
    )
    return Difference(PREFERENCE_ACCURACY, interval, note=f"{len(shared)} shared pairs")


# --- all together ------------------------------------------------------------------------------------


def compare_evaluations(
    champion: EvaluationFiles,
    challenger: EvaluationFiles,
    get_judge: Callable[[], Any],
    *,
    metrics: Sequence[str] = HEAD_TO_HEAD_METRICS,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    protocol: dict[str, Any] | None = None,
    opponent: str = "the champion",
) -> HeadToHead:
    """Every requested paired difference between two evaluation directories' files.

    `protocol`: how the head-to-head pairs are judged (`judge_head_to_head`). `champion` is whatever the
    challenger must beat; `opponent` names it in the reasons a difference is missing ("the start model" when
    the first version is gated against the model it was trained from)."""
    result = HeadToHead()
    for metric in metrics:
        found: Difference | str | None
        if metric == HEAD_TO_HEAD_WIN_RATE:
            if not champion.alpaca_outputs or not challenger.alpaca_outputs:
                side = opponent if not champion.alpaca_outputs else "the challenger"
                found = f"no saved AlpacaEval outputs (model_outputs.json) on {side}"
            else:
                pairs = pair_outputs(champion.alpaca_outputs, challenger.alpaca_outputs)
                if not pairs:
                    found = f"{opponent} and the challenger answered no AlpacaEval instruction in common"
                else:
                    result.annotations = judge_head_to_head(get_judge, pairs, seed=seed, protocol=protocol)
                    found = win_rate_difference(result.annotations, confidence=confidence,
                                                n_resamples=n_resamples, seed=seed)
                    if found is None:
                        found = "every head-to-head judgment was unparseable"
        elif metric == MT_BENCH_SCORE:
            found = mt_bench_difference(champion, challenger, confidence=confidence, n_resamples=n_resamples,
                                        seed=seed, opponent=opponent)
        elif metric == PREFERENCE_ACCURACY:
            found = preference_difference(champion, challenger, confidence=confidence, opponent=opponent)
        else:
            raise ValueError(f"unknown head-to-head metric {metric!r}; known: {', '.join(HEAD_TO_HEAD_METRICS)}")
        if isinstance(found, Difference):
            result.differences[metric] = found
        else:
            result.missing[metric] = found
    return result


# --- one model's metrics with intervals (for the summary chart) -------------------------------------


def model_estimates(files: EvaluationFiles, *, confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0, start_model: bool = False) -> dict[str, Interval]:
    """Each gated metric of one evaluated model, with an interval where per-item data is saved.

    `start_model=True` reads the start model's numbers the same evaluation computed alongside (its
    per-pair `base_margin`), which is the only start-model data a model's own evaluation holds.
    """
    out: dict[str, Interval] = {}
    if start_model:
        margins = [r.get("base_margin") for r in files.preference_margins or []]
        if margins and all(m is not None for m in margins):
            out[PREFERENCE_ACCURACY] = proportion_interval(sum(float(m) > 0 for m in margins), len(margins),
                                                           confidence)
        return out
    valid = [p for p in map(_preference, files.annotations or []) if p is not None]
    if valid:
        out[ALPACA_WIN_RATE] = bootstrap_mean([(p - 1.0) * 100.0 for p in valid], confidence=confidence,
                                              n_resamples=n_resamples, seed=seed)
    scored = [(int(j["question_id"]), s) for j in files.mt_bench_judgments or [] if (s := _score(j)) is not None]
    if scored:
        out[MT_BENCH_SCORE] = bootstrap_mean([s for _, s in scored], groups=[q for q, _ in scored],
                                             confidence=confidence, n_resamples=n_resamples, seed=seed)
    margins = [float(r["margin"]) for r in files.preference_margins or []]
    if margins:
        out[PREFERENCE_ACCURACY] = proportion_interval(sum(m > 0 for m in margins), len(margins), confidence)
    return out


def as_jsonable(head_to_head: HeadToHead) -> dict[str, Any]:
    return {"differences": {k: d.as_dict() for k, d in head_to_head.differences.items()},
            "missing": dict(head_to_head.missing)}

