"""The shared-prompt layout's attention as two causal SDPA calls per row equals SDPA under the layout's 4D mask."""

from __future__ import annotations

import json

import pytest
import torch
from test_selfcheck import EXAMPLES, _tiny

from orpo.collate import SharedPromptCollator, tokenize_pair
from orpo.logprobs import SHARED_PROMPT_MODEL_TYPES, model_inputs, model_sequence_logps
from orpo.loss import ORPOLoss
from orpo.models import build_tiny_tokenizer
from orpo.shared_attention import (
    ATTENTION_NAME,
    shared_prompt_attention,
    use_shared_prompt_attention,
)

# Three pairs: one row without padding, one with a rejected response longer than its chosen one, one short.
PAIRS = [*EXAMPLES, {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "It is five, I believe, or maybe six."}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _batch(tokenizer) -> dict:
    features = [tokenize_pair(p, tokenizer, max_length=96, max_prompt_length=48) for p in PAIRS]
    batch = SharedPromptCollator(tokenizer.pad_token_id, pad_to_multiple_of=16)(features)
    for key in ("num_pairs", "conversation_tokens", "input_tokens"):
        batch.pop(key)
    return batch


def _logps_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    seq = model_sequence_logps(model, batch, nll_on_prompt=True, chunk_size=7)
    (ORPOLoss(0.3)(seq, num_pairs=seq.logps.shape[0] // 2).loss + 0.1 * seq.logps.sum()).backward()
    return seq.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", sorted(SHARED_PROMPT_MODEL_TYPES))
def test_split_attention_gives_the_masked_values_and_gradients(model_type, tokenizer) -> None:
    """Every allow-listed type, under gradient checkpointing (the recompute calls attention again)."""
    model = _tiny(model_type, tokenizer, attention_dropout=0.0, residual_dropout=0.0)  # Seed-OSS drops out
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(tokenizer)
    assert (batch["row_bounds"][:, 2] < batch["input_ids"].shape[1]).all()  # every row has padding
    if model.config._attn_implementation != "sdpa":  # e.g. Gemma 2 defaults to eager: left as it is
        assert not use_shared_prompt_attention(model)
        assert model.config._attn_implementation != ATTENTION_NAME
        return
    masked, masked_grads = _logps_and_grads(model, batch)
    assert use_shared_prompt_attention(model)
    assert model_inputs(model, batch)["shared_prompt_rows"] == tuple(map(tuple, batch["row_bounds"].tolist()))
    split, split_grads = _logps_and_grads(model, batch)
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-5)
    assert split_grads.keys() == masked_grads.keys()
    for name, grad in masked_grads.items():  # float32 rounding, against each gradient's own scale
        assert (split_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name


def test_a_forward_without_row_bounds_is_sdpa_with_its_own_mask(tokenizer) -> None:
    """Left padding and a 2D mask (generation's inputs): the switched model still builds and applies the mask."""
    model = _tiny("llama", tokenizer).eval()
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert use_shared_prompt_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()])


def test_generation_with_a_switched_model_is_unchanged(tokenizer) -> None:
    """A model switched for training and then asked to generate (KV cache, left padding) decodes as SDPA does."""
    model = _tiny("llama", tokenizer).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert use_shared_prompt_attention(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), expected)


def test_saved_checkpoints_do_not_name_the_training_attention(tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny("llama", tokenizer)
    assert use_shared_prompt_attention(model)
    model.save_pretrained(tmp_path)
    assert ATTENTION_NAME not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_row_bounds_that_do_not_fit_the_batch_are_refused() -> None:
    module = torch.nn.Module()
    query = key = value = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="2 row bounds for a batch of 1 rows"):
        shared_prompt_attention(module, query, key, value, None, shared_prompt_rows=[(1, 2, 3), (1, 2, 3)])
    with pytest.raises(ValueError, match=r"row 0: bounds \(2, 6, 9\) do not fit a row of 8"):
        shared_prompt_attention(module, query, key, value, None, shared_prompt_rows=[(2, 6, 9)])


@pytest.mark.parametrize("layout", ["shared_prompt", "stacked"])
def test_training_runs_shared_prompt_rows_through_the_split_attention(layout, tiny_model_dir, tmp_path, caplog) -> None:
    """The recipe switches the model for the shared-prompt layout only, and the self-check passes through it."""
    import logging

    from test_train import toy_config, write_toy_dataset

    from orpo.logprobs import unwrap_model
    from orpo.train import ORPORecipe

    dataset = write_toy_dataset(tmp_path / "dataset", train_pairs=8, test_pairs=4)
    config = toy_config(tmp_path, tiny_model_dir, max_steps=1, per_device_batch_size=2, batch_layout=layout)
    recipe = ORPORecipe(config, dataset, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="orpo"):
        recipe.setup()
    try:
        implementation = unwrap_model(recipe.model).config._attn_implementation
        assert recipe.batch_layout == layout
        assert (implementation == ATTENTION_NAME) == (layout == "shared_prompt"), implementation
        assert ("two causal SDPA calls per row" in caplog.text) == (layout == "shared_prompt")
        recipe.train()
        assert recipe.global_step == 1
    finally:
        recipe.cleanup()
