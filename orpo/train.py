"""ORPO training on `accelerate`: one loop for a laptop CPU, one GPU, or many (DDP, FSDP, DeepSpeed ZeRO-3).

Run it:

    python -m orpo.train --config configs/demo.yaml --dataset-dir runs/data/<key> [train.max_steps=100 ...]
    accelerate launch --multi_gpu --num_processes 2 -m orpo.train --config ... --dataset-dir ...  # no GPU: DDP on CPU, gloo
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m orpo.train --config ... --dataset-dir ...

(`orpo train` calls `train()` in-process; configs/accelerate/*.yaml document one command per setup.)

Life cycle, in `ORPORecipe`: `setup()` builds the accelerator, then the model, optimizer, data and schedule
(each from its own config slice), prepares them, and resumes from the latest checkpoint of the output
directory; `train()` runs the loop; `export()` writes the Hugging Face model directory and returns a
`TrainResult`.

What one optimizer step is. The step's pairs are a slice of the epoch's order, a pure function of
(seed, epoch) (length-grouped when `group_by_length`), so resuming at step s only needs s. The
`per_device_batch_size * num_processes * gradient_accumulation_steps` pairs of a step are split into
micro-batches, and every micro-batch's loss is normalised by the totals of the whole step (NLL tokens and
pairs over all micro-batches and processes), so its gradient is the gradient of one big batch, whatever the
number of processes and accumulation steps. Every process holds the tokenized data, so it knows these
totals without communication.

Checkpoints (`accelerator.save_state`: model or LoRA weights, optimizer, schedule, RNG) go to
`output_dir/checkpoints/step-N`, written under a temporary name and renamed when complete. Re-running
with the same output directory resumes from the newest one and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orpo.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    PipelineConfig,
    TrainConfig,
    dump_config,
    load_config,
)
from orpo.memory import release_free_memory

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint
EXPORT_COMPLETE = "export_complete.json"  # written last into an exported model directory
METRICS_JSONL = "metrics.jsonl"
TRAIN_RESULT = "train_result.json"
_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------------------------------------
# The result other stages consume
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Where a finished training run put things. `model_dir` is complete once it holds export_complete.json."""

    output_dir: Path
    model_dir: Path  # LoRA adapter + tokenizer, or the full model; safetensors, orpo_config.yaml, metrics.json
    merged_dir: Path | None  # the adapter merged into its base (train.lora.merge_on_export)
    metrics_path: Path  # one JSON object per logged step (train metrics, and eval_ metrics)
    final_metrics: dict[str, float]
    base_model: str  # the model spec trained from (config.model.name_or_path)
    base_model_path: str  # the resolved local directory or hub id (what an adapter applies to)
    is_lora: bool
    global_step: int
    dataset_dir: Path
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "model_dir": str(self.model_dir),
            "merged_dir": str(self.merged_dir) if self.merged_dir else None,
            "metrics_path": str(self.metrics_path),
            "final_metrics": dict(self.final_metrics),
            "base_model": self.base_model,
            "base_model_path": self.base_model_path,
            "is_lora": self.is_lora,
            "global_step": self.global_step,
            "dataset_dir": str(self.dataset_dir),
            "mlflow_run_id": self.mlflow_run_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(
            output_dir=Path(data["output_dir"]),
            model_dir=Path(data["model_dir"]),
            merged_dir=Path(data["merged_dir"]) if data.get("merged_dir") else None,
            metrics_path=Path(data["metrics_path"]),
            final_metrics={k: float(v) for k, v in data["final_metrics"].items()},
            base_model=data["base_model"],
            base_model_path=data["base_model_path"],
            is_lora=bool(data["is_lora"]),
            global_step=int(data["global_step"]),
            dataset_dir=Path(data["dataset_dir"]),
            mlflow_run_id=data.get("mlflow_run_id"),
        )


def default_output_dir(config: PipelineConfig, now: datetime | None = None) -> Path:
    """`train.output_dir` if set, else `<workdir>/train/<run_name or model-name-UTC date>`."""
    if config.train.output_dir:
        return Path(config.train.output_dir)
    if config.run_name:
        name = config.run_name
    else:
        model = config.model.name_or_path.removeprefix("builtin:").rstrip("/").split("/")[-1].split("@")[0]
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
        name = f"{re.sub(r'[^A-Za-z0-9._-]+', '-', model)}-{stamp}"
    return Path(config.workdir) / "train" / name


# --------------------------------------------------------------------------------------------------------
# Batches: which pairs each process sees at each step (deterministic, so resuming is exact)
# --------------------------------------------------------------------------------------------------------


def nll_token_count(pair: dict[str, Any], nll_on_prompt: bool) -> int:
    """Tokens the NLL of this pair's chosen row covers, counted as orpo.logprobs does (row position 0 is
    predicted by nothing, so it is never a label)."""
    prompt, chosen = int(pair["prompt_length"]), int(pair["chosen_length"])
    if nll_on_prompt:
        return max(prompt + chosen - 1, 0)
    return chosen - 1 if prompt == 0 and chosen > 0 else chosen


class BatchPlan:
    """The pairs of every optimizer step, and each process's micro-batches of them.

    Each epoch uses `steps_per_epoch * global_batch_size` pairs: a random subset (the remainder of fewer
    than one global batch is left out, a different one each epoch) in a random order, or length-grouped
    (`orpo.collate.length_grouped_indices` with `global_batch_size`, so a step's pairs have similar lengths).
    Both depend only on (seed, epoch). Micro-batch g of process r in a step is the step's slice
    [(g * num_processes + r) * per_device_batch_size, ... + per_device_batch_size).
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        per_device_batch_size: int,
        num_processes: int,
        gradient_accumulation_steps: int,
        seed: int,
        group_by_length: bool,
    ) -> None:
        self.lengths = lengths
        self.per_device_batch_size = per_device_batch_size
        self.num_processes = num_processes
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.group_by_length = group_by_length
        self._cached: tuple[int, list[int]] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.num_processes * self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        from orpo.collate import length_grouped_indices

        # A string seed: random.Random hashes it with SHA-512, the same in every process and Python run.
        rng = random.Random(f"orpo-epoch:{self.seed}:{epoch}")
        order = rng.sample(range(len(self.lengths)), self.steps_per_epoch * self.global_batch_size)
        if self.group_by_length:
            grouped = length_grouped_indices(
                [self.lengths[i] for i in order], self.global_batch_size, seed=self.seed + epoch
            )
            order = [order[j] for j in grouped]
        self._cached = (epoch, order)
        return order

    def step_pairs(self, step: int) -> list[int]:
        """Dataset indices of all pairs of optimizer step `step` (0-based), over all processes."""
        epoch, within = divmod(step, self.steps_per_epoch)
        size = self.global_batch_size
        return self.epoch_order(epoch)[within * size : (within + 1) * size]

    def micro_batches(self, step: int, process_index: int) -> list[list[int]]:
        pairs = self.step_pairs(step)
        size = self.per_device_batch_size
        starts = [(g * self.num_processes + process_index) * size for g in range(self.gradient_accumulation_steps)]
        return [pairs[start : start + size] for start in starts]


def eval_batches(lengths: list[int], batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """This process's evaluation batches: pairs sorted by length (little padding), dealt round-robin.

    Every process gets the same number of batches, because sharded models (FSDP, ZeRO-3) need every rank
    in every forward; a process that runs out repeats its first pair, and its result is discarded (an
    empty batch is returned in its place: the caller runs `padding_batch` and ignores the output).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = order[process_index::num_processes]
    per_process = math.ceil(len(order) / num_processes)
    count = math.ceil(per_process / batch_size)
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(count)]


# --------------------------------------------------------------------------------------------------------
# Metrics: sums on the device, reduced across processes once, divided once
# --------------------------------------------------------------------------------------------------------

SUM_KEYS = (
    "nll_sum",
    "nll_tokens",
    "pairs",
    "log_sigmoid_sum",
    "log_ratio_sum",
    "chosen_logps_sum",
    "rejected_logps_sum",
    "correct",
    "real_tokens",
    "input_tokens",
    "padded_tokens",
)


def batch_sums(out, token_counts: dict[str, int], computed_positions: int) -> torch.Tensor:
    """The summable statistics of one micro-batch (see `SUM_KEYS`), as one float64 vector on its device.

    `token_counts` are the collator's: `conversation_tokens` (the pairs as two conversations each: the
    tokens that throughput counts, whatever the layout) and `input_tokens` (non-padding positions computed);
    `computed_positions` is the batch's rows x length.
    """
    import torch

    pairs = out.chosen_logps.shape[0]
    device = out.nll_sum.device
    values = [
        out.nll_sum,
        out.nll_tokens,
        torch.tensor(float(pairs), device=device),
        out.log_sigmoid_ratio.sum(),
        out.log_odds_chosen * pairs,  # ORPOOutput holds its mean
        out.chosen_logps.sum(),
        out.rejected_logps.sum(),
        (out.chosen_rewards > out.rejected_rewards).sum(),  # TRL's accuracy: rewards, not logps
        torch.tensor(float(token_counts["conversation_tokens"]), device=device),
        torch.tensor(float(token_counts["input_tokens"]), device=device),
        torch.tensor(float(computed_positions), device=device),
    ]
    return torch.stack([v.detach().to(torch.float64) for v in values])


def _pop_counts(batch: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Take the collator's host-side numbers out of a batch, leaving only tensors to move to the device."""
    counts = {key: batch.pop(key) for key in ("conversation_tokens", "input_tokens")}
    return batch.pop("num_pairs"), counts


def metrics_from_sums(sums: dict[str, float], orpo_lambda: float) -> dict[str, float]:
    """ORPO metrics under TRL's names from summed statistics: every mean is one division of global sums."""
    pairs = max(sums["pairs"], 1.0)
    nll = sums["nll_sum"] / max(sums["nll_tokens"], 1.0)
    log_odds_ratio = sums["log_sigmoid_sum"] / pairs
    chosen = sums["chosen_logps_sum"] / pairs
    rejected = sums["rejected_logps_sum"] / pairs
    return {
        "loss": nll - orpo_lambda * log_odds_ratio,
        "nll_loss": nll,
        "log_odds_ratio": log_odds_ratio,
        "log_odds_chosen": sums["log_ratio_sum"] / pairs,
        "rewards/chosen": orpo_lambda * chosen,
        "rewards/rejected": orpo_lambda * rejected,
        "rewards/accuracies": sums["correct"] / pairs,
        "rewards/margins": orpo_lambda * (chosen - rejected),
        "logps/chosen": chosen,
        "logps/rejected": rejected,
        "padding_fraction": 1.0 - sums["input_tokens"] / max(sums["padded_tokens"], 1.0),
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by tensors, or this process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class _MetricsSink:
    """metrics.jsonl always; an MLflow run when one is active or MLFLOW_RUN_ID names one. Main process only."""

    path: Path
    enabled: bool
    mlflow: Any = None
    mlflow_run_id: str | None = None
    _started_run: bool = False

    @classmethod
    def open(cls, path: Path, enabled: bool, tracking_uri: str) -> _MetricsSink:
        sink = cls(path=path, enabled=enabled)
        if not enabled:
            return sink
        # Import MLflow only if the caller already uses it or asked for a run: it is slow to import.
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:
            sink.mlflow, sink.mlflow_run_id = mlflow, mlflow.active_run().info.run_id
        elif os.environ.get("MLFLOW_RUN_ID"):
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(tracking_uri)
            run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
            sink.mlflow, sink.mlflow_run_id, sink._started_run = mlflow, run.info.run_id, True
        if sink.mlflow_run_id:
            log.info("logging metrics live to MLflow run %s", sink.mlflow_run_id)
        return sink

    def write(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.mlflow is not None:
            step = int(record["step"])
            self.mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "step"}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        if self._started_run:
            self.mlflow.end_run()


# --------------------------------------------------------------------------------------------------------
# Builders: each takes only its slice of the config
# --------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a peft.PeftModel around one
    tokenizer: Any
    base_model_path: str  # what an exported adapter applies to
    is_lora: bool


def _setup_model(
    model_cfg: ModelConfig, lora_cfg: LoraConfig, *, gradient_checkpointing: bool, device_type: str,
    device_index: int,
) -> LoadedModel:
    """Load the model, then wrap it in a LoRA adapter (or leave every weight trainable)."""
    from orpo.models import load_model_and_tokenizer, load_tokenizer, resolve_model

    resolved = resolve_model(model_cfg.name_or_path, model_cfg.cache_dir, model_cfg.revision)
    if lora_cfg.enabled and lora_cfg.load_in_4bit:
        model = _load_4bit(model_cfg, resolved.path, device_type=device_type, device_index=device_index)
        tokenizer = load_tokenizer(resolved.path, trust_remote_code=model_cfg.trust_remote_code)
    else:
        model, tokenizer = load_model_and_tokenizer(model_cfg, device_type=device_type, path=resolved.path)
    base_model_path = resolved.path

    from peft import PeftModel

    if isinstance(model, PeftModel):
        # Training from a LoRA champion: keep its base, and either continue its adapter or merge it in.
        base_model_path = model.peft_config[model.active_adapter].base_model_name_or_path
        if lora_cfg.enabled:
            log.info("%s is a LoRA adapter; continuing to train it (its r/alpha/targets apply)", resolved.path)
            for name, param in model.named_parameters():
                param.requires_grad = "lora_" in name
            model.peft_config[model.active_adapter].inference_mode = False
        else:
            model = model.merge_and_unload()
    model.config.use_cache = False  # no KV cache while training; re-enabled for export
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and inside DDP without extra flags.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_cfg.enabled and not isinstance(model, PeftModel):
        model = _add_lora(model, lora_cfg, gradient_checkpointing=gradient_checkpointing)
    return LoadedModel(model, tokenizer, base_model_path, is_lora=isinstance(model, PeftModel))


def _load_4bit(model_cfg: ModelConfig, path: str, *, device_type: str, device_index: int):
    """QLoRA's base: NF4 weights with double quantization, computing in bf16 (fp16 on older GPUs)."""
    import importlib.util

    import torch

    if device_type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train.lora.load_in_4bit: QLoRA needs a CUDA GPU and the bitsandbytes package "
            f"(device here: {device_type}, bitsandbytes installed: "
            f"{importlib.util.find_spec('bitsandbytes') is not None}); set train.lora.load_in_4bit=false"
        )
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=compute_dtype, device_map={"": device_index},
        trust_remote_code=model_cfg.trust_remote_code, attn_implementation=model_cfg.attn_implementation,
    )
    # Casts norms to fp32 and freezes the quantized weights; checkpointing is switched on by the caller.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _add_lora(model, lora_cfg: LoraConfig, *, gradient_checkpointing: bool):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from orpo.lora_forward import fuse_lora_forward

    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        bias="none",
    )
    if gradient_checkpointing:
        # With every base weight frozen, checkpointed blocks need an input that requires grad.
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config)
    fuse_lora_forward(model)  # without dropout, one pass over each layer's output instead of three
    return model


def _setup_optimizer(model, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; no weight decay on biases and norms (1-D tensors), like HF Trainer."""
    import torch

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters; check train.lora.target_modules")
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {"lr": train_cfg.learning_rate, "betas": (train_cfg.adam_beta1, train_cfg.adam_beta2),
              "eps": train_cfg.adam_epsilon}
    if train_cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(
                "train.optimizer=adamw_8bit needs the bitsandbytes package (pip install 'bitsandbytes>=0.48'; "
                "it runs on CPU and GPU), or set train.optimizer=adamw"
            ) from exc
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _setup_lr_scheduler(optimizer, train_cfg: TrainConfig, total_steps: int):
    from orpo.schedules import build_lr_scheduler

    return build_lr_scheduler(
        optimizer, train_cfg.lr_scheduler, warmup_steps=train_cfg.warmup_steps, total_steps=total_steps
    )


@dataclass
class PairData:
    train: Any  # datasets.Dataset of tokenized pairs
    test: Any | None
    train_lengths: list[int]
    test_lengths: list[int]


_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                  "prompt_length", "chosen_length", "rejected_length", "length")


def _setup_data(dataset_dir: Path, tokenizer, train_cfg: TrainConfig, layout: str) -> PairData:
    """Load the prepared DatasetDict and tokenize both splits once, in memory (the source stays untouched).

    The lengths that batching sorts by are the pairs' row lengths in the batch layout used.
    """
    import datasets

    from orpo.collate import row_length, tokenize_pair

    if not dataset_dir.is_dir():
        raise ConfigError(f"dataset directory {dataset_dir} does not exist; prepare it first with `orpo data binarize`")
    try:
        splits = datasets.load_from_disk(str(dataset_dir))
    except FileNotFoundError as exc:
        raise ConfigError(f"{dataset_dir} is not a dataset saved with save_to_disk ({exc})") from exc
    if not isinstance(splits, datasets.DatasetDict) or "train" not in splits:
        raise ConfigError(f"{dataset_dir} must hold a DatasetDict with a 'train' split (and optionally 'test')")

    def tokenize(split):
        return split.map(
            lambda example: tokenize_pair(example, tokenizer, train_cfg.max_length, train_cfg.max_prompt_length),
            remove_columns=split.column_names,
            keep_in_memory=True,
            # A fixed fingerprint: hashing the tokenizer closure is slow and the result is never cached.
            new_fingerprint=f"orpo-tokenized-{train_cfg.max_length}-{train_cfg.max_prompt_length}",
            desc="tokenizing",
        )

    def lengths(split) -> list[int]:
        columns = split.select_columns(["prompt_length", "chosen_length", "rejected_length"]).to_dict()
        return [row_length(dict(zip(columns, values)), layout) for values in zip(*columns.values())]

    train = tokenize(splits["train"])
    test = tokenize(splits["test"]) if "test" in splits and len(splits["test"]) else None
    return PairData(
        train=train,
        test=test,
        train_lengths=lengths(train),
        test_lengths=lengths(test) if test is not None else [],
    )


# --------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step leaves for the log: this process's summed statistics (see `SUM_KEYS`)."""

    sums: Any  # float64 tensor on the device, not yet reduced across processes
    grad_norm: Any  # tensor; None under DeepSpeed


@dataclass
class _Window:
    """Statistics of the steps since the last log line."""

    started: float
    sums: Any = None  # float64 tensor over SUM_KEYS
    grad_norm: Any = None  # of the last step


class ORPORecipe:
    """ORPO fine-tuning: setup() -> train() -> export() -> cleanup()."""

    def __init__(self, config: PipelineConfig, dataset_dir: str | Path, output_dir: str | Path | None = None):
        train_cfg = config.train
        if train_cfg.lora.load_in_4bit and not train_cfg.lora.enabled:
            raise ConfigError("train.lora.load_in_4bit needs train.lora.enabled=true (QLoRA trains an adapter)")
        self.config = config
        self.dataset_dir = Path(dataset_dir)
        self._requested_output_dir = Path(output_dir) if output_dir else None
        self.global_step = 0
        self.last_train_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}

    # ---- setup --------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build everything in dependency order."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, broadcast_object_list, set_seed

        from orpo.collate import make_collator
        from orpo.logprobs import shared_prompt_unsupported
        from orpo.loss import ORPOLoss
        from orpo.selfcheck import SelfCheckSettings, run_self_check

        cfg = self.config.train
        # First the accelerator: it owns the process group, the device and mixed precision.
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=None,
            cpu=_is_multi_process_cpu(),
        )
        acc = self.accelerator
        # Every process must agree on the output directory (the default contains the time).
        chosen = [str(self._requested_output_dir or default_output_dir(self.config))]
        broadcast_object_list(chosen)
        self.output_dir = Path(chosen[0])
        self.checkpoint_root = self.output_dir / CHECKPOINTS_DIR
        if acc.is_main_process:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            _remove_partial_checkpoints(self.checkpoint_root)

        # Seed before the model: LoRA's initial weights come from the global RNG.
        set_seed(cfg.seed)
        # The main process first: it converts built-in models / downloads once; the others reuse its files.
        with acc.main_process_first():
            loaded = _setup_model(
                self.config.model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing,
                device_type=acc.device.type, device_index=acc.local_process_index,
            )
        self.tokenizer, self.base_model_path, self.is_lora = loaded.tokenizer, loaded.base_model_path, loaded.is_lora
        model = loaded.model
        if acc.is_main_process:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            log.info("%s: %d of %d parameters trainable (%.2f%%)", "LoRA" if self.is_lora else "full fine-tuning",
                     trainable, total, 100 * trainable / max(total, 1))

        self.batch_layout = cfg.batch_layout
        if self.batch_layout == "shared_prompt":
            reason = shared_prompt_unsupported(model, cfg.max_length)
            if reason is not None:
                log.warning("batch layout 'shared_prompt' is not possible (%s); using 'stacked'", reason)
                self.batch_layout = "stacked"

        optimizer = _setup_optimizer(model, cfg)
        # Every process tokenizes the whole dataset (in memory, nothing cached to share), so each knows
        # every step's pairs and normalisers.
        self.data = _setup_data(self.dataset_dir, self.tokenizer, cfg, self.batch_layout)
        self.plan = BatchPlan(
            self.data.train_lengths,
            per_device_batch_size=cfg.per_device_batch_size,
            num_processes=acc.num_processes,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            seed=cfg.seed,
            group_by_length=cfg.group_by_length,
        )
        if self.plan.steps_per_epoch == 0:
            raise ConfigError(
                f"the train split of {self.dataset_dir} has {len(self.data.train_lengths)} pairs, fewer than one "
                f"global batch ({self.plan.global_batch_size} = train.per_device_batch_size x processes x "
                "train.gradient_accumulation_steps); lower those or add data"
            )
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.plan.steps_per_epoch))
        scheduler = _setup_lr_scheduler(optimizer, cfg, self.total_steps)

        if acc.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed wants the micro-batch size, which it would otherwise read from a prepared DataLoader.
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # The scheduler is not prepared: accelerate would step it once per process. We step it once per
        # optimizer step ourselves, and checkpoint it as a registered object.
        self.scheduler = scheduler
        acc.register_for_checkpointing(self.scheduler)
        if self.is_lora and acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            _checkpoint_trainable_weights_only(acc)

        # The layout and log-prob path, proven on the first batch as training runs the model (orpo.selfcheck);
        # a fallback after this point keeps the length grouping of the layout chosen above (only padding differs).
        self.chunked_logps = True
        if cfg.setup_self_check:
            first = self.data.train[self.plan.micro_batches(0, acc.process_index)[0]]
            settings = SelfCheckSettings.from_train_config(cfg, self.tokenizer.pad_token_id, layout=self.batch_layout)
            check = run_self_check(self.model, [dict(zip(first, row)) for row in zip(*first.values())], settings)
            self.batch_layout, self.chunked_logps = check.layout, check.chunked_logps
        self.collator = make_collator(self.batch_layout, self.tokenizer.pad_token_id, cfg.pad_to_multiple_of)
        self.loss_fn = ORPOLoss(cfg.orpo_lambda)
        # All parameters (frozen ones have no gradient and are skipped): under FSDP accelerate recognises the
        # model's own parameter list and clips with the sharded norm.
        self.clip_params = list(self.model.parameters())
        self.sum_dtype = torch.float32 if acc.device.type == "mps" else torch.float64
        self.sink = _MetricsSink.open(
            self.output_dir / METRICS_JSONL, acc.is_main_process, self.config.resolved_tracking_uri()
        )
        self._resume()

    def _resume(self) -> None:
        latest = latest_checkpoint(self.checkpoint_root)
        if latest is None:
            if self.accelerator.is_main_process:
                (self.output_dir / METRICS_JSONL).unlink(missing_ok=True)  # a fresh run starts a fresh log
            return
        state = json.loads((latest / TRAINER_STATE).read_text(encoding="utf-8"))
        if state.get("config_hash") != self.config.config_hash():
            log.warning("%s was written with a different config (hash %s, now %s); resuming anyway",
                        latest, state.get("config_hash"), self.config.config_hash())
        self.accelerator.load_state(str(latest))
        self.global_step = int(state["global_step"])
        self.last_train_metrics = state.get("last_train_metrics", {})
        self.last_eval_metrics = state.get("last_eval_metrics", {})
        self.sink.truncate_after(self.global_step)
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d of %d", latest, self.global_step, self.total_steps)

    # ---- the loop -----------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until total_steps; log, evaluate and checkpoint on their schedules."""
        from tqdm.auto import tqdm

        cfg, acc = self.config.train, self.accelerator
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="orpo", unit="step",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        self.model.train()
        window = _Window(started=time.perf_counter())
        while self.global_step < self.total_steps:
            step = self.train_step()
            window.sums = step.sums if window.sums is None else window.sums + step.sums
            window.grad_norm = step.grad_norm
            progress.update(1)

            last = self.global_step == self.total_steps
            if self.global_step % cfg.logging_steps == 0 or last:
                record = self._log_train(window)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
                window = _Window(started=time.perf_counter())
            if self.data.test is not None and (
                (cfg.eval_steps and self.global_step % cfg.eval_steps == 0) or last
            ):
                self.last_eval_metrics = self.evaluate()
                self.sink.write({"step": self.global_step, "epoch": self._epoch(), **self.last_eval_metrics})
                window.started = time.perf_counter()  # evaluation time is not training throughput
            if cfg.save_steps and self.global_step % cfg.save_steps == 0:
                self.save_checkpoint()
                window.started = time.perf_counter()
        progress.close()

    def train_step(self) -> StepStats:
        """One optimizer step: this process's micro-batches of step `global_step`, clip, update, schedule."""
        from orpo.logprobs import model_sequence_logps

        cfg, acc = self.config.train, self.accelerator
        world, accumulation = acc.num_processes, cfg.gradient_accumulation_steps
        step_pairs = self.plan.step_pairs(self.global_step)
        rows = self.data.train[step_pairs]  # columns of this step's pairs, all processes'
        features = [{k: rows[k][i] for k in _TOKEN_COLUMNS} for i in range(len(step_pairs))]
        # Normalisers of the whole step, known to every process without communication.
        nll_total = float(sum(nll_token_count(f, cfg.nll_on_prompt) for f in features))
        pair_total = float(len(features))
        position = {index: i for i, index in enumerate(step_pairs)}

        sums = None
        for micro in self.plan.micro_batches(self.global_step, acc.process_index):
            batch = self.collator([features[position[i]] for i in micro])
            num_pairs, counts = _pop_counts(batch)
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            # Inside accumulate(), DDP skips the gradient all-reduce until the step's last micro-batch.
            with acc.accumulate(self.model):
                seq = model_sequence_logps(self.model, batch, nll_on_prompt=cfg.nll_on_prompt,
                                           chunk_size=cfg.logprob_chunk_size, chunked=self.chunked_logps)
                out = self.loss_fn(seq, num_pairs, nll_normalizer=nll_total, pair_normalizer=pair_total)
                # out.loss is this micro-batch's share of the step's loss. DDP averages gradients over
                # processes and accelerator.backward divides by the accumulation steps: undo both, so
                # the summed gradients are exactly those of the step's loss.
                acc.backward(out.loss * (world * accumulation))
            micro_sums = batch_sums(out, counts, batch["input_ids"].numel())
            sums = micro_sums if sums is None else sums + micro_sums
            del seq, out, batch  # before the next forward, not after it

        grad_norm = acc.clip_grad_norm_(self.clip_params, cfg.max_grad_norm or math.inf)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # an fp16 overflow skips the update, and the schedule waits
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        release_free_memory()  # the step's freed heap back to the system (orpo.memory)
        self.global_step += 1
        return StepStats(sums=sums, grad_norm=grad_norm)

    def _epoch(self) -> float:
        return self.global_step / self.plan.steps_per_epoch

    def _log_train(self, window: _Window) -> dict[str, float]:
        import torch

        acc = self.accelerator
        sums = acc.reduce(window.sums.to(self.sum_dtype), reduction="sum")  # the one sync point per log
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        named = dict(zip(SUM_KEYS, sums.tolist()))
        memory = acc.gather(torch.tensor([peak_memory_mb(acc.device)], device=acc.device)).max().item()
        record = {
            "step": self.global_step,
            "epoch": self._epoch(),
            **metrics_from_sums(named, self.config.train.orpo_lambda),
            "grad_norm": float(window.grad_norm) if window.grad_norm is not None else float("nan"),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_second": named["real_tokens"] / elapsed,
            "peak_memory_mb": memory,
        }
        if window.grad_norm is None:
            del record["grad_norm"]
        self.last_train_metrics = {k: v for k, v in record.items() if k != "step"}
        self.sink.write(record)
        return record

    def evaluate(self) -> dict[str, float]:
        """ORPO metrics over the whole test split, prefixed `eval_`."""
        import torch

        from orpo.logprobs import model_sequence_logps

        cfg, acc = self.config.train, self.accelerator
        batches = eval_batches(self.data.test_lengths, cfg.per_device_batch_size, acc.num_processes,
                               acc.process_index)
        total = torch.zeros(len(SUM_KEYS), dtype=self.sum_dtype, device=acc.device)
        self.model.eval()
        with torch.no_grad():
            for indices in batches:
                # A process out of pairs still runs one forward (see eval_batches) and ignores it.
                real = bool(indices)
                rows = self.data.test[indices if real else [0]]
                features = [{k: rows[k][i] for k in _TOKEN_COLUMNS} for i in range(len(rows["length"]))]
                batch = self.collator(features)
                num_pairs, counts = _pop_counts(batch)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                seq = model_sequence_logps(self.model, batch, nll_on_prompt=cfg.nll_on_prompt,
                                           chunk_size=cfg.logprob_chunk_size, chunked=self.chunked_logps)
                out = self.loss_fn(seq, num_pairs)
                if real:
                    total += batch_sums(out, counts, batch["input_ids"].numel()).to(self.sum_dtype)
        self.model.train()
        sums = dict(zip(SUM_KEYS, acc.reduce(total, reduction="sum").tolist()))
        metrics = metrics_from_sums(sums, cfg.orpo_lambda)
        return {f"eval_{name}": value for name, value in metrics.items()}

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """accelerator.save_state into a temporary directory, renamed to step-N when complete."""
        acc = self.accelerator
        final = self.checkpoint_root / f"step-{self.global_step}"
        partial = self.checkpoint_root / f".step-{self.global_step}.partial"
        if acc.is_main_process and partial.exists():
            shutil.rmtree(partial)
        acc.wait_for_everyone()
        acc.save_state(str(partial))  # every process: RNG states per process, shards under FSDP/ZeRO
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": self.global_step,
                "config_hash": self.config.config_hash(),
                "timestamp": _utc_now(),
                "last_train_metrics": self.last_train_metrics,
                "last_eval_metrics": self.last_eval_metrics,
            }
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            if final.exists():  # from an earlier attempt that got past this step
                shutil.rmtree(final)
            os.replace(partial, final)
            for old in list_checkpoints(self.checkpoint_root)[: -self.config.train.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    # ---- export -------------------------------------------------------------------------------------

    def export(self) -> TrainResult:
        """Write the model directory (export_complete.json last), then output_dir/train_result.json."""
        acc = self.accelerator
        model_dir = self.output_dir / "model"
        lora_cfg = self.config.train.lora
        merged_dir = self.output_dir / "merged" if self.is_lora and lora_cfg.merge_on_export else None
        final_metrics = {**self.last_train_metrics, **self.last_eval_metrics}
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # a collective under FSDP / ZeRO-3: every process calls it
        if acc.is_main_process:
            for directory in (model_dir, merged_dir):
                if directory is not None and directory.exists():
                    shutil.rmtree(directory)  # never leave old files next to a new export
            model = acc.unwrap_model(self.model)
            model.config.use_cache = True
            if self.is_lora:
                model.peft_config[model.active_adapter].base_model_name_or_path = self.base_model_path
                model.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
                model.get_base_model().generation_config.save_pretrained(model_dir)
            else:
                model.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(model_dir)
            if merged_dir is not None:
                self._export_merged(model, model_dir, merged_dir)
            dump_config(self.config, model_dir / "orpo_config.yaml")
            (model_dir / "metrics.json").write_text(json.dumps(final_metrics, indent=2), encoding="utf-8")
            # Last: the registry accepts a model directory only once this file exists.
            (model_dir / EXPORT_COMPLETE).write_text(
                json.dumps({"global_step": self.global_step, "timestamp": _utc_now()}), encoding="utf-8"
            )
        result = TrainResult(
            output_dir=self.output_dir,
            model_dir=model_dir,
            merged_dir=merged_dir,
            metrics_path=self.output_dir / METRICS_JSONL,
            final_metrics=final_metrics,
            base_model=self.config.model.name_or_path,
            base_model_path=self.base_model_path,
            is_lora=self.is_lora,
            global_step=self.global_step,
            dataset_dir=self.dataset_dir,
            mlflow_run_id=self.sink.mlflow_run_id,
        )
        if acc.is_main_process:
            (self.output_dir / TRAIN_RESULT).write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
            log.info("exported %s", model_dir)
        acc.wait_for_everyone()
        return result

    def _export_merged(self, model, model_dir: Path, merged_dir: Path) -> None:
        from accelerate.utils import DistributedType

        from orpo.models import load_model_and_tokenizer

        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if sharded or self.config.train.lora.load_in_4bit:
            # Merge into full-precision base weights, reloaded from the exported adapter (4-bit weights
            # would round the merge, and sharded ones are not whole here).
            model, _ = load_model_and_tokenizer(self.config.model, path=str(model_dir))
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(merged_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(merged_dir)
        dump_config(self.config, merged_dir / "orpo_config.yaml")
        (merged_dir / EXPORT_COMPLETE).write_text(
            json.dumps({"global_step": self.global_step, "timestamp": _utc_now(), "merged_from": str(model_dir)}),
            encoding="utf-8",
        )

    def cleanup(self) -> None:
        self.sink.close()
        self.accelerator.free_memory()


# --------------------------------------------------------------------------------------------------------
# Checkpoint helpers
# --------------------------------------------------------------------------------------------------------


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (step-N holding trainer_state.json), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def _remove_partial_checkpoints(root: Path) -> None:
    for path in root.glob(".step-*.partial"):
        log.info("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _checkpoint_trainable_weights_only(accelerator: Accelerator) -> None:
    """LoRA checkpoints keep only the trainable weights: megabytes instead of the whole frozen base.

    The frozen weights are whatever the base model loads as, so leaving them out loses nothing. Loading
    checks that the file holds exactly the trainable weights and nothing else.
    """
    from safetensors.torch import load_file

    def trainable(model) -> dict[str, torch.Tensor]:
        # Names of the unwrapped model (no DDP "module." prefix), so a checkpoint does not depend on the wrapper.
        inner = accelerator.unwrap_model(model)
        return {name: param.detach() for name, param in inner.named_parameters() if param.requires_grad}

    def save_hook(models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            state.clear()
            state.update(trainable(model))

    def load_hook(models, input_dir) -> None:
        for index, model in enumerate(list(models)):
            path = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            expected = trainable(model)
            state = load_file(str(path), device=str(next(iter(expected.values())).device))
            if set(state) != set(expected):
                missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
                raise RuntimeError(
                    f"{path} does not hold this model's trainable weights (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}); was it written with another LoRA config? Use a new output directory."
                )
            accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            models.remove(model)  # loaded here; accelerate must not load it again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _is_multi_process_cpu() -> bool:
    """Launched as several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without GPUs.

    accelerate picks DDP over gloo only when told to run on CPU; otherwise it would treat each process as
    a lone single-device run.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.accelerator.is_available()


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------


def train(config: PipelineConfig, dataset_dir: str | Path, output_dir: str | Path | None = None) -> TrainResult:
    """Train with ORPO on `dataset_dir` (a saved DatasetDict); resume if `output_dir` holds a checkpoint."""
    recipe = ORPORecipe(config, dataset_dir, output_dir)
    recipe.setup()
    try:
        recipe.train()
        return recipe.export()
    finally:
        recipe.cleanup()


def main(argv: list[str] | None = None) -> None:
    """`python -m orpo.train` / `accelerate launch -m orpo.train`: parse arguments, train, print the model dir."""
    parser = argparse.ArgumentParser(
        prog="python -m orpo.train",
        description="ORPO training (also under `accelerate launch -m orpo.train`). Re-running with the same "
        "output directory resumes from its latest checkpoint.",
    )
    parser.add_argument("--config", help="pipeline YAML config (default: built-in defaults)")
    parser.add_argument("--dataset-dir", required=True, help="a prepared dataset (DatasetDict saved to disk)")
    parser.add_argument("--output-dir", help="default: train.output_dir, else <workdir>/train/<run name>")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 train.lora.r=8")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, args.overrides)
        result = train(config, args.dataset_dir, args.output_dir)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    if rank == 0:
        print(f"model: {result.model_dir}")


if __name__ == "__main__":
    main()
