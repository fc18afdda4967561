"""Evaluation inputs: AlpacaEval instructions + baseline outputs, MT-Bench questions, judge prompts.

Each loader takes a local file (the upstream formats, see ../shared/data/README.md); when none is configured
the evaluation passes the official file at its pinned revision (`evals.official`). Hub sources also work:
- AlpacaEval: `tatsu-lab/alpaca_eval` is read as a plain data file through `hf_hub_download`
  (`alpaca_eval_gpt4_baseline.json`, the AlpacaEval 2.0 instructions with the GPT-4 Turbo baseline), never
  through the repository's dataset script, which `datasets>=4` no longer runs;
- MT-Bench: FastChat's `question.jsonl`, or the hub dataset `HuggingFaceH4/mt_bench_prompts`
  (columns prompt, category, reference, prompt_id), converted to FastChat's question format.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from orpo.errors import OrpoError

log = logging.getLogger(__name__)

ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval_gpt4_baseline.json"
MT_BENCH_HUB = "HuggingFaceH4/mt_bench_prompts"

T = TypeVar("T")


class SourceError(OrpoError, ValueError):
    """An evaluation input that cannot be read; the message names the file, the record and the fix."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a bad line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return records


def seeded_subset(rows: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """`limit` rows drawn with `seed`, kept in their original order (all rows when limit is None)."""
    if limit is None or limit >= len(rows):
        return list(rows)
    chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in chosen]


def _looks_like_hub_id(source: str) -> bool:
    return not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def load_alpaca_eval(source: str, *, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """AlpacaEval records `{"instruction", "output" (baseline), "generator", "dataset", "index"}`.

    `index` is the record's position in the full set (the length-controlled GLM's instruction features
    are indexed by it).
    """
    if _looks_like_hub_id(source):
        from huggingface_hub import hf_hub_download

        log.info("downloading %s from the hub dataset %s", ALPACA_EVAL_FILE, source)
        path = Path(hf_hub_download(repo_id=source, filename=ALPACA_EVAL_FILE, repo_type="dataset"))
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"AlpacaEval source {source} is neither a file nor a hub id like tatsu-lab/alpaca_eval")
    data = _read_json(path)
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of {{instruction, output, generator}} records")
    rows = []
    for number, record in enumerate(data):
        missing = [key for key in ("instruction", "output") if key not in record]
        if missing:
            raise SourceError(f"{path}: record {number} has no {', '.join(missing)} (AlpacaEval format)")
        rows.append(
            {
                "instruction": record["instruction"],
                "output": record["output"],
                "generator": record.get("generator", "baseline"),
                "dataset": record.get("dataset", "alpaca_eval"),
                "index": number,
            }
        )
    return seeded_subset(rows, limit, seed)


def load_mt_bench_questions(source: str, *, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """MT-Bench questions in FastChat's format `{"question_id", "category", "turns", "reference"?}`."""
    if _looks_like_hub_id(source):
        from datasets import load_dataset

        log.info("loading MT-Bench questions from the hub dataset %s", source)
        dataset = load_dataset(source, split="train")
        rows = [
            {
                "question_id": int(record["prompt_id"]),
                "category": record["category"],
                "turns": list(record["prompt"]),
                **({"reference": list(record["reference"])} if record.get("reference") else {}),
            }
            for record in dataset
        ]
    else:
        rows = read_jsonl(source)
        for number, record in enumerate(rows, start=1):
            missing = [key for key in ("question_id", "category", "turns") if key not in record]
            if missing:
                raise SourceError(f"{source}:{number}: missing {', '.join(missing)} (FastChat question format)")
    return seeded_subset(rows, limit, seed)


def load_reference_answers(path: str | Path | None) -> dict[int, list[str]]:
    """question_id -> reference turns, from a FastChat answer file (e.g. reference_answer/gpt-4.jsonl)."""
    if path is None:
        return {}
    references = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            references[int(record["question_id"])] = list(record["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError) as exc:
            raise SourceError(f"{path}:{number}: not a FastChat answer record ({exc!r})") from exc
    return references


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    """FastChat judge_prompts.jsonl as name -> prompt record (`system_prompt`, `prompt_template`, ...)."""
    prompts = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        missing = [key for key in ("name", "system_prompt", "prompt_template") if key not in record]
        if missing:
            raise SourceError(f"{path}:{number}: missing {', '.join(missing)} (FastChat judge prompt format)")
        prompts[record["name"]] = record
    return prompts
