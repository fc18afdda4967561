"""The shared-prompt layout (one row per pair) gives the stacked layout's log-probs and gradients."""

from __future__ import annotations

import pytest
import torch

from orpo.collate import (
    PreferenceCollator,
    SharedPromptCollator,
    make_collator,
    row_length,
    tokenize_pair,
)
from orpo.logprobs import (
    _ChunkedTokenLogps,
    batch_labels,
    model_sequence_logps,
    plain_sequence_logps,
    shared_prompt_unsupported,
)
from orpo.loss import ORPOLoss

# Responses of different lengths on both sides, so rows are padded differently in each layout.
EXAMPLES = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "I am not sure, I cannot help with that question at all, sorry."},
    {"prompt": "Please write a short poem about the sea and the wind.", "chosen": "Waves fold; wind hums low.",
     "rejected": "No."},
    {"prompt": "Two plus two?", "chosen": "Two plus two equals four.", "rejected": "Five."},
]


def _features(tokenizer) -> list[dict]:
    return [tokenize_pair(e, tokenizer, max_length=96, max_prompt_length=48) for e in EXAMPLES]


def _objective(seq) -> torch.Tensor:
    # Touches every output with distinct weights, so each gradient path is checked.
    return ORPOLoss(0.3)(seq, num_pairs=seq.logps.shape[0] // 2).loss + 0.1 * seq.logps.sum()


def _values_and_grads(model, batch, nll_on_prompt: bool, plain: bool = False):
    model.zero_grad()
    if plain:
        seq = plain_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt)
    else:
        seq = model_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt, chunk_size=7)
    _objective(seq).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return seq, grads


def test_docstring_example_exact_tensors() -> None:
    feature = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3, 4], "rejected_input_ids": [5]}
    batch = SharedPromptCollator(pad_token_id=0, pad_to_multiple_of=4)([feature])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 0, 0]]
    assert batch["attention_mask"].shape == (1, 1, 8, 8) and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"][0, 0, 4].int().tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    assert batch["attention_mask"][0, 0, 3].int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # chosen: causal
    assert batch["attention_mask"][0, 0, 6].int().tolist() == [1, 1, 1, 1, 1, 1, 1, 0]  # padding: causal
    assert batch["label_positions"].tolist() == [0, 1, 2, 1]
    assert batch["label_ids"].tolist() == [2, 3, 4, 5]
    assert batch["label_sequences"].tolist() == [0, 0, 0, 1]
    assert batch["label_is_prompt"].tolist() == [True, False, False, False]
    assert (batch["num_pairs"], batch["conversation_tokens"], batch["input_tokens"]) == (1, 7, 5)


def test_labels_of_two_pairs_and_an_empty_prompt() -> None:
    features = [
        {"prompt_input_ids": [], "chosen_input_ids": [3, 4], "rejected_input_ids": [5, 6]},
        {"prompt_input_ids": [7], "chosen_input_ids": [8], "rejected_input_ids": [9]},
    ]
    batch = SharedPromptCollator(pad_token_id=0, pad_to_multiple_of=1)(features)
    # Pair 0 has no prompt: its first chosen and first rejected tokens have nothing to predict them.
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6], [7, 8, 9, 0]]
    assert batch["label_positions"].tolist() == [0, 2, 4, 4]  # row 1 starts at flat index 4
    assert batch["label_ids"].tolist() == [4, 6, 8, 9]
    assert batch["label_sequences"].tolist() == [0, 2, 1, 3]  # chosen_0, rejected_0, chosen_1, rejected_1
    # A stacked batch of the same pairs predicts the same tokens for the same sequences.
    stacked = batch_labels(PreferenceCollator(0, 1)(features), nll_on_prompt=False)
    shared = batch_labels(batch, nll_on_prompt=False)
    assert sorted(zip(stacked.sequences.tolist(), stacked.ids.tolist())) == sorted(
        zip(shared.sequences.tolist(), shared.ids.tolist())
    )


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_shared_prompt_equals_stacked_values_and_gradients(tiny_model_and_tokenizer, nll_on_prompt) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    model.train()
    features = _features(tokenizer)
    stacked, stacked_grads = _values_and_grads(model, PreferenceCollator(tokenizer.pad_token_id)(features), nll_on_prompt)
    shared_batch = SharedPromptCollator(tokenizer.pad_token_id)(features)
    assert shared_batch["input_ids"].numel() < 2 * len(features) * max(f["length"] for f in features)
    for plain in (False, True):
        shared, shared_grads = _values_and_grads(model, shared_batch, nll_on_prompt, plain=plain)
        for field in ("logps", "nll_sum", "nll_tokens", "completion_tokens"):
            torch.testing.assert_close(getattr(shared, field), getattr(stacked, field), rtol=1e-5, atol=1e-6)
        assert shared_grads.keys() == stacked_grads.keys()
        for name, grad in stacked_grads.items():
            torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_eager_attention_gets_an_additive_mask(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    features = _features(tokenizer)
    expected, _ = _values_and_grads(model, PreferenceCollator(tokenizer.pad_token_id)(features), True)
    model.config._attn_implementation = "eager"
    assert shared_prompt_unsupported(model) is None
    got, _ = _values_and_grads(model, SharedPromptCollator(tokenizer.pad_token_id)(features), True)
    torch.testing.assert_close(got.logps, expected.logps, rtol=1e-5, atol=1e-6)


def test_unsupported_models_are_named(tiny_model_and_tokenizer) -> None:
    model, _ = tiny_model_and_tokenizer
    assert shared_prompt_unsupported(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prompt_unsupported(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 64
    assert "sliding" in shared_prompt_unsupported(model, max_length=96)
    assert shared_prompt_unsupported(model, max_length=16) is None  # a row of 2 x 16 fits the window


def test_layouts_and_row_lengths() -> None:
    feature = {"prompt_length": 3, "chosen_length": 5, "rejected_length": 2}
    assert row_length(feature, "shared_prompt") == 10
    assert row_length(feature, "stacked") == 8
    assert isinstance(make_collator("stacked", 0), PreferenceCollator)
    with pytest.raises(ValueError, match="unknown batch layout 'packed'"):
        make_collator("packed", 0)


@pytest.mark.parametrize(("scale", "softcap"), [(None, None), (0.5, None), (None, 3.0), (2.0, 5.0)])
def test_frozen_output_embedding_gradient_computed_in_forward(scale, softcap) -> None:
    """A frozen weight (LoRA) takes the precomputed path; its hidden-state gradient equals the recomputing path's."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(17, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 17, (11,), generator=generator)
    upstream = torch.randn(11, generator=generator, dtype=torch.float64)
    grads = []
    for weight_trainable in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_trainable)
        out = _ChunkedTokenLogps.apply(h, w, None, targets, 4, scale, softcap)
        (out * upstream).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    # and against finite differences of the frozen path
    w = weight.clone()
    check = torch.autograd.gradcheck(
        lambda h: _ChunkedTokenLogps.apply(h, w, None, targets, 4, scale, softcap), (hidden.clone().requires_grad_(),)
    )
    assert check


def test_preference_margins_are_the_same_in_either_layout(tiny_model_and_tokenizer) -> None:
    from evals.preference import pair_margins

    model, tokenizer = tiny_model_and_tokenizer
    shared = pair_margins(model, tokenizer, EXAMPLES, max_length=96, max_prompt_length=48)
    model.config.sliding_window = 8  # forces the stacked layout
    stacked = pair_margins(model, tokenizer, EXAMPLES, max_length=96, max_prompt_length=48)
    assert shared == pytest.approx(stacked, rel=1e-4, abs=1e-5)
