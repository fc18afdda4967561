"""Building what trains: the model (full, LoRA, or QLoRA on 4-bit weights) in the precision the config
allows, the optimizer over its trainable weights, and the learning-rate schedule.

Precision. Trainable weights and AdamW's moments are always float32; bf16/fp16 is for compute, through
the Accelerator's autocast (`train.mixed_precision`). A bf16 weight cannot take a small update: at lr 5e-6
an AdamW step is below half a bf16 ulp for any weight above ~1.3e-3, so most weights would never change.
So full fine-tuning loads float32 weights, unless a sharding backend keeps float32 master copies itself
(FSDP upcasts low-precision parameters under mixed precision; DeepSpeed's bf16/fp16 optimizer keeps fp32
masters) or `train.allow_low_precision_master_weights` says to accept the loss. LoRA may keep its frozen
base in bf16; its adapters are float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orpo.config import ConfigError, LoraConfig, ModelConfig, TrainConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a peft.PeftModel around one
    tokenizer: Any
    base_model_path: str  # what an exported adapter applies to
    is_lora: bool


def master_weights_dtype_name(model_cfg: ModelConfig, train_cfg: TrainConfig, *, device_type: str,
                              sharding_keeps_fp32_masters: bool) -> str:
    """The `model.dtype` to load full fine-tuning weights in: float32 unless low-precision weights are safe.

    `sharding_keeps_fp32_masters`: FSDP or DeepSpeed with train.mixed_precision set (they hold fp32 copies).
    `auto` becomes float32; an explicit bfloat16/float16 is refused unless
    `train.allow_low_precision_master_weights` is true.
    """
    import torch

    from orpo.models import torch_dtype

    loaded = torch_dtype(model_cfg.dtype, device_type)
    if loaded == torch.float32 or sharding_keeps_fp32_masters:
        return model_cfg.dtype
    if train_cfg.allow_low_precision_master_weights:
        log.warning("full fine-tuning updates %s weights directly (train.allow_low_precision_master_weights): "
                    "updates smaller than half a %s ulp are lost", loaded, loaded)
        return model_cfg.dtype
    if model_cfg.dtype == "auto":
        log.info("full fine-tuning: loading float32 weights (optimizer state float32; train.mixed_precision "
                 "sets the compute dtype)")
        return "float32"
    raise ConfigError(
        f"model.dtype={model_cfg.dtype} with full fine-tuning (train.lora.enabled=false) would train {loaded} "
        f"weights with no float32 master copy: at train.learning_rate={train_cfg.learning_rate:g} most updates "
        "round away. Set model.dtype=float32 (or auto) and train.mixed_precision=bf16 to compute in bf16 with "
        "float32 weights; or launch with FSDP/DeepSpeed (configs/accelerate/fsdp_full_shard.yaml, "
        "deepspeed_zero3.yaml) and train.mixed_precision=bf16, which keep float32 masters; or set "
        "train.allow_low_precision_master_weights=true to accept it"
    )


def setup_model(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, device_type: str, device_index: int,
    sharding_keeps_fp32_masters: bool,
) -> LoadedModel:
    """Load the model, then wrap it in a LoRA adapter (or leave every weight trainable, in float32)."""
    from orpo.models import load_model_and_tokenizer, load_tokenizer, resolve_model

    lora_cfg, gradient_checkpointing = train_cfg.lora, train_cfg.gradient_checkpointing
    resolved = resolve_model(model_cfg.name_or_path, model_cfg.cache_dir, model_cfg.revision)
    if lora_cfg.enabled and lora_cfg.load_in_4bit:
        model = load_4bit(model_cfg, resolved.path, device_type=device_type, device_index=device_index)
        tokenizer = load_tokenizer(resolved.path, trust_remote_code=model_cfg.trust_remote_code,
                                   chat_template=model_cfg.chat_template)
    else:
        if not lora_cfg.enabled:
            dtype = master_weights_dtype_name(model_cfg, train_cfg, device_type=device_type,
                                              sharding_keeps_fp32_masters=sharding_keeps_fp32_masters)
            model_cfg = model_cfg.model_copy(update={"dtype": dtype})
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
        model = add_lora(model, lora_cfg, gradient_checkpointing=gradient_checkpointing)
    if isinstance(model, PeftModel):
        upcast_trainable(model)
    return LoadedModel(model, tokenizer, base_model_path, is_lora=isinstance(model, PeftModel))


def upcast_trainable(model) -> None:
    """Adapters in float32 whatever the base's dtype (PEFT usually does this; a loaded adapter may not)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def load_4bit(model_cfg: ModelConfig, path: str, *, device_type: str, device_index: int):
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


def add_lora(model, lora_cfg: LoraConfig, *, gradient_checkpointing: bool):
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


def setup_optimizer(model, train_cfg: TrainConfig) -> torch.optim.Optimizer:
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


# train.lr_scheduler -> transformers' scheduler name. All of ours warm up linearly from 0 over
# train.warmup_steps; transformers' "constant" has no warmup, "constant_with_warmup" does.
HF_SCHEDULERS = {
    "inverse_sqrt": "inverse_sqrt",  # the paper's (the official code runs it through the HF Trainer)
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant_with_warmup",
}


def setup_lr_scheduler(optimizer, train_cfg: TrainConfig, total_steps: int):
    """transformers' schedule (a LambdaLR): step it once per optimizer step; the first update uses step 0."""
    from transformers import get_scheduler

    return get_scheduler(HF_SCHEDULERS[train_cfg.lr_scheduler], optimizer,
                         num_warmup_steps=train_cfg.warmup_steps, num_training_steps=total_steps)

