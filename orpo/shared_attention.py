"""Attention for the shared-prompt batch layout without its T x T mask: two causal attentions per row.

A row of `orpo.collate.SharedPromptCollator` holds prompt + chosen + rejected. Its 4D mask lets chosen tokens
see the prompt and the chosen tokens before them, and rejected tokens see the prompt and the rejected tokens
before them. Given that mask, SDPA computes every (query, key) block of the row, masked or not: on CPU the
masked flash kernel took 1.7x the time of a causal one over the same row, and a training step runs
attention three times (forward, checkpoint recompute, backward).

What the mask allows is exactly two causal attentions: prompt + chosen over itself, and [prompt; rejected]
over itself. `shared_prompt_attention` computes those with `is_causal` SDPA calls, which skip the blocks
above the diagonal, and keeps the rejected queries of the second one. The prompt's queries are computed
twice (the second time only to be discarded); its keys and values, like everything outside attention, are
computed once. Measured on CPU for one SmolLM2 layer (9 heads of 64, two rows of ~930 tokens, forward +
backward): 0.07 s against 0.10-0.12 s with the mask. Not the 2-3x that the skipped blocks suggest: the
kernel uses smaller, less efficient blocks on the shorter sequences. On CUDA, SDPA without a mask can also
use its flash kernel, which takes no custom mask at all.

It is registered with transformers' `AttentionInterface` (and its mask interface, with SDPA's masks) as
`ATTENTION_NAME`. `use_shared_prompt_attention(model)` switches a model that runs SDPA to it; a forward
that passes `shared_prompt_rows` (`orpo.logprobs.model_inputs` does, for shared-prompt batches) gets the
split attention, any other forward gets plain SDPA with the mask it was given. The implementation name is
not saved with the model's config (transformers never serialises it), so saved checkpoints load anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ATTENTION_NAME = "orpo_shared_prompt"
ROWS_KWARG = "shared_prompt_rows"

# One row's (chosen start, rejected start, end): prompt = [0, chosen start), chosen = [chosen start,
# rejected start), rejected = [rejected start, end), padding after end.
RowBounds = tuple[int, int, int]


def shared_prompt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    shared_prompt_rows: Sequence[RowBounds] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D).

    With `shared_prompt_rows` (one `RowBounds` per row), each row's attention is computed as two causal
    attentions and `attention_mask` is not read (it is the layout's mask, which those reproduce); padding
    positions get zeros. Without it, this is transformers' SDPA attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prompt_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if len(shared_prompt_rows) != query.shape[0]:
        raise ValueError(f"{len(shared_prompt_rows)} row bounds for a batch of {query.shape[0]} rows")

    kwargs.pop("is_causal", None)

    def causal(row: int, segments: list[tuple[int, int]]) -> torch.Tensor:
        """Causal attention over the positions of `segments` (index ranges of one row), in that order."""
        def gather(x: torch.Tensor) -> torch.Tensor:
            pieces = [x[row : row + 1, :, start:stop] for start, stop in segments if stop > start]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

        out, _ = sdpa_attention_forward(module, gather(query), gather(key), gather(value), None, dropout=dropout,
                                        scaling=scaling, is_causal=True, **kwargs)
        return out  # (1, L, H, D)

    length = query.shape[2]
    rows = []
    for row, (chosen_start, rejected_start, end) in enumerate(shared_prompt_rows):
        if not 0 <= chosen_start <= rejected_start <= end <= length or rejected_start == 0:
            raise ValueError(f"row {row}: bounds {(chosen_start, rejected_start, end)} do not fit a row of {length}")
        parts = [causal(row, [(0, rejected_start)])]  # prompt + chosen
        if end > rejected_start:  # rejected, behind the prompt; the prompt's own outputs come from above
            parts.append(causal(row, [(0, chosen_start), (rejected_start, end)])[:, chosen_start:])
        if length > end:
            parts.append(parts[0].new_zeros((1, length - end, *parts[0].shape[2:])))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def register_shared_prompt_attention() -> None:
    """Make `ATTENTION_NAME` a valid `attn_implementation` (idempotent), with SDPA's mask construction."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, shared_prompt_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _configs(model: nn.Module) -> list:
    """Every config with an attention implementation in the model (the top one and any sub-configs)."""
    return [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]


def use_shared_prompt_attention(model: nn.Module) -> bool:
    """Switch a model that runs SDPA to `ATTENTION_NAME`; False, and nothing changed, for any other
    attention implementation (those keep computing the layout's mask as they do)."""
    configs = _configs(model)
    if not configs or any(c._attn_implementation not in ("sdpa", ATTENTION_NAME) for c in configs):
        return False
    register_shared_prompt_attention()
    for config in configs:
        config._attn_implementation = ATTENTION_NAME
    return True


def row_bounds(bounds: torch.Tensor) -> tuple[RowBounds, ...]:
    """A collated batch's `row_bounds` tensor (B, 3) as the plain ints the attention function slices with."""
    return tuple((int(a), int(b), int(c)) for a, b, c in bounds.tolist())
