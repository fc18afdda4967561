"""Our ORPO training step vs TRL's ORPOTrainer (trl.experimental.orpo), side by side.

    .venv/bin/python benchmarks/train_step.py --quick                 # seq 256, 3 steps, every model
    .venv/bin/python benchmarks/train_step.py                         # seq 256 and 1024, 6 steps
    .venv/bin/python benchmarks/train_step.py --device cuda           # also MFU and CUDA peak memory
    .venv/bin/python benchmarks/train_step.py --models smollm2-lora --seq-lens 1024 --steps 4
    .venv/bin/python benchmarks/train_step.py --trainers ours ours-stacked trl    # also our stacked layout
    .venv/bin/python benchmarks/train_step.py --trainers ours ours-masked         # split attention vs 4D mask
    .venv/bin/python benchmarks/train_step.py --models smollm2-full --optimizer adamw_8bit   # both 8-bit AdamW
    .venv/bin/python benchmarks/train_step.py --models smollm2-lora smollm2-full --seq-lens 1024 --profile
    .venv/bin/python benchmarks/train_step.py --trainers ours --ours-allocators tcmalloc system  # allocators

Same model, same preference pairs, same batch size (2 pairs) and sequence length, gradient checkpointing on
for both, fp32 on CPU (bf16 weights and autocast on CUDA), the same LoRA adapter (r 16, alpha 32, no
dropout: TRL disables dropout). Both optimise the same objective: NLL over prompt + response (TRL's,
`train.nll_on_prompt=true` for us) plus lambda 0.1 times the odds-ratio term. What differs is how the step
is computed: TRL pads chosen and rejected of a random batch to one length (4 rows) and materialises the
(2B, T, V) logits; we batch pairs of similar length (`group_by_length`), put each pair in one row with its
prompt computed once (`batch_layout: shared_prompt`; `ours-stacked` is our 4-row layout), attention as two
causal SDPA calls per row (`orpo.shared_attention`; `ours-masked` gives SDPA the layout's 4D mask instead), and
project only the label positions through the output embedding, chunk by chunk.

By default TRL trains on exactly our batches, step by step (`--trl-batches ours`: its sampler yields the
pairs in the order our trainer consumes them, length grouping included), so both see the same pairs and
any difference is how a batch is computed. `--trl-batches random` gives TRL its own random sampler, as a
default TRL run would, which adds padding on TRL's side.

Data: the 805 AlpacaEval instructions with two real answers each (GPT-4 Turbo's as chosen,
Mistral-ORPO-beta's as rejected, from ../shared/data/alpaca_eval), so lengths vary like real preference
data. Pairs whose prompt takes more than half the sequence length are dropped, so neither trainer
truncates a prompt (TRL never does; it truncates responses to max_length - prompt length, like us).

Each (model, trainer, sequence length) runs twice, each time in its own subprocess, and both peaks are
reported with their ratios:
- "as users run it": each trainer in its default configuration, ours in the environment our launcher
  gives its training process (`orpo.memory.training_environment`: tcmalloc when installed, else glibc
  malloc thresholds; `orpo train` and the flow's `accelerate launch` both use it), TRL with none. This
  run is also the one timed. `--ours-allocators` runs ours once per allocator choice, side by side.
- "live" (first `--memory-steps` steps): MALLOC_MMAP_THRESHOLD_=1048576, so RSS follows live memory
  instead of glibc's retained heap; that setting makes every large allocation a fresh mmap and slows CPU
  steps by up to half, which is why it does not time anything.
Besides wall time, each step's process CPU time is reported (`cpu_s_per_step`): on a loaded machine it is
the steadier figure. The JSON records the load average and `timing_measured_under_load`.
`--profile` profiles one extra step after the timed ones with torch.profiler and prints the top ops by
self CPU time (op shares hold under load even where absolute times do not). A worker loads the
model, touches every parameter (transformers maps safetensors lazily), reads the baseline RSS, then runs
the steps while a thread samples RSS every 5 ms. The first step is a warm-up and is not timed. Throughput
counts the tokens of the pairs as two conversations each (prompt + chosen, prompt + rejected; padding
excluded), the same count for both trainers whatever the layout computes; s/step is the median of the
timed steps.
MFU = 6 * parameters * tokens / seconds / peak FLOP/s (Kaplan et al. 2020's 6N FLOPs per token for
forward + backward; an upper bound for LoRA, whose frozen weights get no weight gradients).

Prints a table and writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_eval"
RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
MODELS = ("smollm2-lora", "smollm2-full", "tiny49k-full")
TRAINERS = ("ours", "ours-masked", "ours-stacked", "trl")
BATCH_PAIRS = 2
LIVE_MMAP_THRESHOLD = 1048576  # the live-memory run: every allocation of 1 MB or more is its own mapping
ORPO_LAMBDA = 0.1
LEARNING_RATE = 5e-6
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU; override with --peak-tflops.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


# ---------------------------------------------------------------------------------------------------------
# Shared inputs
# ---------------------------------------------------------------------------------------------------------


def preference_rows(limit: int) -> list[dict]:
    """Real instruction + two real answers, in TRL's conversational layout (also accepted by ours)."""
    chosen = json.loads((SHARED / "gpt4_1106_preview_outputs.json").read_text(encoding="utf-8"))
    rejected = {r["instruction"]: r["output"] for r in
                json.loads((SHARED / "mistral-orpo-beta_outputs.json").read_text(encoding="utf-8"))}
    rows = []
    for record in chosen:
        if record["instruction"] in rejected:
            rows.append({
                "prompt": [{"role": "user", "content": record["instruction"]}],
                "chosen": [{"role": "assistant", "content": record["output"]}],
                "rejected": [{"role": "assistant", "content": rejected[record["instruction"]]}],
            })
    return rows[:limit]


def model_dir(name: str, cache: Path) -> Path:
    """SmolLM2-135M-Instruct (built in), or a 2-layer 64-wide Llama with SmolLM2's 49k vocabulary."""
    from orpo.models import SMOLLM2, resolve_model

    smollm2 = Path(resolve_model(SMOLLM2).path)
    if not name.startswith("tiny49k"):
        return smollm2
    target = cache / "tiny49k"
    if not (target / "config.json").is_file():
        from orpo.models import build_tiny_llama, load_tokenizer

        tokenizer = load_tokenizer(str(smollm2))
        model, _ = build_tiny_llama(seed=0, vocab_size=len(tokenizer), hidden_size=64, layers=2)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, key, getattr(tokenizer, key))
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    return target


def keep_short_prompts(rows: list[dict], tokenizer, seq_len: int) -> list[dict]:
    def prompt_tokens(row) -> int:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [row for row in rows if prompt_tokens(row) < seq_len // 2]


# ---------------------------------------------------------------------------------------------------------
# Measuring inside a worker
# ---------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak RSS while running, sampled from a thread (ru_maxrss would include the loading peak)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak, self._stop = interval_s, rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:  # noqa: PYI034 (a final class)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def touch_parameters(model) -> None:
    """Read every parameter once, so lazily mapped weights are resident before the baseline reading."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.sum()


def memory_baseline(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


def summarise(times: list[float], tokens: list[int], padded: list[int], *, device: str, baseline: float,
              peak_rss: float, params: int, peak_flops: float | None, cpu_times: list[float]) -> dict:
    """Per-step times and token counts (warm-up step already dropped) to the reported numbers."""
    import torch

    seconds = sum(times)
    result = {
        "s_per_step": statistics.median(times),
        # CPU seconds of the whole process (all threads) per step: steadier than wall time on a loaded
        # machine, and it counts the kernel's page-fault work that an allocator setting adds or saves.
        "cpu_s_per_step": statistics.median(cpu_times),
        "tokens_per_s": sum(tokens) / seconds,
        "timed_steps": len(times),
        "real_tokens_per_step": sum(tokens) / len(tokens),
        "padding_fraction": 1 - sum(tokens) / sum(padded),
        "baseline_rss_mb": baseline if device == "cpu" else rss_mb(),
        "peak_rss_mb": peak_rss,
        "rss_increase_mb": peak_rss - baseline if device == "cpu" else None,
        "parameters": params,
    }
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(cuda_baseline_mb=baseline, cuda_peak_mb=peak, cuda_increase_mb=peak - baseline)
        if peak_flops:
            result["mfu"] = 6 * params * sum(tokens) / seconds / peak_flops
    return result


@contextmanager
def profiled(rows: int = 25):
    """torch.profiler over the block; yields a list it fills with the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    table: list[dict] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda_available() else [])
    with profile(activities=activities) as prof:
        yield table
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        table.append({"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                      "self_cpu_share": e.self_cpu_time_total / total, "cpu_total_ms": e.cpu_time_total / 1e3})
    table.append({"op": "(all ops)", "calls": sum(e.count for e in events), "self_cpu_ms": total / 1e3,
                  "self_cpu_share": 1.0, "cpu_total_ms": total / 1e3})


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_ours(model_path: Path, rows: list[dict], *, lora: bool, seq_len: int, steps: int, device: str,
             peak_flops: float | None, optimizer: str, profile: bool, layout: str = "shared_prompt",
             split_attention: bool = True) -> dict:
    import torch
    from datasets import Dataset, DatasetDict

    from orpo.config import validate_config
    from orpo.train import SUM_KEYS, ORPORecipe

    work = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(work / "data"))
    config = validate_config({
        "workdir": str(work),
        "model": {"name_or_path": str(model_path)},
        "train": {
            "max_length": seq_len, "max_prompt_length": seq_len // 2, "per_device_batch_size": BATCH_PAIRS,
            "max_steps": steps, "learning_rate": LEARNING_RATE, "orpo_lambda": ORPO_LAMBDA,
            "nll_on_prompt": True, "gradient_checkpointing": True,
            "mixed_precision": "bf16" if device == "cuda" else "no",
            "logging_steps": 10**6, "lora": {"enabled": lora, "r": 16, "alpha": 32, "dropout": 0.0},
            "batch_layout": layout, "optimizer": optimizer,
        },
    })
    recipe = ORPORecipe(config, work / "data", work / "out")
    recipe.setup()
    model = recipe.accelerator.unwrap_model(recipe.model)
    if not split_attention:  # SDPA reads the layout's 4D mask again, as before orpo.shared_attention
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation("sdpa")
    touch_parameters(model)
    baseline = memory_baseline(device)
    times, tokens, padded, cpu_times = [], [], [], []
    recipe.model.train()
    with RssSampler() as sampler:
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            stats = recipe.train_step()
            sums = dict(zip(SUM_KEYS, stats.sums.tolist()))
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            tokens.append(int(sums["real_tokens"]))
            # Padding share of the computed positions, as a token count comparable with TRL's.
            padded.append(int(sums["real_tokens"] * sums["padded_tokens"] / max(sums["input_tokens"], 1)))
    result = summarise(times[1:], tokens[1:], padded[1:], device=device, baseline=baseline, peak_rss=sampler.peak,
                       params=sum(p.numel() for p in model.parameters()), peak_flops=peak_flops,
                       cpu_times=cpu_times[1:])
    if profile:  # one more step, after the measured ones: the profiler's overhead is in no figure above
        recipe.plan.step_pairs = lambda step, pairs=recipe.plan.step_pairs: pairs(1)  # step 1's batch again
        with profiled() as table:
            recipe.train_step()
        result["profile"] = table
    return result


def our_pair_order(rows: list[dict], tokenizer, seq_len: int) -> list[int]:
    """The order in which our trainer (default layout, seed and length grouping) consumes `rows` in epoch 0."""
    from orpo.collate import row_length, tokenize_pair
    from orpo.config import TrainConfig
    from orpo.train import BatchPlan

    lengths = [row_length(tokenize_pair(row, tokenizer, seq_len, seq_len // 2), "shared_prompt") for row in rows]
    plan = BatchPlan(lengths, per_device_batch_size=BATCH_PAIRS, num_processes=1, gradient_accumulation_steps=1,
                     seed=TrainConfig.model_fields["seed"].default, group_by_length=True)
    return plan.epoch_order(0)


def run_trl(model_path: Path, rows: list[dict], *, lora: bool, seq_len: int, steps: int, device: str,
            peak_flops: float | None, optimizer: str, profile: bool, order: list[int] | None = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    from orpo.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_path))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    inner = DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id)
    real_tokens: list[int] = []
    padded_tokens: list[int] = []

    def recording_collator(features):
        batch = inner(features)
        real_tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
        # TRL pads both halves to the longer of the two before its one forward pass.
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        padded_tokens.append(2 * batch["chosen_input_ids"].shape[0] * length)
        return batch

    ends: list[float] = []
    cpu_ends: list[float] = []
    profiler, table = (profiled(), {}) if profile else (None, {})

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_step_begin(self, args, state, control, **kwargs):
            if profiler is not None and state.global_step == steps:  # the extra step after the measured ones
                table["ops"] = profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            if profiler is not None and state.global_step == steps + 1:
                profiler.__exit__(None, None, None)
                return
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    args = ORPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps + profile,
        per_device_train_batch_size=BATCH_PAIRS,
        gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, beta=ORPO_LAMBDA, max_length=seq_len,
        gradient_checkpointing=True, bf16=device == "cuda", use_cpu=device == "cpu", report_to="none",
        save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
        **({"optim": "adamw_bnb_8bit"} if optimizer == "adamw_8bit" else {}),  # else TRL's default AdamW
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]) if lora else None
    class Trainer(ORPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            # Our pair order (same batches, step by step) when given, else TRL's own random sampler.
            return order if order is not None else super()._get_train_sampler(*args, **kwargs)

    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      data_collator=recording_collator, peft_config=peft_config, callbacks=[Timer()])
    touch_parameters(trainer.model)
    baseline = memory_baseline(device)
    with RssSampler() as sampler:
        trainer.train()
    times = [b - a for a, b in pairwise(ends)]
    cpu_times = [b - a for a, b in pairwise(cpu_ends)]
    # The dataloader collates one batch ahead; batch i is still step i's.
    result = summarise(times[1:], real_tokens[1:steps], padded_tokens[1:steps], device=device, baseline=baseline,
                       peak_rss=sampler.peak, params=sum(p.numel() for p in trainer.model.parameters()),
                       peak_flops=peak_flops, cpu_times=cpu_times[1:])
    if profile:
        result["profile"] = table.get("ops", [])
    return result


def worker(args: argparse.Namespace) -> None:
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    from orpo.models import load_tokenizer

    path = model_dir(args.model, Path(args.cache))
    tokenizer = load_tokenizer(str(path))
    rows = keep_short_prompts(preference_rows(args.pairs), tokenizer, args.seq_len)
    options = {"lora": args.model.endswith("lora"), "seq_len": args.seq_len, "steps": args.steps,
               "device": args.device, "peak_flops": args.peak_flops, "optimizer": args.optimizer,
               "profile": args.profile}
    if args.trainer == "trl":
        order = our_pair_order(rows, tokenizer, args.seq_len) if args.trl_batches == "ours" else None
        result = run_trl(path, rows, order=order, **options)
    else:
        layout = "stacked" if args.trainer == "ours-stacked" else "shared_prompt"
        result = run_ours(path, rows, layout=layout, split_attention=args.trainer != "ours-masked", **options)
    result.update(trainer=args.trainer, model=args.model, seq_len=args.seq_len, pairs_available=len(rows),
                  trl_batches=args.trl_batches if args.trainer == "trl" else None)
    Path(args.worker_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------


def peak_flops_for(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def run_worker(args: argparse.Namespace, trainer: str, model: str, seq_len: int, peak_flops: float | None,
               *, steps: int, allocator: str, profile: bool = False) -> dict:
    """One worker subprocess. allocator "live": MALLOC_MMAP_THRESHOLD_=1 MB, so that RSS follows live memory;
    otherwise as a user's machine runs the trainer: TRL with no allocator environment, ours with the one our
    launcher gives its training process for ORPO_ALLOCATOR=`allocator` (orpo.memory)."""
    from orpo.memory import ALLOCATOR_ENV, USER_ALLOCATOR_KEYS, training_environment

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, __file__, "--worker", "--trainer", trainer, "--model", model,
               "--seq-len", str(seq_len), "--steps", str(steps), "--device", args.device,
               "--pairs", str(args.pairs), "--cache", str(args.cache), "--worker-out", str(out),
               "--trl-batches", args.trl_batches, "--optimizer", args.optimizer]
    if peak_flops:
        command += ["--peak-flops", str(peak_flops)]
    if profile:
        command.append("--profile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    for key in (*USER_ALLOCATOR_KEYS, "ORPO_TRAINING_ENV", ALLOCATOR_ENV):  # each run sets its own
        env.pop(key, None)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if allocator == "live":
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    elif trainer != "trl":
        env = training_environment({**env, ALLOCATOR_ENV: allocator})
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.read_text():
        return {"trainer": trainer, "model": model, "seq_len": seq_len, "error": done.stderr[-3000:]}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def measure(args: argparse.Namespace, trainer: str, model: str, seq_len: int, peak_flops: float | None,
            allocator: str, live: dict[tuple, dict]) -> dict:
    """Timing and the peak RSS as users run it from one run, live memory from a run with the 1 MB threshold
    (one per trainer, model and length, kept in `live` for the other allocators)."""
    from orpo.memory import allocator_settings

    timing = run_worker(args, trainer, model, seq_len, peak_flops, steps=args.steps, allocator=allocator,
                        profile=args.profile)
    if trainer != "trl":
        timing.update(allocator=allocator, allocator_env=allocator_settings(allocator))
    if "error" in timing or args.device == "cuda":  # CUDA memory is read from the allocator, not RSS
        return timing
    key = (trainer, model, seq_len)
    if key not in live:
        live[key] = run_worker(args, trainer, model, seq_len, peak_flops, steps=args.memory_steps,
                               allocator="live")
    memory = live[key]
    if "error" in memory:
        return memory
    for key in ("baseline_rss_mb", "peak_rss_mb", "rss_increase_mb"):
        timing[f"user_{key}"] = timing.pop(key)
        timing[f"live_{key}"] = memory[key]
    timing["user_over_live_peak"] = timing["user_peak_rss_mb"] / timing["live_peak_rss_mb"]
    timing["memory_steps"] = args.memory_steps
    return timing


def ratios(ours: dict, trl: dict) -> dict:
    if "error" in ours or "error" in trl:
        return {}
    out = {
        "throughput_ours_over_trl": ours["tokens_per_s"] / trl["tokens_per_s"],
        "s_per_step_ours_over_trl": ours["s_per_step"] / trl["s_per_step"],
    }
    for kind in ("user", "live"):
        for key in ("peak_rss", "rss_increase"):
            if ours.get(f"{kind}_{key}_mb") and trl.get(f"{kind}_{key}_mb"):
                out[f"{kind}_{key}_ours_over_trl"] = ours[f"{kind}_{key}_mb"] / trl[f"{kind}_{key}_mb"]
    if ours.get("cuda_peak_mb") and trl.get("cuda_peak_mb"):
        out["cuda_peak_ours_over_trl"] = ours["cuda_peak_mb"] / trl["cuda_peak_mb"]
    return out


def label(result: dict) -> str:
    """The trainer, and for ours the allocator it ran under (auto: what it resolved to)."""
    if "allocator" not in result:
        return result["trainer"]
    env = result.get("allocator_env", {})
    resolved = "tcmalloc" if "LD_PRELOAD" in env else "glibc thresholds" if env else "glibc defaults"
    return f"{result['trainer']} ({resolved})"


def print_table(results: list[dict], device: str) -> None:
    if device == "cpu":
        memory = "peak MB as users run it (increase) | live peak MB (increase) | users / live"
    else:
        memory = "CUDA peak MB (increase) | | "
    print(f"\n| model | seq | trainer | s/step | tokens/s | padding | {memory} | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['seq_len']} | {label(r)} | error | | | | | | |")
            continue
        if device == "cpu":
            mem = (f"{r['user_peak_rss_mb']:.0f} ({r['user_rss_increase_mb']:.0f}) | "
                   f"{r['live_peak_rss_mb']:.0f} ({r['live_rss_increase_mb']:.0f}) | {r['user_over_live_peak']:.2f}x")
        else:
            mem = f"{r['cuda_peak_mb']:.0f} ({r['cuda_increase_mb']:.0f}) | | "
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"| {r['model']} | {r['seq_len']} | {label(r)} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['padding_fraction']:.0f}% | {mem} | {mfu} |")


def print_profiles(results: list[dict]) -> None:
    for r in results:
        if not r.get("profile"):
            continue
        print(f"\nprofile of one step, {r['model']} seq {r['seq_len']} {r['trainer']} (top ops by self CPU time)")
        print("| op | calls | self CPU ms | share | CPU total ms |\n|---|---|---|---|---|")
        for op in r["profile"]:
            print(f"| {op['op']} | {op['calls']} | {op['self_cpu_ms']:.0f} | {100 * op['self_cpu_share']:.1f}% | "
                  f"{op['cpu_total_ms']:.0f} |")


def main() -> None:
    from orpo.memory import ALLOCATOR_CHOICES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="seq 256 only, 3 steps (1 warm-up + 2 timed)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=["ours", "trl"],
                        help="ours = shared-prompt layout (the default), ours-masked = the same with SDPA under the "
                        "layout's 4D mask, ours-stacked = 2B rows like TRL's")
    parser.add_argument("--trl-batches", choices=["ours", "random"], default="ours",
                        help="ours: TRL trains on exactly our batches, step by step (our length grouping included); "
                             "random: TRL's own random sampler (default TRL usage, more padding)")
    parser.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], default="adamw",
                        help="for both trainers: torch AdamW, or bitsandbytes' 8-bit AdamW (TRL: adamw_bnb_8bit)")
    parser.add_argument("--ours-allocators", nargs="+", choices=ALLOCATOR_CHOICES, default=["auto"],
                        help="our trainer's runs as users run it, one per ORPO_ALLOCATOR value (orpo.memory): auto "
                        "(the default: tcmalloc when installed, else glibc thresholds), tcmalloc, glibc-thresholds, "
                        "system (glibc defaults); side by side, to time and size what each costs")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps of the separate memory run (CPU), warm-up included (default 2)")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None, help="default 256 1024 (--quick: 256)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run incl. 1 warm-up (default 6, quick 3)")
    parser.add_argument("--pairs", type=int, default=200, help="preference pairs to draw batches from")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per worker (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per run after the timed ones (torch.profiler; per-op table)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "orpo-bench-models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # Internal: one measurement in this process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peak-flops", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_steps < 2:
        parser.error("--memory-steps must be at least 2: the first step is a warm-up and is not measured")
    if args.worker:
        worker(args)
        return

    args.seq_lens = args.seq_lens or ([256] if args.quick else [256, 1024])
    args.steps = args.steps or (3 if args.quick else 6)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")
    args.cache.mkdir(parents=True, exist_ok=True)
    peak_flops = peak_flops_for(args.device, args.peak_tflops)
    load_before = os.getloadavg()
    results, comparisons, live = [], [], {}
    for seq_len in args.seq_lens:
        for model in args.models:
            runs = []
            for trainer in args.trainers:
                for allocator in ["-"] if trainer == "trl" else args.ours_allocators:
                    result = measure(args, trainer, model, seq_len, peak_flops, allocator, live)
                    results.append(result)
                    runs.append(result)
                    status = result.get("error", "").splitlines()[-1:] or [f"{result['s_per_step']:.2f} s/step"]
                    print(f"{model} seq {seq_len} {label(result)}: {status[0]}", file=sys.stderr, flush=True)
            trl_run = next((r for r in runs if r["trainer"] == "trl"), None)
            for ours in (r for r in runs if r["trainer"] != "trl" and trl_run is not None):
                comparisons.append({"model": model, "seq_len": seq_len, "trainer": label(ours),
                                    **ratios(ours, trl_run)})
    print_table(results, args.device)
    print_profiles(results)
    print("\n| model | seq | trainer | throughput vs TRL | peak as users run it vs TRL | live peak vs TRL "
          "| live increase vs TRL |")
    print("|---|---|---|---|---|---|---|")

    def ratio(c: dict, key: str) -> str:
        return f"{c[key]:.2f}x" if c.get(key) else "-"

    for c in comparisons:
        if "throughput_ours_over_trl" not in c:
            continue
        live = "cuda_peak_ours_over_trl" if "cuda_peak_ours_over_trl" in c else "live_peak_rss_ours_over_trl"
        print(f"| {c['model']} | {c['seq_len']} | {c['trainer']} | {c['throughput_ours_over_trl']:.2f}x | "
              f"{ratio(c, 'user_peak_rss_ours_over_trl')} | {ratio(c, live)} | "
              f"{ratio(c, 'live_rss_increase_ours_over_trl')} |")

    import torch
    import transformers
    import trl

    payload = {
        "device": args.device,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "trl": trl.__version__,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                 # Timing is only comparable on an otherwise idle machine; memory figures hold under load.
                 "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
                 "timing_measured_under_load": max(load_before[0], os.getloadavg()[0]) > 0.5 + (
                     args.threads or torch.get_num_threads())},
        "settings": {"batch_pairs": BATCH_PAIRS, "steps": args.steps, "memory_steps": args.memory_steps,
                     "threads": args.threads, "seq_lens": args.seq_lens, "pairs": args.pairs,
                     "trainers": args.trainers, "trl_batches": args.trl_batches, "optimizer": args.optimizer,
                     "gradient_checkpointing": True, "orpo_lambda": ORPO_LAMBDA,
                     "live_run_malloc_mmap_threshold": LIVE_MMAP_THRESHOLD,
                     "ours_allocators": args.ours_allocators},
        "results": results,
        "comparisons": comparisons,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
