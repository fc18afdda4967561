"""Setup self-check: before training, prove on the first batch that the fast paths compute what the model does.

Two shortcuts make ORPO's log-probs cheap, and each is exact only for some models:

- the shared-prompt batch layout (`orpo.collate.SharedPromptCollator`) puts chosen and rejected behind one
  prompt and relies on a 4D attention mask to keep them apart; a layer that mixes tokens outside attention
  (a convolution, a state-space or linear-attention layer, a window by token index) lets rejected tokens
  see the chosen response;
- chunked log-probs (`orpo.logprobs.model_sequence_logps`) project hidden states through the output
  embedding themselves and must reproduce whatever the model's forward does to the logits afterwards
  (scalings, soft caps), which is known per model type only.

`run_self_check` runs a few pairs of the first batch through the model as training will (same wrappers,
device and precision) and compares, per sequence, the mean response log-prob and the chosen NLL per token:

    chunked  vs full logits, both stacked: the model's own logits are the reference for the transform;
    shared   vs stacked, both full logits: the stacked layout (TRL's) is the reference for the layout.

A mismatch falls back to the reference (full logits / stacked) and says why. When the reference itself is
not finite, no path is exact and the check stops with an error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orpo.logprobs import (
    SequenceLogps,
    model_sequence_logps,
    plain_sequence_logps,
    shards_parameters,
    shared_prompt_unsupported,
    unwrap_model,
)

log = logging.getLogger(__name__)

# Largest |difference| (nats, per sequence's mean log-prob or per NLL token) that still counts as equal.
# Measured on CPU with random Llamas (h=64/2 layers and h=256/6 layers, 3 pairs of 9-35 response tokens):
# shared vs stacked differ by <= 1.5e-6 in float32 and by <= 4.7e-3 in bfloat16 (weights or autocast);
# chunked vs full logits by <= 1e-6 in either. The errors the check exists to catch, on the tiny models of
# tests/test_selfcheck.py: 0.2-1.5 nats for LFM2 / Granite-4.0-H / GPT-Neo / Jamba / Bamba / Falcon-H1 /
# Qwen3-Next in the shared layout (rejected tokens seeing the chosen response), 14-26 nats for a wrong logit
# scale, 0.08 for a missing soft cap of 0.5. So: 1e-4 (~70x the float32 error, room for deeper
# models) when everything computes in float32, 5e-2 (~10x the bfloat16 error) under 16-bit weights, autocast
# or TF32 matmuls (torch.set_float32_matmul_precision below "highest").
TOLERANCE_FP32 = 1e-4
TOLERANCE_16BIT = 5e-2


class SelfCheckError(RuntimeError):
    """No log-prob path reproduces the model's own output on the first batch."""


@dataclass(frozen=True)
class SelfCheckSettings:
    """What the check needs from the training config (`from_train_config`)."""

    layout: str  # the requested batch layout: "shared_prompt" or "stacked"
    pad_token_id: int
    max_length: int  # a row of the shared layout holds up to 2 x max_length tokens (sliding windows)
    nll_on_prompt: bool
    chunk_size: int
    mixed_precision: str = "no"  # "bf16"/"fp16" widen the tolerance, like 16-bit weights do
    pad_to_multiple_of: int = 8
    max_pairs: int = 2  # pairs of the batch that are checked, one at a time: 3 forwards of 2 rows each, no backward

    @classmethod
    def from_train_config(cls, train_cfg: Any, pad_token_id: int, layout: str | None = None) -> SelfCheckSettings:
        """From `orpo.config.TrainConfig`; `layout` overrides its batch_layout (e.g. after a static fallback)."""
        return cls(
            layout=layout or train_cfg.batch_layout,
            pad_token_id=pad_token_id,
            max_length=train_cfg.max_length,
            nll_on_prompt=train_cfg.nll_on_prompt,
            chunk_size=train_cfg.logprob_chunk_size,
            mixed_precision=train_cfg.mixed_precision,
            pad_to_multiple_of=train_cfg.pad_to_multiple_of,
        )


@dataclass(frozen=True)
class SelfCheckResult:
    layout: str  # the batch layout to train with
    chunked_logps: bool  # whether model_sequence_logps may use chunked logits (else full logits)
    reasons: tuple[str, ...] = ()  # why a fast path was turned down (empty when none was)
    deviations: dict[str, float] = field(default_factory=dict)  # measured max |difference| per comparison


def _deviation(got: SequenceLogps, want: SequenceLogps) -> float:
    """Largest |difference| of the per-sequence mean log-probs and of the NLL per token; inf for non-finite."""
    tokens = want.nll_tokens.clamp(min=1.0)
    diffs = torch.cat([(got.logps - want.logps).abs(), ((got.nll_sum - want.nll_sum).abs() / tokens)[None]])
    worst = diffs.max().item()
    return worst if math.isfinite(worst) else math.inf


def _reduced_precision(model: nn.Module, settings: SelfCheckSettings) -> bool:
    """Whether the forward rounds like 16-bit floats: autocast, 16-bit or quantized weights, or TF32 matmuls."""
    if settings.mixed_precision in ("bf16", "fp16") or torch.get_float32_matmul_precision() != "highest":
        return True
    # 16-bit weights, or quantized ones (integer storage) that compute in 16 bits.
    return any(p.dtype in (torch.bfloat16, torch.float16) or not p.is_floating_point() for p in model.parameters())


def _agree(values: list[float], device: torch.device) -> list[float]:
    """The largest of each value over all processes, so every process takes the same decision."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (parameters may be offloaded)
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def run_self_check(model: nn.Module, pairs: list[dict[str, Any]], settings: SelfCheckSettings) -> SelfCheckResult:
    """Which batch layout and log-prob path reproduce the model's own output on `pairs` (tokenized pairs of the
    first batch, as `orpo.collate.tokenize_pair` makes them).

    Call it on the model as training runs it (after `accelerator.prepare`), on every process: the forwards
    are collective under FSDP / ZeRO-3, and the decision is the same on all processes.
    """
    from orpo.collate import make_collator

    if not pairs:
        raise ValueError("the self-check needs at least one tokenized pair")
    pairs = pairs[: settings.max_pairs]
    reasons: list[str] = []
    layout = settings.layout
    if layout == "shared_prompt":
        static = shared_prompt_unsupported(model, settings.max_length)
        if static is not None:
            reasons.append(f"batch layout 'shared_prompt' is not possible ({static}); using 'stacked'")
            layout = "stacked"
    inner = unwrap_model(model)
    # Sharded or non-Linear output embeddings already take the full-logits path: nothing to compare.
    check_chunked = type(inner.get_output_embeddings()) is nn.Linear and not shards_parameters(model)
    check_layout = layout == "shared_prompt"
    device = next(p.device for p in model.parameters())

    def run(pair: dict[str, Any], layout_name: str, chunked: bool) -> SequenceLogps:
        batch = make_collator(layout_name, settings.pad_token_id, settings.pad_to_multiple_of)([pair])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if chunked:
            return model_sequence_logps(model, batch, nll_on_prompt=settings.nll_on_prompt,
                                        chunk_size=settings.chunk_size)
        return plain_sequence_logps(model, batch, nll_on_prompt=settings.nll_on_prompt)

    was_training = model.training
    model.eval()  # dropout would make two forwards of the same rows differ
    try:
        chunked_dev = layout_dev = 0.0
        reference_ok = 1.0
        with torch.no_grad():
            # One pair at a time: the full-logits reference is a (2, T, V) tensor, no bigger than what a training
            # step of one pair holds, so the check never sets the run's peak memory.
            for pair in pairs:
                reference = run(pair, "stacked", chunked=False)
                # Every process runs the same forwards in the same order, whatever its numbers (see above).
                if check_chunked:
                    chunked_dev = max(chunked_dev, _deviation(run(pair, "stacked", chunked=True), reference))
                if check_layout:
                    layout_dev = max(layout_dev, _deviation(run(pair, "shared_prompt", chunked=False), reference))
                finite = bool(torch.isfinite(reference.logps).all() and torch.isfinite(reference.nll_sum))
                reference_ok = min(reference_ok, float(finite))
                del reference
    finally:
        model.train(was_training)
    chunked_dev, layout_dev, reference_bad = _agree([chunked_dev, layout_dev, 1.0 - reference_ok], device)
    if reference_bad:
        raise SelfCheckError(
            f"{type(inner).__name__}'s own logits give non-finite log-probs on the first batch, so no batch layout "
            "or log-prob path can be checked; look at model.dtype (float16 overflows) and the weights"
        )
    tolerance = TOLERANCE_16BIT if _reduced_precision(model, settings) else TOLERANCE_FP32
    deviations = {}
    chunked_logps = True
    if check_chunked:
        deviations["chunked_vs_full_logits"] = chunked_dev
        if chunked_dev > tolerance:
            chunked_logps = False
            reasons.append(
                f"chunked log-probs differ from {type(inner).__name__}'s own logits by {chunked_dev:.3g} nats "
                f"(tolerance {tolerance:g}): its output transform is not one orpo.logprobs reproduces; "
                "using full logits"
            )
    if check_layout:
        deviations["shared_prompt_vs_stacked"] = layout_dev
        if layout_dev > tolerance:
            layout = "stacked"
            reasons.append(
                f"the shared-prompt layout's log-probs differ from the stacked layout's by {layout_dev:.3g} nats "
                f"(tolerance {tolerance:g}): tokens of one response see the other; using 'stacked'"
            )
    for reason in reasons:
        log.warning("self-check: %s", reason)
    log.info("self-check on %d pairs: layout %s, %s log-probs, max deviations %s", len(pairs), layout,
             "chunked" if chunked_logps else "full-logits", {k: f"{v:.2g}" for k, v in deviations.items()})
    return SelfCheckResult(layout=layout, chunked_logps=chunked_logps, reasons=tuple(reasons), deviations=deviations)
