"""Per-sequence log-probabilities for ORPO, without materialising the (2B, T, V) logits.

The batch is one stack of 2B right-padded rows, [chosen_1..chosen_B; rejected_1..rejected_B] (see
`orpo.collate.PreferenceCollator`). Row r's token at position t+1 is predicted from the final hidden state
at position t, so everything here works on "label positions" t = 0..T-2 with labels input_ids[:, 1:].

Two paths compute the same `SequenceLogps`:

- `model_sequence_logps`: runs the model up to its final hidden states, then projects only the positions
  that carry a label we need (response tokens, plus the chosen prompt tokens when the NLL covers the
  prompt) through the output embedding, `chunk_size` tokens at a time, with an autograd function whose
  backward recomputes each chunk's logits. Extra memory is O(chunk_size x V), whatever B and T are.
- `plain_sequence_logps`: the reference, through the model's full logits. Tests check the two agree in
  values and gradients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def _label_masks(
    completion_mask: torch.Tensor, attention_mask: torch.Tensor, nll_on_prompt: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, T-1) float masks over label positions: response labels, and the NLL labels.

    NLL labels are the chosen half's response labels, or, with `nll_on_prompt`, every non-padding label of
    the chosen half (prompt + response minus the first token, which nothing predicts), as TRL does.
    """
    comp = completion_mask[:, 1:].to(dtype)
    num_pairs = comp.shape[0] // 2
    nll = (attention_mask[:, 1:].to(dtype) if nll_on_prompt else comp).clone()
    nll[num_pairs:] = 0.0
    return comp, nll


def _reduce(token_logps: torch.Tensor, comp: torch.Tensor, nll: torch.Tensor) -> SequenceLogps:
    """From (2B, T-1) per-label log-probs and the label masks to per-sequence values."""
    counts = comp.sum(dim=1)
    logps = (token_logps * comp).sum(dim=1) / counts.clamp(min=1.0)
    return SequenceLogps(
        logps=logps,
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


class _ChunkedTokenLogps(torch.autograd.Function):
    """log P(target_i | hidden_i) for n selected positions, chunk by chunk, recomputing logits in backward.

    Saves its inputs and each position's log-sum-exp; peak extra memory is a few (chunk_size, V) float32
    buffers (plus one copy of the weight in the compute dtype when that differs from the weight's, e.g.
    under bf16 autocast).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, logit_scale, logit_softcap):
        compute_dtype = _compute_dtype(weight)
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.logit_scale = logit_scale
        ctx.logit_softcap = logit_softcap
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        out_dtype = torch.promote_types(compute_dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=out_dtype, device=hidden.device)
        lse = torch.empty_like(out)
        # Autocast off: the dtypes are chosen explicitly, identically in forward and backward.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                stop = start + chunk_size
                logits, _ = _chunk_logits(hidden[start:stop].to(compute_dtype), w, b, logit_scale, logit_softcap)
                lse[start:stop] = torch.logsumexp(logits, dim=1)
                out[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse[start:stop]
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
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
                g = grad_out[start:stop]
                # d logp_target / d logits = onehot(target) - softmax(logits); softmax in place from the
                # forward's log-sum-exp (raw is only read again with softcapping, when it is another tensor).
                grad_logits = logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])
                grad_logits.scatter_add_(1, targets[start:stop, None], g[:, None])
                if ctx.logit_softcap is not None:
                    grad_logits.mul_(1.0 - torch.tanh(raw / ctx.logit_softcap).square())
                if ctx.logit_scale is not None:
                    grad_logits.mul_(ctx.logit_scale)
                del logits, raw
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
    """Sequence log-probs from final hidden states (after the final norm) and the output embedding.

    Args:
        hidden: (2B, T, H) final hidden states of the stacked [chosen; rejected] batch.
        lm_head_weight: (V, H) output embedding (tied or not); lm_head_bias: (V,) or None.
        input_ids, completion_mask, attention_mask: (2B, T) from `PreferenceCollator`.
        nll_on_prompt: NLL over the chosen prompt + response (TRL / official code) or response only (paper).
        chunk_size: label positions projected at once; bounds the extra memory at O(chunk_size x V).
        logit_scale, logit_softcap: for models whose logits are `scale * (h W^T)` (Cohere; Granite's
            `1 / logits_scaling`) or `cap * tanh(z / cap)` (Gemma 2 final softcapping).

    Only label positions that are needed are projected. The log-softmax is computed in float32; the
    projection matmul runs in the weight's dtype (or autocast's under mixed precision), like the model's
    own lm_head would.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    rows, length, width = hidden.shape
    if input_ids.shape != (rows, length):
        raise ValueError(f"hidden is {tuple(hidden.shape)} but input_ids is {tuple(input_ids.shape)}")
    comp, nll = _label_masks(
        completion_mask, attention_mask, nll_on_prompt, torch.promote_types(hidden.dtype, torch.float32)
    )
    needed = (comp + nll) > 0  # (2B, T-1) label positions to project
    row_idx, pos_idx = needed.nonzero(as_tuple=True)
    flat = row_idx * length + pos_idx  # index into the (2B*T) grid of hidden positions
    selected = hidden.reshape(rows * length, width).index_select(0, flat)
    targets = input_ids.reshape(-1).index_select(0, flat + 1)
    token_logps = _ChunkedTokenLogps.apply(
        selected, lm_head_weight, lm_head_bias, targets, chunk_size, logit_scale, logit_softcap
    )
    grid = token_logps.new_zeros(rows * length).index_add(0, flat, token_logps)
    return _reduce(grid.view(rows, length)[:, :-1], comp, nll)


def plain_sequence_logps(model: nn.Module, batch: dict[str, Any], *, nll_on_prompt: bool) -> SequenceLogps:
    """Reference path: the model's full (2B, T, V) logits, log-softmax in float32. Memory-hungry."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logprobs = torch.log_softmax(at_least_float32(logits[:, :-1]), dim=-1)
    token_logps = logprobs.gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    comp, nll = _label_masks(batch["completion_mask"], batch["attention_mask"], nll_on_prompt, token_logps.dtype)
    return _reduce(token_logps, comp, nll)


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


def _logit_transform(config: Any) -> tuple[float | None, float | None]:
    """(scale, softcap) that the model's forward applies to lm_head's output, from its config."""
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if scaling:
        scale = (scale or 1.0) / scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return (float(scale) if scale not in (None, 1.0) else None), (float(softcap) if softcap else None)


def model_sequence_logps(
    model: nn.Module, batch: dict[str, Any], *, nll_on_prompt: bool, chunk_size: int
) -> SequenceLogps:
    """Sequence log-probs of a causal LM on a stacked batch, with chunked logits.

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
            chunked_sequence_logps(
                hidden,
                module.weight,
                input_ids,
                batch["completion_mask"],
                batch["attention_mask"],
                nll_on_prompt=nll_on_prompt,
                chunk_size=chunk_size,
                lm_head_bias=module.bias,
                logit_scale=scale,
                logit_softcap=softcap,
            )
        )
        return (hidden[:, -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(intercept)
    try:
        model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(inner).__name__}'s forward never called its output embedding")
    return captured[0]
