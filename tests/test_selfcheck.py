"""The setup self-check: shared-prompt layout and chunked log-probs only where they equal the reference.

Tiny random models of each architecture are built offline from small configs (initializer_range 0.3, so
predictions are far from uniform and a token that sees the wrong context changes its log-prob visibly).
"""

from __future__ import annotations

import logging

import pytest
import torch

import orpo.logprobs
from orpo.collate import tokenize_pair
from orpo.logprobs import SHARED_PROMPT_MODEL_TYPES
from orpo.models import build_tiny_llama, build_tiny_tokenizer
from orpo.selfcheck import TOLERANCE_FP32, SelfCheckError, SelfCheckSettings, run_self_check

EXAMPLES = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "I am not sure, I cannot help with that question at all, sorry."},
    {"prompt": "Please write a short poem about the sea and the wind.", "chosen": "Waves fold; wind hums low.",
     "rejected": "No."},
]
HYBRIDS = ["lfm2", "granitemoehybrid", "gpt_neo"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _tiny(model_type: str, tokenizer, **overrides):
    """A 2-layer random causal LM of `model_type`, with the tiny tokenizer's vocabulary."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.3, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # MoE types: few small experts; sliding-window types: a window longer than any row here.
        num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, sliding_window=4096,
    )
    hybrid = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
                  mamba_expand=2, mamba_chunk_size=16)
    settings.update({
        "lfm2": dict(layer_types=["conv", "full_attention"]),
        "granitemoehybrid": dict(layer_types=["mamba", "attention"], shared_intermediate_size=64, **hybrid),
        "falcon_h1": dict(mamba_d_ssm=128, **hybrid),
        "gpt_neo": dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8),
        "recurrent_gemma": dict(block_types=["recurrent", "attention"], attention_window_size=4096),
    }.get(model_type, {}))
    settings.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**settings))


def _pairs(tokenizer) -> list[dict]:
    return [tokenize_pair(e, tokenizer, max_length=96, max_prompt_length=48) for e in EXAMPLES]


def _settings(tokenizer, layout: str = "shared_prompt") -> SelfCheckSettings:
    return SelfCheckSettings(layout, tokenizer.pad_token_id, max_length=96, nll_on_prompt=True, chunk_size=7)


@pytest.mark.parametrize("model_type", sorted(SHARED_PROMPT_MODEL_TYPES))
def test_every_allow_listed_type_passes_shared_equals_stacked(model_type, tokenizer) -> None:
    """The allow-list is earned: a tiny instance of each type gives the stacked log-probs in the shared layout."""
    result = run_self_check(_tiny(model_type, tokenizer), _pairs(tokenizer), _settings(tokenizer))
    assert (result.layout, result.chunked_logps, result.reasons) == ("shared_prompt", True, ())
    assert result.deviations["shared_prompt_vs_stacked"] < TOLERANCE_FP32
    assert result.deviations["chunked_vs_full_logits"] < TOLERANCE_FP32


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_hybrid_and_local_attention_models_fall_back_to_stacked(model_type, tokenizer, monkeypatch) -> None:
    model = _tiny(model_type, tokenizer)
    result = run_self_check(model, _pairs(tokenizer), _settings(tokenizer))
    assert result.layout == "stacked" and result.chunked_logps
    assert len(result.reasons) == 1 and f"model type {model_type!r} is not on the list" in result.reasons[0]
    # Without the allow-list, the comparison on the batch catches them by itself.
    monkeypatch.setattr(orpo.logprobs, "SHARED_PROMPT_MODEL_TYPES", SHARED_PROMPT_MODEL_TYPES | {model_type})
    result = run_self_check(model, _pairs(tokenizer), _settings(tokenizer))
    assert result.layout == "stacked" and result.chunked_logps
    assert result.deviations["shared_prompt_vs_stacked"] > 0.1  # nats: far outside any rounding
    assert "tokens of one response see the other" in result.reasons[0]


@pytest.mark.parametrize(
    ("model_type", "transform"),
    [
        ("hyperclovax", {"logits_scaling": 4.0}),  # multiplies (Granite divides)
        ("granite", {"logits_scaling": 4.0}),
        ("cohere", {"logit_scale": 0.25}),
        ("falcon_h1", {"lm_head_multiplier": 3.0}),
        ("recurrent_gemma", {"logits_soft_cap": 0.5}),
        ("gemma2", {"final_logit_softcapping": 0.5}),
    ],
)
def test_chunked_log_probs_reproduce_each_models_logit_transform(model_type, transform, tokenizer) -> None:
    result = run_self_check(_tiny(model_type, tokenizer, **transform), _pairs(tokenizer), _settings(tokenizer, "stacked"))
    assert result.chunked_logps and result.reasons == ()
    assert result.deviations["chunked_vs_full_logits"] < TOLERANCE_FP32


def test_unknown_logit_transform_falls_back_to_full_logits(tokenizer, monkeypatch, caplog) -> None:
    """A transform the chunked path gets wrong (here: Llama believed to scale its logits by 2)."""
    model, tok = build_tiny_llama(seed=0)
    monkeypatch.setitem(orpo.logprobs._LOGIT_TRANSFORMS, "llama", lambda config: (2.0, None))
    with caplog.at_level(logging.WARNING, logger="orpo.selfcheck"):
        result = run_self_check(model, _pairs(tok), _settings(tok))
    assert result.layout == "shared_prompt"  # the layout is checked on the model's own logits, and is fine
    assert not result.chunked_logps
    assert result.deviations["chunked_vs_full_logits"] > 0.1
    assert "own logits" in result.reasons[0] and "using full logits" in caplog.text


def test_bfloat16_model_gets_the_16_bit_tolerance_and_keeps_the_fast_paths(tokenizer) -> None:
    model, tok = build_tiny_llama(seed=0)
    result = run_self_check(model.to(torch.bfloat16), _pairs(tok), _settings(tok))
    assert (result.layout, result.chunked_logps) == ("shared_prompt", True)


def test_non_finite_reference_stops_with_an_error(tokenizer) -> None:
    model, tok = build_tiny_llama(seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(SelfCheckError, match="non-finite log-probs"):
        run_self_check(model, _pairs(tok), _settings(tok))


def test_training_setup_falls_back_to_stacked_with_the_reason(tokenizer, tmp_path, caplog) -> None:
    """The recipe's setup takes the self-check's layout: a tiny LFM2 trains in the stacked layout."""
    from test_train import toy_config, write_toy_dataset

    from orpo.train import ORPORecipe

    _tiny("lfm2", tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    dataset = write_toy_dataset(tmp_path / "dataset", train_pairs=8, test_pairs=4)
    config = toy_config(tmp_path, tmp_path / "model", max_steps=1, per_device_batch_size=2, lora={"enabled": False})
    recipe = ORPORecipe(config, dataset, tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        recipe.setup()
    try:
        assert config.train.batch_layout == "shared_prompt" and recipe.batch_layout == "stacked"
        assert "model type 'lfm2' is not on the list" in caplog.text
        assert type(recipe.collator).__name__ == "PreferenceCollator"
        recipe.train()
        assert recipe.global_step == 1
    finally:
        recipe.cleanup()
