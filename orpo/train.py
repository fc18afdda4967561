"""ORPO training on `accelerate`: one loop for a laptop CPU, one GPU, or many (DDP, FSDP, DeepSpeed ZeRO-3).

Run it:

    python -m orpo.train --config configs/demo.yaml --dataset-dir runs/data/<key> [train.max_steps=100 ...]
    accelerate launch --multi_gpu --num_processes 2 -m orpo.train --config ... --dataset-dir ...  # no GPU: DDP on CPU, gloo
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m orpo.train --config ... --dataset-dir ...

(`orpo train` calls `train()` in-process; configs/accelerate/*.yaml document one command per setup.)

Life cycle, in `ORPORecipe`: the constructor checks the dataset; `setup()` builds the accelerator, then the
model, optimizer, data and schedule (each from its own config slice: `orpo.model_setup`, `orpo.pair_data`,
`orpo.batching`), prepares them, and resumes from the newest intact checkpoint of the output directory; `train()` runs the loop; `export()` writes the Hugging Face model directory and returns a
`TrainResult`.

What one optimizer step is. The step's pairs are a slice of the epoch's order, a pure function of
(seed, epoch) (length-grouped when `group_by_length`), so resuming at step s only needs s. The
`per_device_batch_size * num_processes * gradient_accumulation_steps` pairs of a step are split into
micro-batches, and every micro-batch's loss is normalised by the totals of the whole step (NLL tokens and
pairs over all micro-batches and processes), so its gradient is the gradient of one big batch, whatever the
number of processes and accumulation steps. Every process holds the tokenized data, so it knows these
totals without communication.

Checkpoints (`accelerator.save_state`: model or LoRA weights, optimizer, schedule, RNG) go to
`output_dir/checkpoints/step-N`, written under a temporary name and renamed when complete
(`orpo.checkpoints`). Re-running with the same output directory resumes from the newest one that verifies
(a corrupt one is set aside) and ends with the same weights as an uninterrupted run. A checkpoint written for
other data, model, global batch or training settings is refused (only the number of steps and the logging,
evaluation and checkpoint cadence may change on a resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orpo.batching import BatchPlan, eval_batches, nll_token_count
from orpo.checkpoints import (
    CHECKPOINTS_DIR,
    TRAINER_STATE,
    checkpoint_trainable_weights_only,
    remove_partial_checkpoints,
    resumable_checkpoint,
    save_checkpoint,
)
from orpo.config import ConfigError, PipelineConfig, dump_config, load_config
from orpo.errors import OrpoError, debug_enabled
from orpo.handoffs import (  # noqa: F401
    EXPORT_MARKER,
    METRICS_JSONL,
    TRAIN_RESULT,
    TrainResult,
    write_train_result,
)
from orpo.memory import allocator_in_use, release_free_memory
from orpo.pair_data import check_dataset, features, load_pair_data
from orpo.run_identity import NON_MODEL_TRAIN_FIELDS
from orpo.train_metrics import (
    SUM_KEYS,
    MetricsSink,
    batch_sums,
    metrics_from_sums,
    peak_memory_mb,
    pop_counts,
)

log = logging.getLogger(__name__)

# The files other stages read are named and typed in one place (orpo.handoffs); re-exported for callers.
EXPORT_COMPLETE = EXPORT_MARKER  # written last into an exported model directory


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


def set_deepspeed_clipping(deepspeed_config: dict[str, Any], max_grad_norm: float | None) -> Any:
    """Make DeepSpeed clip at `train.max_grad_norm` (None: 0.0, which DeepSpeed reads as no clipping).

    Under DeepSpeed the engine clips inside its own step at `gradient_clipping`; accelerate's clip_grad_norm_
    only reads the norm back. Returns the number the config file had when it differed (to log), else None.
    """
    wanted = float(max_grad_norm or 0.0)
    before = deepspeed_config.get("gradient_clipping")
    deepspeed_config["gradient_clipping"] = wanted
    # "auto" would be filled by accelerate (with 1.0): ours is the value meant, nothing to report.
    if before is None or before == "auto" or float(before) == wanted:
        return None
    return before


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
        # Foreseeable input errors stop here, before anything is built or written.
        splits = check_dataset(self.dataset_dir)
        # datasets' content fingerprints (state.json), the same wherever the directory is copied to.
        self.dataset_fingerprint = {name: split._fingerprint for name, split in sorted(splits.items())}
        if config.model.chat_template:
            from orpo.chat_template import load_named_or_file

            load_named_or_file(config.model.chat_template)
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
        from orpo.model_setup import setup_lr_scheduler, setup_model, setup_optimizer
        from orpo.selfcheck import SelfCheckSettings, run_self_check
        from orpo.shared_attention import use_shared_prompt_attention

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
        self.checkpoint_root = self.output_dir / CHECKPOINTS_DIR  # created by the first save
        if acc.is_main_process:
            remove_partial_checkpoints(self.checkpoint_root)

        # Seed before the model: LoRA's initial weights come from the global RNG.
        set_seed(cfg.seed)
        # FSDP (which upcasts under mixed precision) and DeepSpeed (bf16/fp16 optimizer) hold fp32 masters.
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        # The main process first: it converts built-in models / downloads once; the others reuse its files.
        with acc.main_process_first():
            loaded = setup_model(
                self.config.model, cfg, device_type=acc.device.type, device_index=acc.local_process_index,
                sharding_keeps_fp32_masters=sharded and cfg.mixed_precision != "no",
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
            elif use_shared_prompt_attention(model):
                log.info("shared-prompt rows: attention runs as two causal SDPA calls per row, without the 4D mask")

        optimizer = setup_optimizer(model, cfg)
        # Every process tokenizes the whole dataset (in memory, nothing cached to share), so each knows
        # every step's pairs and normalisers.
        self.data = load_pair_data(self.dataset_dir, self.tokenizer, cfg, self.batch_layout)
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
        scheduler = setup_lr_scheduler(optimizer, cfg, self.total_steps)

        if acc.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed wants the micro-batch size, which it would otherwise read from a prepared DataLoader.
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
            replaced = set_deepspeed_clipping(ds_config, cfg.max_grad_norm)
            if replaced is not None and acc.is_main_process:
                log.warning("the DeepSpeed config's gradient_clipping %s is replaced by train.max_grad_norm (%s)",
                            replaced, ds_config["gradient_clipping"])
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # The scheduler is not prepared: accelerate would step it once per process. We step it once per
        # optimizer step ourselves, and checkpoint it as a registered object.
        self.scheduler = scheduler
        acc.register_for_checkpointing(self.scheduler)
        if self.is_lora and not sharded:
            checkpoint_trainable_weights_only(acc)

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
        self.sink = MetricsSink.open(
            self.output_dir / METRICS_JSONL, acc.is_main_process, self.config.resolved_tracking_uri()
        )
        self._resume()
        log.debug("memory allocator: %s", allocator_in_use())
        release_free_memory()  # what loading and the self-check freed, before the first step

    def _resume(self) -> None:
        """Load the newest intact checkpoint (the main process verifies and sets corrupt ones aside)."""
        from accelerate.utils import broadcast_object_list

        from orpo.checkpoints import CheckpointError

        decision = [None, None]  # (checkpoint path, error message)
        if self.accelerator.is_main_process:
            try:
                found = resumable_checkpoint(self.checkpoint_root)
                decision[0] = str(found) if found else None
            except CheckpointError as exc:
                decision[1] = str(exc)
        broadcast_object_list(decision)
        if decision[1]:
            raise CheckpointError(decision[1])
        if decision[0] is None:
            if self.accelerator.is_main_process:
                (self.output_dir / METRICS_JSONL).unlink(missing_ok=True)  # a fresh run starts a fresh log
            return
        latest = Path(decision[0])
        state = json.loads((latest / TRAINER_STATE).read_text(encoding="utf-8"))
        written_for = state.get("resume_inputs")
        differing = _differences(written_for, self._resume_inputs()) if written_for is not None else []
        if differing:
            raise CheckpointError(
                f"{latest} belongs to a run with other inputs ({'; '.join(differing[:5])}): resuming it would go "
                "on from that run's weights, optimizer and schedule as if they were this run's. Pass a new "
                f"--output-dir (or train.output_dir / run_name), or delete {self.output_dir} to start over"
            )
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
        pairs = features(self.data.train[step_pairs])  # this step's pairs, all processes'
        # Normalisers of the whole step, known to every process without communication.
        nll_total = float(sum(nll_token_count(f, cfg.nll_on_prompt) for f in pairs))
        pair_total = float(len(pairs))
        position = {index: i for i, index in enumerate(step_pairs)}

        sums = None
        for micro in self.plan.micro_batches(self.global_step, acc.process_index):
            batch = self.collator([pairs[position[i]] for i in micro])
            num_pairs, counts = pop_counts(batch)
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
                batch = self.collator(features(self.data.test[indices if real else [0]]))
                num_pairs, counts = pop_counts(batch)
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

    def _resume_inputs(self) -> dict[str, Any]:
        """What a checkpoint must have been trained on to be resumed: the data, the model, the global batch and
        every training setting except how long to train and where and how often to log, evaluate and save."""
        return {
            "dataset": self.dataset_fingerprint,
            "model": self.config.model.model_dump(mode="json", exclude={"cache_dir"}),
            "train": self.config.train.model_dump(mode="json", exclude=_RESUMABLE_CHANGES),
            "global_batch_size": self.plan.global_batch_size,
        }

    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.global_step,
            "resume_inputs": self._resume_inputs(),
            "config_hash": self.config.config_hash(),
            "timestamp": _utc_now(),
            "last_train_metrics": self.last_train_metrics,
            "last_eval_metrics": self.last_eval_metrics,
        }
        return save_checkpoint(self.accelerator, self.checkpoint_root, self.global_step, state,
                               keep=self.config.train.save_total_limit)

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
            write_train_result(result)
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


# Training settings a resumed run may change: those that never change the weights (the run identity's list), and
# how many steps to train.
_RESUMABLE_CHANGES = NON_MODEL_TRAIN_FIELDS | {"max_steps", "num_epochs"}


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    """`key: before -> now` for each leaf that differs between two JSON-like values."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [line for key in sorted(set(before) | set(now), key=str)
                for line in _differences(before.get(key), now.get(key), f"{prefix}{key}.")]
    return [] if before == now else [f"{prefix.rstrip('.')}: {before} -> {now}"]


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
    except OrpoError as exc:  # anticipated: one message, no traceback (ORPO_DEBUG=1 shows it)
        if debug_enabled():
            raise
        sys.exit(f"error: {exc}")
    if rank == 0:
        print(f"model: {result.model_dir}")


if __name__ == "__main__":
    main()
