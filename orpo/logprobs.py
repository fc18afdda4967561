"""Per-sequence log-probabilities for ORPO, without materialising the (2B, T, V) logits.

A batch comes in one of the two layouts of `orpo.collate`: 2B stacked rows [chosen_1..chosen_B;
rejected_1..rejected_B], where row r's token t+1 is predicted from the hidden state at t, or one row per
pair (prompt + chosen + rejected) that lists its labels explicitly. Both become `TokenLabels`: for each
predicted token, the position of the hidden state that predicts it, the token, and the sequence (0..2B-1,
chosen then rejected) it belongs to. Everything below works on those.

Two paths compute the same `SequenceLogps`:

- `model_sequence_logps`: runs the model up to its final hidden states, then projects only the positions
  that carry a label we need (response tokens, plus the chosen prompt tokens when the NLL covers the
  prompt) through the output embedding, `chunk_size` tokens at a time, with an autograd function whose
  backward recomputes each chunk's logits. Extra memory is O(chunk_size x V), whatever B and T are. When
  the output embedding is frozen (LoRA), the forward already computes d logp / d hidden per position
  (one (n, H) tensor), so the backward needs no second pass over the vocabulary.
- `plain_sequence_logps`: the reference, through the model's full logits. Tests check the two agree in
  values and gradients.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orpo.shared_attention import ATTENTION_NAME, ROWS_KWARG, row_bounds

log = logging.getLogger(__name__)


@dataclass
class SequenceLogps:
    """Log-probabilities of one stacked [chosen; rejected] batch of 2B rows.

    To normalise the NLL over several micro-batches or processes, sum `nll_sum` and `nll_tokens` over them
    and divide once (see `orpo.loss.ORPOLoss`); averaging per-micro-batch means weights short batches up.
    """

    # All float32 (float64 for a float64 model).
    logps: torch.Tensor  # (2B,) mean log-prob of each row's response tokens (length-normalised)
    nll_sum: torch.Tensor  # () summed token NLL over the NLL tokens of the chosen half
    nll_tokens: torch.Tensor  # () how many tokens nll_sum covers
    completion_tokens: torch.Tensor  # (2B,) response tokens per row (the denominator of logps)


@dataclass
class TokenLabels:
    """The predicted tokens of a batch that the loss needs, one entry each (all tensors (N,))."""

    positions: torch.Tensor  # long: index into the batch's flattened (rows * T) hidden states
    ids: torch.Tensor  # long: the token predicted there
    sequences: torch.Tensor  # long: 0..B-1 chosen_i, B..2B-1 rejected_i
    in_response: torch.Tensor  # bool: counts to its sequence's length-normalised logp
    in_nll: torch.Tensor  # bool: counts to the NLL (chosen sequences only)
    num_sequences: int  # 2B


def stacked_labels(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, attention_mask: torch.Tensor, nll_on_prompt: bool
) -> TokenLabels:
    """Labels of the stacked layout: token t+1 of row r, predicted at position t, where it is needed.

    NLL labels are the chosen half's response labels, or, with `nll_on_prompt`, every non-padding label of
    the chosen half (prompt + response minus the first token, which nothing predicts), as TRL does.
    """
    rows, length = input_ids.shape
    comp = completion_mask[:, 1:].bool()
    nll = (attention_mask[:, 1:].bool() if nll_on_prompt else comp).clone()
    nll[rows // 2 :] = False
    row_idx, pos_idx = (comp | nll).nonzero(as_tuple=True)
    return TokenLabels(
        positions=row_idx * length + pos_idx,
        ids=input_ids[row_idx, pos_idx + 1],
        sequences=row_idx,
        in_response=comp[row_idx, pos_idx],
        in_nll=nll[row_idx, pos_idx],
        num_sequences=rows,
    )


def batch_labels(batch: dict[str, Any], nll_on_prompt: bool) -> TokenLabels:
    """`TokenLabels` of a batch from either collator of `orpo.collate`."""
    if "label_positions" not in batch:
        return stacked_labels(batch["input_ids"], batch["completion_mask"], batch["attention_mask"], nll_on_prompt)
    is_prompt = batch["label_is_prompt"].bool()
    keep = ~is_prompt if not nll_on_prompt else torch.ones_like(is_prompt)
    num_sequences = 2 * batch["input_ids"].shape[0]
    sequences = batch["label_sequences"][keep]
    return TokenLabels(
        positions=batch["label_positions"][keep],
        ids=batch["label_ids"][keep],
        sequences=sequences,
        in_response=~is_prompt[keep],
        in_nll=sequences < num_sequences // 2,
        num_sequences=num_sequences,
    )


def _reduce(token_logps: torch.Tensor, labels: TokenLabels) -> SequenceLogps:
    """From per-label log-probs to per-sequence values."""
    response = labels.in_response.to(token_logps.dtype)
    counts = token_logps.new_zeros(labels.num_sequences).index_add(0, labels.sequences, response)
    sums = token_logps.new_zeros(labels.num_sequences).index_add(0, labels.sequences, token_logps * response)
    nll = labels.in_nll.to(token_logps.dtype)
    return SequenceLogps(
        logps=sums / counts.clamp(min=1.0),
        nll_sum=-(token_logps * nll).sum(),
        nll_tokens=nll.sum(),
        completion_tokens=counts,
    )


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay (float64 keeps finite-difference tests exact)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the projection matmul: autocast's when it is on (mixed precision), else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
    logit_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (c, V) logits of a chunk, and the pre-softcap logits the backward needs."""
    raw = hidden @ weight.t()
    if bias is not None:
        raw = raw + bias
    raw = at_least_float32(raw)
    if logit_scale is not None:
        raw = raw * logit_scale
    if logit_softcap is None:
        return raw, raw
    return logit_softcap * torch.tanh(raw / logit_softcap), raw


def _logit_grad_chain(raw: torch.Tensor, logit_scale, logit_softcap) -> torch.Tensor | None:
    """d logits / d raw projection, elementwise (None when it is 1)."""
    chain = None
    if logit_softcap is not None:
        chain = 1.0 - torch.tanh(raw / logit_softcap).square()
    if logit_scale is not None:
        chain = logit_scale if chain is None else chain * logit_scale
    return chain


class _ChunkedTokenLogps(torch.autograd.Function):
    """log P(target_i | hidden_i) for n selected positions, chunk by chunk.

    Saves its inputs and each position's log-sum-exp, and recomputes a chunk's logits in backward; peak
    extra memory is a few (chunk_size, V) float32 buffers (plus one copy of the weight in the compute dtype
    when that differs from the weight's, e.g. under bf16 autocast). When only `hidden` needs a gradient (a
    frozen output embedding, as under LoRA), the forward computes d out_i / d hidden_i = (onehot - softmax)
    W per position while it holds the logits, so backward is one multiply instead of two vocabulary-sized
    matmuls: it saves an (n, H) float32 tensor instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, logit_scale, logit_softcap):
        compute_dtype = _compute_dtype(weight)
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.logit_scale = logit_scale
        ctx.logit_softcap = logit_softcap
        frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
        ctx.precomputed = hidden.requires_grad and frozen_head
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        out_dtype = torch.promote_types(compute_dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=out_dtype, device=hidden.device)
        lse = torch.empty_like(out)
        grad_dir = torch.empty(hidden.shape, dtype=out_dtype, device=hidden.device) if ctx.precomputed else None
        # Autocast off: the dtypes are chosen explicitly, identically in forward and backward.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                stop = start + chunk_size
                logits, raw = _chunk_logits(hidden[start:stop].to(compute_dtype), w, b, logit_scale, logit_softcap)
                lse[start:stop] = torch.logsumexp(logits, dim=1)
                out[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse[start:stop]
                if ctx.precomputed:
                    chain = _logit_grad_chain(raw, logit_scale, logit_softcap)
                    # d out / d logits = onehot(target) - softmax(logits), in place.
                    grad_logits = logits.sub_(lse[start:stop, None]).exp_().neg_()
                    grad_logits.scatter_add_(1, targets[start:stop, None], torch.ones_like(grad_logits[:, :1]))
                    if chain is not None:
                        grad_logits.mul_(chain)
                    grad_dir[start:stop] = grad_logits.to(compute_dtype) @ w
                del logits, raw
        if ctx.precomputed:
            ctx.save_for_backward(grad_dir)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precomputed:
            (grad_dir,) = ctx.saved_tensors
            grad_h = (grad_dir * grad_out.to(grad_dir.dtype)[:, None]).to(ctx.hidden_dtype)
            return grad_h, None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype = ctx.compute_dtype
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate weight gradients over chunks in float32, cast once at the end.
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        grad_out = grad_out.to(acc_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                stop = start + ctx.chunk_size
                h = hidden[start:stop].to(compute_dtype)
                logits, raw = _chunk_logits(h, w, b, ctx.logit_scale, ctx.logit_softcap)
                chain = _logit_grad_chain(raw, ctx.logit_scale, ctx.logit_softcap)
                g = grad_out[start:stop]
                # d logp_target / d logits = onehot(target) - softmax(logits); softmax in place from the
                # forward's log-sum-exp (the chain is computed first: raw may be the same tensor).
                grad_logits = logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])
                grad_logits.scatter_add_(1, targets[start:stop, None], g[:, None])
                if chain is not None:
                    grad_logits.mul_(chain)
                del logits, raw, chain
                if need_h:
                    grad_h[start:stop] = (grad_logits.to(compute_dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(grad_logits.t(), h.to(acc_dtype))
                if need_b:
                    grad_b.add_(grad_logits.sum(dim=0))
                del grad_logits
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
        )


def labelled_sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: TokenLabels,
    *,
    chunk_size: int,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    logit_softcap: float | None = None,
) -> SequenceLogps:
    """Sequence log-probs from final hidden states (after the final norm), the output embedding and labels.

    Args:
        hidden: (rows, T, H) final hidden states of the batch (either layout).
        lm_head_weight: (V, H) output embedding (tied or not); lm_head_bias: (V,) or None.
        labels: which positions predict which tokens of which sequence (`batch_labels`).
        chunk_size: label positions projected at once; bounds the extra memory at O(chunk_size x V).
        logit_scale, logit_softcap: for models whose logits are `scale * (h W^T)` (Cohere; Granite's
            `1 / logits_scaling`; Falcon-H1) or `cap * tanh(z / cap)` (Gemma 2 final softcapping), or both
            (scale first).

    Only the labelled positions are projected. The log-softmax is computed in float32; the projection
    matmul runs in the weight's dtype (or autocast's under mixed precision), like the model's own lm_head.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, labels.positions)
    token_logps = _ChunkedTokenLogps.apply(
        selected, lm_head_weight, lm_head_bias, labels.ids, chunk_size, logit_scale, logit_softcap
    )
    return _reduce(token_logps, labels)


def chunked_sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    nll_on_prompt: bool,
    chunk_size: int,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    logit_softcap: float | None = None,
) -> SequenceLogps:
    """`labelled_sequence_logps` of a stacked batch (2B rows; masks from `PreferenceCollator`)."""
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden is {tuple(hidden.shape)} but input_ids is {tuple(input_ids.shape)}")
    labels = stacked_labels(input_ids, completion_mask, attention_mask, nll_on_prompt)
    return labelled_sequence_logps(
        hidden, lm_head_weight, labels, chunk_size=chunk_size, lm_head_bias=lm_head_bias,
        logit_scale=logit_scale, logit_softcap=logit_softcap,
    )


def model_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the model's forward for a batch of either layout.

    The shared-prompt layout's boolean 4D mask goes to SDPA as it is; eager attention adds its mask to the
    scores, so it gets the additive form (0 where allowed, the dtype's minimum elsewhere). A model switched
    to `orpo.shared_attention` also gets the rows' bounds, and computes the mask's attention without it.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if "position_ids" not in batch:
        return inputs
    inputs["position_ids"] = batch["position_ids"]
    config = getattr(unwrap_model(model), "config", None)
    implementation = getattr(config, "_attn_implementation", "sdpa")
    if implementation == ATTENTION_NAME and "row_bounds" in batch:
        inputs[ROWS_KWARG] = row_bounds(batch["row_bounds"])
    elif implementation == "eager":
        # The first floating-point parameter: quantized (QLoRA) weights are integer tensors.
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        allowed = batch["attention_mask"]
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        inputs["attention_mask"] = additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    return inputs


# Decoder-only model types whose every layer is attention that reads the mask it is given, positioned by
# `position_ids` (rotary or none): the shared-prompt layout's 4D mask is all that keeps a rejected token
# from seeing the chosen response. Not here, on purpose: models that mix tokens outside attention (LFM2's
# convolutions; the Mamba / linear-attention layers of Granite-4.0-H (granitemoehybrid), Jamba, Bamba,
# Falcon-H1, Zamba, Nemotron-H, Qwen3-Next, Qwen3.5, RecurrentGemma), GPT-Neo (its local attention windows
# by token index, whatever the mask), ALiBi models, and anything not checked. A type earns a place here by
# passing tests/test_selfcheck.py's shared == stacked test on a tiny random instance; sliding windows are
# checked separately, from the config. `orpo.selfcheck` verifies the layout on the first batch regardless.
SHARED_PROMPT_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "gemma", "gemma2", "gemma3_text", "phi3", "granite", "granitemoe", "granitemoeshared",
        "cohere", "cohere2", "olmo", "olmo2", "olmo3", "smollm3", "starcoder2", "glm", "glm4", "helium",
        "hyperclovax", "stablelm", "gpt_neox", "nemotron", "exaone4", "ernie4_5", "seed_oss", "arcee",
        "apertus",
    }
)


def shared_prompt_unsupported(model: nn.Module, max_length: int | None = None) -> str | None:
    """Why this model cannot run the shared-prompt layout, or None when it can.

    The layout needs a model type on `SHARED_PROMPT_MODEL_TYPES` (attention is the only place tokens
    meet), and a forward that takes `position_ids` and hands a custom 4D mask to SDPA or eager
    attention unchanged (transformers' masking utilities do). Flash-attention kernels take no such mask,
    and a custom mask replaces a sliding window, which is only harmless when a whole row (up to
    2 x max_length) fits in the window.
    """
    inner = unwrap_model(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SHARED_PROMPT_MODEL_TYPES:
        return (
            f"model type {model_type!r} is not on the list of pure-attention models "
            "(orpo.logprobs.SHARED_PROMPT_MODEL_TYPES): convolution, state-space, linear or local attention "
            "layers would let rejected tokens see the chosen response"
        )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager", ATTENTION_NAME):
        return f"attention implementation {implementation!r} takes no custom 4D attention mask"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    window = getattr(config, "sliding_window", None)
    if window and (max_length is None or 2 * max_length > window):
        return f"sliding-window attention ({window} tokens) is shorter than a row of 2 x max_length ({max_length})"
    return None


def plain_sequence_logps(model: nn.Module, batch: dict[str, Any], *, nll_on_prompt: bool) -> SequenceLogps:
    """Reference path: the model's full logits, log-softmax in float32. Memory-hungry."""
    logits = model(**model_inputs(model, batch)).logits
    labels = batch_labels(batch, nll_on_prompt)
    selected = logits.reshape(-1, logits.shape[-1]).index_select(0, labels.positions)
    logprobs = torch.log_softmax(at_least_float32(selected), dim=-1)
    return _reduce(logprobs.gather(1, labels.ids[:, None]).squeeze(1), labels)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DeepSpeed / torch.compile wrappers (PEFT models are kept: they delegate)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DeepSpeedEngine",
            "DataParallel",
        ):
            model = model.module
        else:
            return model


def shards_parameters(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed ZeRO-3 shards this model's parameters."""
    engine = model
    while hasattr(engine, "module") and type(engine).__name__ != "DeepSpeedEngine":
        engine = engine.module
    if type(engine).__name__ == "DeepSpeedEngine" and engine.zero_optimization_stage() == 3:
        return True
    # FSDP1 wraps modules in FullyShardedDataParallel; FSDP2's fully_shard makes classes named FSDP<Name>.
    return any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in model.modules())


def _granite_scale(config: Any) -> tuple[float | None, float | None]:
    return 1.0 / config.logits_scaling, None  # logits / logits_scaling


# What each model's forward does to lm_head's output, as (scale, softcap): logits = cap * tanh(scale * z / cap).
# Read from the model classes of transformers 5.24 (the `*ForCausalLM.forward` of each); the same config
# attribute can mean opposite things (Granite divides by `logits_scaling`, HyperCLOVAX multiplies).
_LOGIT_TRANSFORMS: dict[str, Any] = {
    "cohere": lambda c: (c.logit_scale, None),  # logits * logit_scale
    "cohere2": lambda c: (c.logit_scale, None),
    "granite": _granite_scale,
    "granitemoe": _granite_scale,
    "granitemoeshared": _granite_scale,
    "granitemoehybrid": _granite_scale,
    "hyperclovax": lambda c: (c.logits_scaling, None),  # MuP: logits * logits_scaling
    "falcon_h1": lambda c: (c.lm_head_multiplier, None),  # logits * lm_head_multiplier
    "recurrent_gemma": lambda c: (None, c.logits_soft_cap),  # tanh(logits / cap) * cap
}


def _logit_transform(config: Any) -> tuple[float | None, float | None]:
    """(scale, softcap) that the model's forward applies to lm_head's output, by model type.

    Types not in `_LOGIT_TRANSFORMS` get Gemma's `final_logit_softcapping` when their config sets it (Gemma
    2/3/3n/4, VaultGemma, nanochat apply it that way), else nothing; `orpo.selfcheck` compares the chunked
    log-probs with the model's own logits on the first batch and falls back to full logits when they differ.
    """
    if config is None:
        return None, None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rule = _LOGIT_TRANSFORMS.get(getattr(text_config, "model_type", None))
    if rule is not None:
        scale, softcap = rule(text_config)
    else:
        scale, softcap = None, getattr(text_config, "final_logit_softcapping", None)
    return (float(scale) if scale not in (None, 1.0) else None), (float(softcap) if softcap else None)


def model_sequence_logps(
    model: nn.Module, batch: dict[str, Any], *, nll_on_prompt: bool, chunk_size: int, chunked: bool = True
) -> SequenceLogps:
    """Sequence log-probs of a causal LM on a batch of either layout, with chunked logits.

    `chunked=False` takes the full-logits path (`plain_sequence_logps`) silently: for a model whose
    output transform the chunked path does not reproduce (`orpo.selfcheck` decides it once, and logs why).

    Works for a plain Hugging Face causal LM, a PEFT model around one, and a DDP-wrapped (accelerate
    prepared) model, with or without gradient checkpointing.

    Design: the forward must go through the outermost wrapper, because DDP's gradient synchronisation is
    armed in its forward. So the model is called as usual, and a forward pre-hook on the output embedding
    (lm_head) intercepts the final hidden states on their way in: it computes the chunked log-probs there,
    with the weight lm_head holds at that moment (which is also what makes it a sensible point for wrappers
    that gather sharded weights around a module's forward), and then hands lm_head only the last position,
    so the model's own logits are a negligible (2B, 1, V). The lm_head weight reaches the loss through our
    autograd function, so DDP sees a gradient for every parameter.

    Falls back to `plain_sequence_logps` (full logits, correct but memory-hungry), with a warning, for:
    - an output embedding that is not a plain `nn.Linear` (e.g. a LoRA-adapted lm_head);
    - FSDP and DeepSpeed ZeRO-3, which free a module's gathered weights after its forward and gather them
      again only when the module's own output is back-propagated; our autograd function saves the weight
      outside that protocol, so its backward would see a released shard.
    """
    if not chunked:
        return plain_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt)
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    reason = None
    if type(head) is not nn.Linear:
        reason = f"the output embedding is {type(head).__name__}, not a plain nn.Linear"
    elif shards_parameters(model):
        reason = "the model's parameters are sharded (FSDP / ZeRO-3)"
    if reason is not None:
        log.warning("%s; computing log-probs from full logits", reason)
        return plain_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt)
    scale, softcap = _logit_transform(getattr(inner, "config", None))
    input_ids = batch["input_ids"]
    labels = batch_labels(batch, nll_on_prompt)
    captured: list[SequenceLogps] = []

    def intercept(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if captured:
            raise RuntimeError("the output embedding ran twice in one forward; cannot intercept its input")
        if hidden.shape[:2] != input_ids.shape:
            raise RuntimeError(
                f"lm_head received hidden states of shape {tuple(hidden.shape)} for input_ids "
                f"{tuple(input_ids.shape)}; the model sliced them (logits_to_keep?)"
            )
        captured.append(
            labelled_sequence_logps(
                hidden,
                module.weight,
                labels,
                chunk_size=chunk_size,
                lm_head_bias=module.bias,
                logit_scale=scale,
                logit_softcap=softcap,
            )
        )
        return (hidden[:, -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(intercept)
    try:
        model(**model_inputs(model, batch))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(inner).__name__}'s forward never called its output embedding")
    return captured[0]
