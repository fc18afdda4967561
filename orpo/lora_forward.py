"""A LoRA linear layer's forward as one fused multiply-add, for training without LoRA dropout.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as three passes over an output-sized
tensor (lora_B's product, the scaling, the sum) and one more in backward (the scaling's gradient). On CPU
these passes are memory-bound and, with rank 16, cost about as much as the base layer's weight gradient
that LoRA saves, so a LoRA step was no cheaper than a full one. `torch.addmm(base, A x, B^T, alpha=scaling)`
writes the output once, and its backward passes the gradient through to the base output untouched.
Same values and gradients as peft's forward (tests/test_lora_forward.py).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(
        self.active_adapters
    ) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    base_weight = getattr(self.base_layer, "weight", None)
    # Mixed dtypes (autocast, a bf16 base under fp32 adapters): peft's own casting path, decided before any
    # compute so nothing is computed twice.
    if (torch.is_autocast_enabled(x.device.type) or base_weight is None
            or base_weight.dtype != lora_a.weight.dtype or x.dtype != lora_a.weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    down = lora_a(x)  # (..., r)
    flat = result.reshape(-1, result.shape[-1])  # (N, out)
    fused = torch.addmm(flat, down.reshape(-1, down.shape[-1]), lora_b.weight.t(), alpha=self.scaling[name])
    return fused.view(result.shape)


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every plain LoRA linear layer of `model` (peft) the fused forward; returns how many.

    Only layers where it computes the same thing: one adapter, no dropout, no variant (DoRA etc.), no
    LoRA bias. Others keep peft's forward.
    """
    from peft.tuners.lora.layer import Linear

    patched = 0
    for module in model.modules():
        if type(module) is not Linear or len(module.lora_A) != 1:
            continue
        name = next(iter(module.lora_A))
        if (not isinstance(module.lora_dropout[name], nn.Identity) or name in module.lora_variant
                or module.lora_B[name].bias is not None or module.lora_A[name].bias is not None):
            continue
        module.forward = types.MethodType(_fused_forward, module)
        patched += 1
    return patched
