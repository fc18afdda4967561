"""Binarization throughput and peak memory on synthetic UltraFeedback at real sizes.

    .venv/bin/python benchmarks/binarize.py                    # 64k records, every recipe
    .venv/bin/python benchmarks/binarize.py --records 8000 --configs argilla+decon

The input is generated once (cached under --cache-dir, not timed): 64k raw records with 4 completions of
~1-2 KB each, full annotation objects (rating, rationales, types), critiques and system prompts, prompts
of a long-tailed length (median ~60 words), a few truthful_qa records, "N/A" ratings, ties and prompts
copied from AlpacaEval/MT-Bench, about 1 GB of JSONL like the real `openbmb/UltraFeedback`.

Each configuration runs `orpo.data.prepare_dataset` in its own subprocess with
MALLOC_MMAP_THRESHOLD_=1048576 (so RSS tracks live memory, see /work/shared/BENCHMARKING.md) and reports
wall time (input hashing, parsing, writing, save_to_disk: everything), records/s, CPU seconds of the
process and its worker processes (on a shared machine wall time also measures the neighbours; CPU time
does not), peak RSS (the process plus each worker at the largest worker's peak: an upper bound on the
total) and the main process's increase over its RSS after imports. `/1proc` runs all in one process.
A table is printed and JSON written to benchmarks/results/binarize.json.
Target: argilla + decontamination, 64k records, < 30 s and < 2 GB peak RSS on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EVAL_FILES = [SHARED / "mt_bench" / "question.jsonl", SHARED / "alpaca_eval" / "gpt4_1106_preview_outputs.json"]
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
CONFIGS = {
    # name: (recipe, decontaminate, worker processes; None = the default, the CPUs available)
    "argilla+decon": ("argilla", True, None),
    "h4+decon": ("h4", True, None),
    "max-min+decon": ("max-min", True, None),
    "argilla": ("argilla", False, None),
    "argilla+decon/1proc": ("argilla", True, 1),
}
TARGET_SECONDS = 30.0
TARGET_PEAK_MB = 2048.0


# ----------------------------------------------------------------------------------------------------
# Synthetic input


def _corpus(rng: random.Random, n_words: int = 1_500_000) -> str:
    """Random English-like text; slices of it make prompts and responses without per-word Python work."""
    syllables = ["ka", "lo", "mi", "ter", "son", "ra", "ven", "di", "po", "lin", "ex", "ta", "mor", "qu", "ble"]
    vocab = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(20_000)]
    vocab += ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "with", "as", "on", "be"] * 300
    words = rng.choices(vocab, k=n_words)
    for i in range(0, n_words, rng.randint(8, 20)):
        words[i] = words[i] + "."
    return " ".join(words)


def _slice(rng: random.Random, corpus: str, n_chars: int) -> str:
    start = rng.randrange(0, len(corpus) - n_chars - 1)
    return corpus[start : start + n_chars]


def _prompt(rng: random.Random, corpus: str) -> str:
    # Long-tailed like UltraFeedback instructions: most are short, some (few-shot flan) are thousands of chars.
    n_words = min(2000, max(3, int(rng.lognormvariate(4.1, 0.9))))
    return _slice(rng, corpus, n_words * 6)


def _completion(rng: random.Random, corpus: str, index: int, tie: bool, na: bool) -> dict:
    ratings = ["4"] * 4 if tie else [str(rng.randint(1, 5)) for _ in ASPECTS]
    if na:
        ratings[1] = "N/A"
    annotations = {}
    for aspect, rating in zip(ASPECTS, ratings, strict=True):
        entry = {"Rating": rating, "Rationale": _slice(rng, corpus, rng.randint(150, 450))}
        if aspect in ("helpfulness", "truthfulness"):
            entry["Rationale For Rating"] = _slice(rng, corpus, rng.randint(150, 450))
            entry["Type"] = rng.sample(["0", "1", "2", "3"], k=2)
        annotations[aspect] = entry
    numbers = [float(r) for r in ratings if r != "N/A"]
    return {
        "annotations": annotations,
        "critique": _slice(rng, corpus, rng.randint(400, 1200)),
        "custom_system_prompt": _slice(rng, corpus, rng.randint(100, 400)),
        "fine-grained_score": sum(numbers) / len(numbers),
        "model": f"model-{index}",
        "overall_score": float(rng.choice([1, 2.5, 4, 5.5, 6, 7, 7.5, 8, 8.5, 9, 10])),
        "principle": rng.choice(["helpfulness", "honesty", "truthfulness", "verbalized_calibration"]),
        "response": _slice(rng, corpus, rng.randint(800, 2400)),
    }


def generate(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    corpus = _corpus(rng)
    eval_prompts = []
    for eval_file in EVAL_FILES:
        if eval_file.suffix == ".json":
            eval_prompts += [row["instruction"] for row in json.loads(eval_file.read_text())]
        else:
            eval_prompts += [json.loads(line)["turns"][0] for line in eval_file.read_text().splitlines() if line]
    tmp = path.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        for _ in range(records):
            roll = rng.random()
            prompt = _prompt(rng, corpus)
            if roll < 0.005:  # an evaluation prompt pasted into a longer instruction
                prompt = f"{prompt} {rng.choice(eval_prompts)}"
            tie = 0.02 <= roll < 0.04
            record = {
                "source": "truthful_qa" if 0.04 <= roll < 0.053 else rng.choice(["evol_instruct", "sharegpt",
                                                                                 "flan_v2_niv2", "ultrachat"]),
                "instruction": prompt,
                "models": [f"model-{i}" for i in range(4)],
                "correct_answers": [],
                "incorrect_answers": [],
                "completions": [_completion(rng, corpus, i, tie, na=rng.random() < 0.05) for i in range(4)],
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------------
# One configuration, in a child process


@dataclass
class Result:
    config: str
    recipe: str
    decontaminate: bool
    workers: int
    records: int
    input_mb: float
    seconds: float
    records_per_s: float
    cpu_seconds: float  # user + sys of the process and its workers: what contention cannot inflate
    main_cpu_seconds: float
    peak_rss_mb: float  # the process, plus every worker at the largest worker's peak (an upper bound)
    main_peak_rss_mb: float
    worker_peak_rss_mb: float
    baseline_rss_mb: float
    rss_increase_mb: float
    train: int
    test: int
    dropped: int
    meets_target: bool | None


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _usage(who: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of this process or of its waited-for children."""
    import resource

    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in kB on Linux


def run_child(config: str, data: Path, out_dir: Path) -> None:
    import resource

    import datasets  # noqa: F401  (imported before the baseline reading, like a real caller)
    import orjson  # noqa: F401
    import pyarrow  # noqa: F401

    from orpo.config import DataConfig
    from orpo.data import prepare_dataset
    from orpo.data.pool import worker_count as pool_worker_count

    recipe, decontaminate, workers = CONFIGS[config]
    cfg = DataConfig(
        source=str(data),
        recipe=recipe,
        decontaminate=decontaminate,
        decontamination_files=[str(p) for p in EVAL_FILES] if decontaminate else [],
    )
    baseline = _rss_mb()
    cpu_before, _ = _usage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    prepared = prepare_dataset(cfg, out_dir / config.replace("/", "-"), progress=False, workers=workers)
    seconds = time.perf_counter() - start
    cpu_main, main_peak = _usage(resource.RUSAGE_SELF)
    cpu_workers, worker_peak = _usage(resource.RUSAGE_CHILDREN)
    count = pool_worker_count(workers)
    worker_count = count if count > 1 else 0
    peak = main_peak + worker_count * worker_peak
    records = prepared.counts["records_in"]
    target = (seconds < TARGET_SECONDS and peak < TARGET_PEAK_MB) if config == "argilla+decon" else None
    result = Result(
        config=config, recipe=recipe, decontaminate=decontaminate, workers=max(1, worker_count), records=records,
        input_mb=round(data.stat().st_size / 2**20, 1), seconds=round(seconds, 2),
        records_per_s=round(records / seconds), cpu_seconds=round(cpu_main - cpu_before + cpu_workers, 1),
        main_cpu_seconds=round(cpu_main - cpu_before, 1),
        peak_rss_mb=round(peak), main_peak_rss_mb=round(main_peak), worker_peak_rss_mb=round(worker_peak),
        baseline_rss_mb=round(baseline), rss_increase_mb=round(main_peak - baseline),
        train=prepared.counts["train"], test=prepared.counts["test"], dropped=prepared.counts["dropped"],
        meets_target=target,
    )
    print("RESULT " + json.dumps(asdict(result)))


def run_parent(args: argparse.Namespace) -> list[Result]:
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    data = args.cache_dir / f"ultrafeedback-synthetic-{args.records}.jsonl"
    if not data.is_file():
        print(f"generating {args.records} synthetic records -> {data} (once, not timed)", flush=True)
        generate(data, args.records)
    print(f"input: {data} ({data.stat().st_size / 2**20:.0f} MB)", flush=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = []
    with tempfile.TemporaryDirectory(prefix="orpo-bench-binarize-", dir=args.cache_dir) as out_dir:
        for config in args.configs:
            completed = subprocess.run(
                [sys.executable, __file__, "--child", config, "--data", str(data), "--out-dir", out_dir],
                env=env, capture_output=True, text=True, check=False,
            )
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.stderr.write(completed.stderr)
                raise SystemExit(f"configuration {config} failed (exit {completed.returncode})")
            results.append(Result(**json.loads(lines[-1][len("RESULT "):])))
            print(f"  {config}: {results[-1].seconds} s", flush=True)
    return results


def print_table(results: list[Result]) -> None:
    header = ("config", "procs", "records", "input MB", "seconds", "records/s", "CPU s (main)", "peak RSS MB",
              "main/worker MB", "+RSS MB", "train", "test", "dropped", "target")
    rows = [
        (r.config, r.workers, r.records, r.input_mb, r.seconds, r.records_per_s,
         f"{r.cpu_seconds} ({r.main_cpu_seconds})", r.peak_rss_mb,
         f"{r.main_peak_rss_mb:.0f}/{r.worker_peak_rss_mb:.0f}", r.rss_increase_mb, r.train, r.test, r.dropped,
         {True: "met", False: "MISSED", None: ""}[r.meets_target])
        for r in results
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=64_000)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "orpo-bench-binarize")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "binarize.json")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.data, args.out_dir)
        return
    results = run_parent(args)
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "binarize",
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),  # 1, 5, 15 min: how shared the machine was
        "python": sys.version.split()[0],
        "target": {"config": "argilla+decon", "seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_PEAK_MB},
        "results": [asdict(r) for r in results],
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
