"""Keep evaluation prompts out of the training data.

Two rules, both on by default (`data.decontaminate`):
- records whose `source` is a benchmark we must not train on (`truthful_qa`) are dropped;
- prompts that share a word n-gram (`data.decontamination_ngram`, default 13) with an evaluation prompt
  (MT-Bench questions, AlpacaEval instructions), or equal one after normalization, are dropped.

Text is normalized to lowercase word tokens (`\\w+`), so punctuation and spacing do not hide overlap.
Evaluation prompts shorter than n words can only match by equality: a 13-gram test on a 9-word question
would never fire, and matching every short sub-sequence would flag ordinary phrases.

Evaluation files: FastChat `question.jsonl` (objects with `turns`), AlpacaEval JSON (a list of objects
with `instruction`), TruthfulQA (`TruthfulQA.csv` with a `Question` column, or the hub's `truthful_qa`
rows with `question`, as JSONL/JSON/Parquet), or JSONL/JSON of objects with `instruction`, `prompt`,
`question` or `turns`. UltraFeedback holds TruthfulQA questions under other sources too (evol_instruct),
which only a TruthfulQA file catches: the H4 and argilla-cleaned recipes removed those as well.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

from orpo.errors import OrpoError

log = logging.getLogger(__name__)

CONTAMINATED_SOURCES = ("truthful_qa",)
_WORD = re.compile(r"\w+")


class DecontaminationFileError(OrpoError, ValueError):
    """An evaluation prompt file that cannot be read; the message names the file and what was expected."""


@dataclass(frozen=True, slots=True)
class EvalPrompt:
    text: str
    origin: str  # e.g. "question.jsonl:81 turn 2"


@dataclass(frozen=True, slots=True)
class Contamination:
    """Why a prompt was dropped: which rule and which evaluation prompt it matched."""

    rule: str  # "source", "exact" or "ngram"
    matched: str


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _prompts_from_object(obj: object, origin: str) -> Iterator[EvalPrompt]:
    if not isinstance(obj, dict):
        raise DecontaminationFileError(f"{origin}: expected an object with turns/instruction/prompt")
    if isinstance(obj.get("turns"), list):
        for turn_index, turn in enumerate(obj["turns"], 1):
            if isinstance(turn, str):
                yield EvalPrompt(turn, f"{origin} turn {turn_index}")
        return
    for key in _TEXT_FIELDS:
        if isinstance(obj.get(key), str):
            yield EvalPrompt(obj[key], origin)
            return
    raise DecontaminationFileError(f"{origin}: no `turns`, `instruction`, `prompt` or `question` field")


# `question`: TruthfulQA as the hub serves it; `Question`: its original TruthfulQA.csv.
_TEXT_FIELDS = ("instruction", "prompt", "question", "Question")


def _prompts_from_table(path: Path) -> Iterator[EvalPrompt]:
    """The prompts of a CSV or Parquet file: one text column (see _TEXT_FIELDS), one prompt a row."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = table.column_names
        column = next((name for name in _TEXT_FIELDS if name in columns), None)
        values = table[column].to_pylist() if column else []
    else:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            column = next((name for name in _TEXT_FIELDS if name in columns), None)
            values = [row[column] for row in reader] if column else []
    if column is None:
        raise DecontaminationFileError(
            f"{path}: no column {', '.join(_TEXT_FIELDS)} (it has {', '.join(map(str, columns))})"
        )
    for index, value in enumerate(values):
        if isinstance(value, str) and value.strip():
            yield EvalPrompt(value, f"{path.name}[row {index}]")


def load_eval_prompts(paths: Iterable[str | Path]) -> list[EvalPrompt]:
    """Read evaluation prompts from FastChat question.jsonl, AlpacaEval-style JSON and TruthfulQA files."""
    prompts: list[EvalPrompt] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DecontaminationFileError(
                f"decontamination file {path} does not exist; give MT-Bench question.jsonl or an AlpacaEval "
                "json (data.decontamination_files), or turn decontamination off"
            )
        if path.name.endswith((".csv", ".parquet")):
            try:
                prompts.extend(_prompts_from_table(path))
            except DecontaminationFileError:
                raise
            except (csv.Error, ValueError, OSError) as exc:  # UnicodeDecodeError and ArrowInvalid are ValueErrors
                raise DecontaminationFileError(f"{path}: not a readable CSV/Parquet file ({exc})") from exc
            continue
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        try:
            if stripped.startswith("["):
                for index, obj in enumerate(json.loads(text)):
                    prompts.extend(_prompts_from_object(obj, f"{path.name}[{index}]"))
            else:
                for line_number, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        prompts.extend(_prompts_from_object(json.loads(line), f"{path.name}:{line_number}"))
        except json.JSONDecodeError as exc:
            raise DecontaminationFileError(f"{path}: not valid JSON/JSONL ({exc})") from exc
    return prompts


class Decontaminator:
    """Checks training prompts against a fixed set of evaluation prompts.

    `check_many` is the fast path: the prompts' words become ids of the evaluation vocabulary (0 for any
    other word, which no evaluation n-gram contains), every n-word window gets a polynomial hash in one
    vectorized pass, and only windows whose hash an evaluation n-gram shares are compared word by word.
    """

    _HASH_BASE = 0x9E3779B97F4A7C15  # odd 64-bit multiplier; arithmetic wraps mod 2**64

    def __init__(
        self,
        eval_prompts: Iterable[EvalPrompt],
        n: int = 13,
        sources: Iterable[str] = CONTAMINATED_SOURCES,
    ) -> None:
        import numpy as np

        self.n = n
        self.sources = frozenset(sources)
        self._exact: dict[str, str] = {}
        self._vocab: dict[str, int] = {}
        self._grams: dict[tuple[int, ...], str] = {}
        self.eval_prompt_count = 0
        for prompt in eval_prompts:
            tokens = words(prompt.text)
            if not tokens:
                continue
            self.eval_prompt_count += 1
            self._exact.setdefault(" ".join(tokens), prompt.origin)
            ids = [self._vocab.setdefault(token, len(self._vocab) + 1) for token in tokens]
            for start in range(len(ids) - n + 1):
                self._grams.setdefault(tuple(ids[start : start + n]), prompt.origin)
        hashes = [self._hash_tuple(gram) for gram in self._grams]
        self._gram_hashes = np.unique(np.array(hashes, dtype=np.uint64))

    def _hash_tuple(self, gram: tuple[int, ...]) -> int:
        value = 0
        for token_id in gram:
            value = (value * self._HASH_BASE + token_id) & 0xFFFFFFFFFFFFFFFF
        return value

    def check(self, prompt: str, source: str = "") -> Contamination | None:
        """The first rule the prompt breaks, or None when it is clean."""
        return self.check_many([prompt], [source])[0]

    def check_many(self, prompts: list[str], sources: list[str]) -> list[Contamination | None]:
        """`check` for a batch of prompts (much faster per prompt)."""
        results: list[Contamination | None] = [
            Contamination("source", source) if source in self.sources else None for source in sources
        ]
        if not self._exact:
            return results
        tokenized = [words(prompt) for prompt in prompts]
        for index, tokens in enumerate(tokenized):
            if results[index] is None:
                matched = self._exact.get(" ".join(tokens))
                if matched is not None:
                    results[index] = Contamination("exact", matched)
        if self._grams:
            for index, matched in self._ngram_hits(tokenized).items():
                if results[index] is None:
                    results[index] = Contamination("ngram", matched)
        return results

    def _ngram_hits(self, tokenized: list[list[str]]) -> dict[int, str]:
        """Prompt index -> origin of the first evaluation n-gram it contains."""
        import numpy as np

        n = self.n
        lookup = self._vocab.get
        lengths = np.fromiter((len(tokens) for tokens in tokenized), dtype=np.int64, count=len(tokenized))
        total = int(lengths.sum())
        if total < n:
            return {}
        # map() over the flattened words keeps the per-word work in C.
        ids = np.fromiter(map(lookup, chain.from_iterable(tokenized), repeat(0)), dtype=np.uint64, count=total)
        windows = total - n + 1
        hashes = np.zeros(windows, dtype=np.uint64)
        base = np.uint64(self._HASH_BASE)
        with np.errstate(over="ignore"):
            for offset in range(n):
                hashes = hashes * base + ids[offset : offset + windows]
        owner = np.repeat(np.arange(len(tokenized)), lengths)
        unknown = np.concatenate([[0], np.cumsum(ids == 0)])
        candidates = (
            (owner[:windows] == owner[n - 1 :])  # the window stays inside one prompt
            & (unknown[n:] - unknown[:windows] == 0)  # and holds only evaluation words
        )
        # Membership in the sorted evaluation hashes (np.isin would sort them again on every call).
        position = np.searchsorted(self._gram_hashes, hashes).clip(max=len(self._gram_hashes) - 1)
        candidates &= self._gram_hashes[position] == hashes
        hits: dict[int, str] = {}
        for start in np.flatnonzero(candidates).tolist():
            prompt_index = int(owner[start])
            if prompt_index in hits:
                continue
            matched = self._grams.get(tuple(ids[start : start + n].tolist()))
            if matched is not None:  # a hash collision is not a match
                hits[prompt_index] = matched
        return hits
