"""lm-evaluation-harness tasks on the already loaded model (no second load, no download of the model).

`HFLM(pretrained=model, tokenizer=tokenizer)` wraps the in-memory model; `TaskManager(include_path=...)`
adds local task YAMLs to the built-in ones. Results are flattened to `lm_eval/<task>/<metric>` floats
(stderr entries included, lm-eval's `,none` filter suffix dropped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`{"task": {"acc,none": 0.5, "alias": ...}}` -> `{"lm_eval/task/acc": 0.5}` (numbers only)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            if key == "sample_len":  # a document count, not a score
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
            flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate `tasks` on the in-memory model; returns flattened metrics."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=wrapped,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,  # stderr by bootstrap costs minutes on CPU; lm-eval then reports N/A
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if output is None:  # lm-eval returns None on non-zero ranks of a distributed run
        return {}
    return flatten_results(output["results"])
