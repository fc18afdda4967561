"""Held-out preference accuracy: does the model give the chosen response higher odds than the rejected one?

For each test pair, the model's length-normalised log-probability of each response (the quantity ORPO
trains, `orpo.logprobs.model_sequence_logps`) becomes log-odds (`orpo.loss.log_odds`), and the margin is
log_odds(chosen) - log_odds(rejected). Accuracy is the share of pairs with a positive margin. Pairs are
tokenized and batched with the training code's own `orpo.collate` (same layout as training), so the
numbers match what training optimises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class PreferenceScores:
    accuracy: float
    margin: float  # mean log-odds margin, chosen minus rejected
    n_pairs: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def load_test_pairs(dataset_dir: str | Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The `test` split of a binarized dataset directory (datasets.save_to_disk layout)."""
    from datasets import load_from_disk

    from evals.sources import seeded_subset

    dataset = load_from_disk(str(dataset_dir))
    if "test" not in dataset:
        raise ValueError(f"{dataset_dir} has no 'test' split (splits: {list(dataset)}); run `orpo data prepare`")
    rows = [dict(r) for r in dataset["test"]]
    return seeded_subset(rows, limit, seed)


def pair_margins(
    model,
    tokenizer,
    pairs: Sequence[dict[str, Any]],
    *,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    batch_size: int = 4,
    chunk_size: int = 256,
) -> list[float]:
    """log_odds(chosen) - log_odds(rejected) of each pair, in input order."""
    import torch

    from orpo.collate import make_collator, tokenize_pair
    from orpo.logprobs import model_sequence_logps
    from orpo.loss import log_odds
    from orpo.selfcheck import SelfCheckResult, SelfCheckSettings, run_self_check

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    features = [tokenize_pair(p, tokenizer, max_length, max_prompt_length) for p in pairs]
    # Training's default layout (each prompt computed once) and chunked log-probs where the self-check on the
    # first pairs shows they equal the stacked layout and the model's own logits.
    settings = SelfCheckSettings("shared_prompt", pad_id, max_length, nll_on_prompt=False, chunk_size=chunk_size)
    check = run_self_check(model, features, settings) if features else SelfCheckResult("stacked", True)
    collate = make_collator(check.layout, pad_token_id=pad_id)
    device = next(model.parameters()).device
    margins: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size])
            tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.inference_mode():
                out = model_sequence_logps(model, tensors, nll_on_prompt=False, chunk_size=chunk_size,
                                           chunked=check.chunked_logps)
            # logps of a response with no tokens left after truncation is 0 (probability one): infinite odds.
            odds = log_odds(out.logps.clamp(max=-1e-6))
            chosen, rejected = odds.chunk(2)
            margins.extend((chosen - rejected).tolist())
    finally:
        model.train(was_training)
    return margins


def pair_id(pair: dict[str, Any]) -> str:
    """A stable id of a preference pair (its prompt, chosen and rejected), to pair two models' margins."""
    import hashlib
    import json

    payload = json.dumps([pair.get("prompt"), pair.get("chosen"), pair.get("rejected")], sort_keys=True,
                         ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def margin_records(pairs: Sequence[dict[str, Any]], margins: Sequence[float],
                   base_margins: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Per-pair margins as saved in `preference_margins.json` (index, pair_id, margin[, base_margin])."""
    records = [{"index": i, "pair_id": pair_id(p), "margin": float(m)} for i, (p, m) in enumerate(zip(pairs, margins))]
    for record, base in zip(records, base_margins or []):
        record["base_margin"] = float(base)
    return records


def preference_scores(margins: Sequence[float]) -> PreferenceScores:
    if not margins:
        raise ValueError("no preference pairs to score")
    return PreferenceScores(
        accuracy=sum(m > 0 for m in margins) / len(margins),
        margin=sum(margins) / len(margins),
        n_pairs=len(margins),
    )
