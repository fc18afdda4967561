"""orpo.lora_forward: the fused LoRA forward gives peft's values and gradients, and only where it applies."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from orpo.lora_forward import fuse_lora_forward
from orpo.models import build_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(dropout: float = 0.0, **extra):
    model, _ = build_tiny_llama(seed=0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                             **extra))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes the adapter's path count
            param.data.normal_(std=0.1)
    return model


def _loss_and_grads(model, input_ids):
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_forward_matches_peft():
    model = _lora_model()
    input_ids = torch.randint(3, 100, (2, 12))
    reference_loss, reference = _loss_and_grads(model, input_ids)
    assert fuse_lora_forward(model) == 2 * len(TARGETS)  # 2 layers
    loss, grads = _loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], msg=name)


def test_fused_forward_with_gradient_checkpointing():
    model = _lora_model()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    input_ids = torch.randint(3, 100, (2, 12))
    reference_loss, reference = _loss_and_grads(model, input_ids)
    fuse_lora_forward(model)
    loss, grads = _loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], msg=name)


@pytest.mark.parametrize("extra", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_layers_it_would_change_keep_peft_forward(extra):
    dropout = extra.pop("lora_dropout", 0.0)
    assert fuse_lora_forward(_lora_model(dropout, **extra)) == 0


def test_disabled_adapter_falls_back():
    model = _lora_model()
    input_ids = torch.randint(3, 100, (1, 8))
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=input_ids).logits
    fuse_lora_forward(model)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base)
