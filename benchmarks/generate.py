"""Tokens per second of batched vs one-at-a-time generation (SmolLM2-135M-Instruct, 32 AlpacaEval instructions).

    .venv/bin/python benchmarks/generate.py                      # defaults: 32 instructions, 128 new tokens
    .venv/bin/python benchmarks/generate.py --instructions 16 --max-new-tokens 64 --batch-size 16

Both modes decode greedily with `evals.generate.generate` (chat template, left padding, KV cache) on the
same instructions, so they produce the same text; only the batch size differs (1 vs --batch-size).
Throughput counts generated tokens up to EOS (padding after a row finished is work, not output). A
warm-up generation runs first. Instructions come from ../shared/data/alpaca_eval (else the demo sample,
cycled to the requested count). Prints a table and writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
SAMPLE = ROOT / "data" / "samples" / "eval" / "alpaca_eval_sample.json"


def instructions(count: int, seed: int) -> tuple[list[str], str]:
    from evals.sources import load_alpaca_eval

    source = SHARED if SHARED.is_file() else SAMPLE
    rows = load_alpaca_eval(str(source), limit=count, seed=seed)
    texts = [r["instruction"] for r in rows]
    while len(texts) < count:  # the demo sample has 12 instructions
        texts += texts[: count - len(texts)]
    return texts, str(source)


def timed(model, tokenizer, conversations, *, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    from evals.generate import generate

    start = time.perf_counter()
    out = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    tokens = sum(g[0].new_tokens for g in out)
    return {"batch_size": batch_size, "seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
            "texts": [g[0].text for g in out]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--instructions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate.json")
    args = parser.parse_args()

    import torch

    from orpo.config import ModelConfig
    from orpo.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=args.model))
    texts, source = instructions(args.instructions, args.seed)
    conversations = [[{"role": "user", "content": t}] for t in texts]
    timed(model, tokenizer, conversations[:2], batch_size=2, max_new_tokens=8)  # warm-up (lazy weights, kernels)

    single = timed(model, tokenizer, conversations, batch_size=1, max_new_tokens=args.max_new_tokens)
    print(f"one at a time: {single['tokens_per_s']:.1f} tokens/s", flush=True)
    batched = timed(model, tokenizer, conversations, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    same = sum(a == b for a, b in zip(single.pop("texts"), batched.pop("texts")))
    speedup = batched["tokens_per_s"] / single["tokens_per_s"]

    print(f"{'mode':<16}{'batch':>6}{'seconds':>10}{'new tokens':>12}{'tokens/s':>10}")
    for name, row in (("one at a time", single), ("batched", batched)):
        print(f"{name:<16}{row['batch_size']:>6}{row['seconds']:>10.1f}{row['new_tokens']:>12}{row['tokens_per_s']:>10.1f}")
    print(f"speed-up batched / one at a time: {speedup:.2f}x (target >= 5x); identical texts: {same}/{len(texts)}")

    result = {
        "model": args.model,
        "instructions": len(texts),
        "source": source,
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time": single,
        "batched": batched,
        "speedup": speedup,
        "identical_texts": same,
        "median_prompt_chars": statistics.median(len(tokenizer.apply_chat_template(c, tokenize=False)) for c in
                                                  conversations),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": "cuda" if next(model.parameters()).is_cuda else "cpu"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
