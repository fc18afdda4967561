"""The DPO phase of the SFT+DPO baseline, with TRL's DPOTrainer.

It starts from the SFT arm's export and keeps a frozen copy of that SFT model in memory as DPO's reference
(the paper's two-phase baseline: two models resident, two forward passes per pair). With LoRA the policy
continues the SFT adapter and the reference is the SFT adapter merged into its base; with full fine-tuning
both are full copies. Every other setting (steps, batch, learning rate and schedule, lengths, seed) comes
from the same `train` section as the other arms, so only the objective and the trainer differ.

The export has the layout `orpo.train` writes (model/ with export_complete.json last, then
train_result.json and metrics.jsonl), so `orpo.registry.register_training_run` registers it unchanged.
Metrics keep TRL's names (`rewards/chosen`, `logps/chosen`, ...).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from orpo.ablation.arms import require_trl
from orpo.ablation.timeline import TIMELINE_JSONL, Timeline, make_timeline, read_jsonl, read_resources
from orpo.config import PipelineConfig, dump_config

log = logging.getLogger(__name__)


def to_trl_example(example: dict[str, Any]) -> dict[str, Any]:
    """A prepared pair in TRL's conversational preference layout: prompt messages, one assistant reply each."""
    from orpo.collate import split_conversation

    prompt, chosen, rejected = split_conversation(example)
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}


def _load_policy_and_reference(config: PipelineConfig, sft_model_dir: Path, device: str):
    """The SFT model twice: once trainable (the policy), once frozen (the reference)."""
    from peft import PeftModel

    from orpo.models import load_model_and_tokenizer

    policy, tokenizer = load_model_and_tokenizer(config.model, device_type=device, path=str(sft_model_dir))
    if isinstance(policy, PeftModel):
        # Continue the SFT adapter: the DPO phase trains the same LoRA weights the SFT phase trained.
        for name, param in policy.named_parameters():
            param.requires_grad = "lora_" in name
        policy.peft_config[policy.active_adapter].inference_mode = False
    reference, _ = load_model_and_tokenizer(config.model, device_type=device, path=str(sft_model_dir))
    if isinstance(reference, PeftModel):
        reference = reference.merge_and_unload()
    reference.eval()
    for param in reference.parameters():
        param.requires_grad = False
    policy.config.use_cache = False
    return policy.to(device), reference.to(device), tokenizer


def _dpo_args(config: PipelineConfig, output_dir: Path, steps: int, device: str):
    from trl import DPOConfig

    train, study = config.train, config.ablation
    return DPOConfig(
        output_dir=str(output_dir / "trl"),
        max_steps=steps,
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=study.dpo_learning_rate or train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_epsilon,
        max_grad_norm=train.max_grad_norm or 0.0,
        beta=study.dpo_beta,
        max_length=train.max_length,
        seed=train.seed,
        logging_steps=train.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=train.mixed_precision == "bf16",
        fp16=train.mixed_precision == "fp16",
        gradient_checkpointing=train.gradient_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _callback(timeline: Timeline, tokenizer, metrics_path: Path, eval_steps: int, total_steps: int):
    from transformers import TrainerCallback

    class AblationCallback(TrainerCallback):
        """TRL's logs to metrics.jsonl (its metric names), and a held-out probe every eval_steps."""

        def on_train_begin(self, args, state, control, **kwargs):
            timeline.start()

        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            with metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **numbers}) + "\n")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % eval_steps == 0 or step == total_steps:
                timeline.probe(model, tokenizer, step)

    return AblationCallback()


def train_dpo(config: PipelineConfig, dataset_dir: str | Path, sft_dir: str | Path, output_dir: str | Path):
    """DPO from the SFT export in `sft_dir`; writes the export, metrics.jsonl and timeline.jsonl to `output_dir`.

    Returns (TrainResult, seconds of training in the DPO phase, CPU seconds of this process in it).
    """
    require_trl()
    import torch
    from datasets import load_from_disk
    from trl import DPOTrainer

    from orpo.registry import EXPORT_MARKER, TRAIN_RESULT
    from orpo.train import METRICS_JSONL, TrainResult

    sft_dir, output_dir = Path(sft_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sft = TrainResult.from_json(json.loads((sft_dir / TRAIN_RESULT).read_text(encoding="utf-8")))
    sft_seconds = float(read_resources(sft_dir).get("train_seconds", 0.0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = config.ablation.dpo_max_steps or config.train.max_steps or sft.global_step

    # The combined curve starts with the SFT phase's probes; the DPO phase's clock continues from them.
    timeline_path = output_dir / TIMELINE_JSONL
    sft_records = [{**r, "phase": "sft"} for r in read_jsonl(sft_dir / TIMELINE_JSONL)]
    timeline_path.write_text("".join(json.dumps(r) + "\n" for r in sft_records), encoding="utf-8")
    timeline = make_timeline(config, dataset_dir, output_dir, phase="dpo", offset_seconds=sft_seconds)
    metrics_path = output_dir / METRICS_JSONL
    metrics_path.unlink(missing_ok=True)

    torch.manual_seed(config.train.seed)
    policy, reference, tokenizer = _load_policy_and_reference(config, sft.model_dir, device)
    train_split = load_from_disk(str(dataset_dir))["train"]
    train_split = train_split.map(to_trl_example, remove_columns=train_split.column_names)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=_dpo_args(config, output_dir, steps, device),
        train_dataset=train_split, processing_class=tokenizer,
        callbacks=[_callback(timeline, tokenizer, metrics_path, config.train.eval_steps or steps, steps)],
    )
    began = time.perf_counter()
    trainer.train()
    log.info("DPO phase: %d steps in %.0f s", trainer.state.global_step, time.perf_counter() - began)
    dpo_seconds, dpo_cpu_seconds = timeline.train_seconds(), timeline.train_cpu_seconds()

    model = trainer.model
    model_dir = output_dir / "model"
    model.config.use_cache = True
    model.save_pretrained(model_dir, safe_serialization=True)
    if sft.is_lora:
        model.get_base_model().generation_config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dump_config(config, model_dir / "orpo_config.yaml")
    final_metrics = {k: v for k, v in (read_jsonl(metrics_path) or [{}])[-1].items() if k != "step"}
    probe = timeline.records[-1] if timeline.records else {}
    final_metrics.update({f"heldout/{k}": v for k, v in probe.items() if k in ("accuracy", "margin")})
    (model_dir / "metrics.json").write_text(json.dumps(final_metrics, indent=2), encoding="utf-8")
    (model_dir / EXPORT_MARKER).write_text(json.dumps({"global_step": trainer.state.global_step}), encoding="utf-8")
    result = TrainResult(
        output_dir=output_dir, model_dir=model_dir, merged_dir=None, metrics_path=metrics_path,
        final_metrics=final_metrics, base_model=config.model.name_or_path, base_model_path=sft.base_model_path,
        is_lora=sft.is_lora, global_step=trainer.state.global_step, dataset_dir=Path(dataset_dir),
    )
    (output_dir / TRAIN_RESULT).write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    return result, dpo_seconds, dpo_cpu_seconds
