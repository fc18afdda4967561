"""Per-input diversity: k samples per prompt, distinct-n within each prompt's samples, and self-BLEU.

The ORPO paper notes lower per-input diversity after alignment; these numbers watch it.
- distinct-n: unique word n-grams / all word n-grams over one prompt's k samples, averaged over prompts;
- self-BLEU: for every ordered pair (i, j), i != j, of one prompt's samples, sentence BLEU of sample i
  with sample j as the only reference (sacrebleu, exponential smoothing, effective order), averaged over
  pairs and then prompts, on a 0-1 scale. 1 = the samples are identical; lower = more diverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import permutations


@dataclass
class DiversityScores:
    distinct_1: float
    distinct_2: float
    self_bleu: float
    n_prompts: int
    samples_per_prompt: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of the samples (whitespace words, lower-cased); 0 if there are none."""
    grams = [g for s in samples for g in _ngrams(s.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(samples: Sequence[str]) -> float:
    """Mean pairwise sentence BLEU (0-1) over ordered pairs of distinct samples."""
    from sacrebleu.metrics import BLEU

    if len(samples) < 2:
        raise ValueError("self-BLEU needs at least two samples")
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(hyp, [ref]).score / 100.0 for hyp, ref in permutations(samples, 2)]
    return sum(scores) / len(scores)


def diversity_scores(samples_per_prompt: Sequence[Sequence[str]]) -> DiversityScores:
    """Average the per-prompt metrics over prompts."""
    groups = [list(group) for group in samples_per_prompt if len(group) >= 2]
    if not groups:
        raise ValueError("diversity needs at least one prompt with two or more samples")
    return DiversityScores(
        distinct_1=sum(distinct_n(g, 1) for g in groups) / len(groups),
        distinct_2=sum(distinct_n(g, 2) for g in groups) / len(groups),
        self_bleu=sum(self_bleu(g) for g in groups) / len(groups),
        n_prompts=len(groups),
        samples_per_prompt=min(len(g) for g in groups),
    )


def sample_and_score(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
) -> tuple[DiversityScores, list[list[str]]]:
    """Sample `samples` replies per prompt at `temperature` and score them; also returns the samples."""
    from evals.generate import generate

    replies = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for p in prompts],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        num_samples=samples,
        batch_size=max(1, batch_size // samples),
        seed=seed,
    )
    texts = [[g.text for g in group] for group in replies]
    return diversity_scores(texts), texts
