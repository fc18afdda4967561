"""Collation: chat template, prompt/response split, truncation, stacked padding, length grouping."""

from __future__ import annotations

import random

import pytest
import torch

from orpo.collate import (
    PreferenceCollator,
    length_grouped_indices,
    padding_stats,
    shared_prompt_length,
    split_conversation,
    tokenize_pair,
)
from orpo.models import CHATML_TEMPLATE, build_tiny_tokenizer

PAIR = {
    "chosen": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "rejected": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "I am not sure."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_collator_docstring_example_exact_tensors() -> None:
    features = [
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [3, 4], "rejected_input_ids": [5]},
        {"prompt_input_ids": [6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9, 10]},
    ]
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    expected = {
        "input_ids": [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]],
        "attention_mask": [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
        "completion_mask": [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]],
        "prompt_mask": [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]],
    }
    for key, value in expected.items():
        assert batch[key].dtype == torch.long, key
        assert batch[key].tolist() == value, key
    assert batch["num_pairs"] == 2


def test_collator_pads_to_multiple_of_eight() -> None:
    features = [{"prompt_input_ids": [1] * 5, "chosen_input_ids": [2] * 4, "rejected_input_ids": [3] * 7}]
    batch = PreferenceCollator(pad_token_id=9)(features)
    assert batch["input_ids"].shape == (2, 16)  # longest row 12 -> 16
    assert batch["input_ids"][0, 9:].eq(9).all() and batch["input_ids"][1, 12:].eq(9).all()
    exact = PreferenceCollator(pad_token_id=9)([{**features[0], "rejected_input_ids": [3] * 11}])
    assert exact["input_ids"].shape == (2, 16)  # already a multiple: no extra padding


def test_tokenize_pair_splits_prompt_and_response_on_the_chat_template(tokenizer) -> None:
    out = tokenize_pair(PAIR, tokenizer, max_length=256, max_prompt_length=128)
    prompt_text = tokenizer.apply_chat_template(PAIR["chosen"][:1], tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert out["prompt_input_ids"] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(out["chosen_input_ids"]) == "The capital of France is Paris.<|im_end|>\n"
    assert tokenizer.decode(out["rejected_input_ids"]) == "I am not sure.<|im_end|>\n"
    full_text = tokenizer.apply_chat_template(PAIR["chosen"], tokenize=False)
    assert tokenizer.decode(out["prompt_input_ids"] + out["chosen_input_ids"]) == full_text
    assert out["prompt_length"] == len(out["prompt_input_ids"])
    assert out["length"] == out["prompt_length"] + max(out["chosen_length"], out["rejected_length"])


def test_tokenize_pair_truncates_prompt_left_and_response_right(tokenizer) -> None:
    full = tokenize_pair(PAIR, tokenizer, max_length=256, max_prompt_length=128)
    prompt_len, chosen_len = len(full["prompt_input_ids"]), len(full["chosen_input_ids"])
    keep_prompt = prompt_len - 3
    max_length = keep_prompt + chosen_len - 2
    short = tokenize_pair(PAIR, tokenizer, max_length=max_length, max_prompt_length=keep_prompt)
    assert short["prompt_input_ids"] == full["prompt_input_ids"][-keep_prompt:]  # the end of the prompt stays
    assert short["chosen_input_ids"] == full["chosen_input_ids"][: chosen_len - 2]  # the start of the answer stays
    assert short["rejected_input_ids"] == full["rejected_input_ids"][: max_length - keep_prompt]
    assert short["prompt_length"] + short["chosen_length"] == max_length


def test_tokenize_pair_accepts_trl_layout_and_falls_back_to_turns_ending_in_eos(tokenizer) -> None:
    reference = tokenize_pair(PAIR, tokenizer, max_length=256, max_prompt_length=128)
    trl_layout = {
        "prompt": [PAIR["chosen"][0]],
        "chosen": [PAIR["chosen"][1]],
        "rejected": [PAIR["rejected"][1]],
    }
    assert tokenize_pair(trl_layout, tokenizer, 256, 128) == reference
    strings = {"prompt": PAIR["chosen"][0]["content"], "chosen": PAIR["chosen"][1]["content"],
               "rejected": PAIR["rejected"][1]["content"]}
    assert tokenize_pair(strings, tokenizer, 256, 128) == reference

    # Without a template the fallback closes every turn with EOS (orpo.chat_template), so each response
    # ends with it; this byte-level tokenizer adds no BOS itself, so none is written.
    no_template = build_tiny_tokenizer()
    no_template.chat_template = None
    fallback = tokenize_pair(PAIR, no_template, 256, 128)
    assert fallback["chosen_input_ids"][-1] == fallback["rejected_input_ids"][-1] == no_template.eos_token_id
    assert fallback["prompt_input_ids"][0] != no_template.bos_token_id
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_tokenize_pair_handles_templates_whose_generation_prompt_is_not_a_prefix(tokenizer) -> None:
    odd = build_tiny_tokenizer()
    # Like reasoning models' templates: the generation prompt opens a block the rendered history lacks.
    odd.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    )
    out = tokenize_pair(PAIR, odd, 256, 128)
    assert odd.decode(out["prompt_input_ids"]).endswith("<|im_start|>assistant\n<think>\n")
    assert odd.decode(out["chosen_input_ids"]) == "The capital of France is Paris.<|im_end|>"


def test_shared_prompt_length_moves_boundary_merges_into_the_response() -> None:
    assert shared_prompt_length([1, 2, 3], [1, 2, 3, 4], [1, 2, 3]) == 3
    assert shared_prompt_length([1, 2, 3], [1, 2, 3, 4], [1, 2, 9, 5]) == 2  # "3" merged into "9" on one side
    assert shared_prompt_length([1, 2, 3], [7, 2, 3]) == 0


def test_tokenize_pair_splits_where_the_joint_tokenization_does(tokenizer) -> None:
    """A template whose generation prompt ends mid-word: "Sure" + "ly" tokenize jointly as one piece,
    so the boundary token moves to the responses and prompt + response is the joint tokenization."""
    odd = build_tiny_tokenizer()
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: Sure' + m['content'] + '<|im_end|>' }}"
        "{% else %}{{ 'Q: ' + m['content'] + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: Sure' }}{% endif %}"
    )
    pair = {"prompt": "Hi", "chosen": "ly, the capital", "rejected": "ly not"}
    out = tokenize_pair(pair, odd, 256, 128)
    for side, text in (("chosen_input_ids", "ly, the capital"), ("rejected_input_ids", "ly not")):
        joint = odd("Q: Hi A: Sure" + text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert out["prompt_input_ids"] + out[side] == joint
    alone = odd("Q: Hi A: Sure", add_special_tokens=False)["input_ids"]
    assert out["prompt_input_ids"] == alone[: len(out["prompt_input_ids"])]
    assert len(out["prompt_input_ids"]) < len(alone)  # the merge happened: "ure" alone, "ur" + "el" jointly


def test_split_conversation_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="'rejected'"):
        split_conversation({"chosen": PAIR["chosen"]})
    with pytest.raises(ValueError, match="differ"):
        other = [{"role": "user", "content": "Something else"}, PAIR["rejected"][1]]
        split_conversation({"chosen": PAIR["chosen"], "rejected": other})
    with pytest.raises(ValueError, match="no prompt"):
        split_conversation({"chosen": "a", "rejected": "b"})


def test_length_grouped_indices_deterministic_permutation_longest_first() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(1000)]
    first = length_grouped_indices(lengths, batch_size=4, seed=7, mega_batch_mult=10)
    assert first == length_grouped_indices(lengths, batch_size=4, seed=7, mega_batch_mult=10)
    assert first != length_grouped_indices(lengths, batch_size=4, seed=8, mega_batch_mult=10)
    assert sorted(first) == list(range(len(lengths)))
    assert max(lengths[i] for i in first[:4]) == max(lengths)
    # Not simply sorted: batches of a mega-batch come in shuffled order.
    batch_max = [max(lengths[i] for i in first[j : j + 4]) for j in range(0, len(first), 4)]
    assert batch_max[1:11] != sorted(batch_max[1:11], reverse=True)


def _padding_fraction(order: list[int], features: list[dict], batch_size: int) -> float:
    collate = PreferenceCollator(pad_token_id=0)
    real = total = 0.0
    for start in range(0, len(order), batch_size):
        stats = padding_stats(collate([features[i] for i in order[start : start + batch_size]]))
        real += stats["real_tokens"]
        total += stats["total_tokens"]
    return 1.0 - real / total


def test_length_grouping_reduces_padding() -> None:
    rng = random.Random(1)
    features = []
    for _ in range(400):  # long-tailed lengths, like UltraFeedback
        prompt = int(rng.lognormvariate(4.0, 0.8)) + 1
        features.append({
            "prompt_input_ids": [1] * prompt,
            "chosen_input_ids": [2] * (int(rng.lognormvariate(5.0, 0.7)) + 1),
            "rejected_input_ids": [3] * (int(rng.lognormvariate(5.0, 0.7)) + 1),
        })
    lengths = [len(f["prompt_input_ids"]) + max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"]))
               for f in features]
    shuffled = list(range(len(features)))
    random.Random(2).shuffle(shuffled)
    grouped = length_grouped_indices(lengths, batch_size=4, seed=3)
    random_waste = _padding_fraction(shuffled, features, 4)
    grouped_waste = _padding_fraction(grouped, features, 4)
    # Chosen and rejected share a row length, so a pair alone already pads; grouping cannot remove that.
    floor = _padding_fraction(list(range(len(features))), features, 1)
    assert grouped_waste < random_waste
    assert grouped_waste - floor < 0.25 * (random_waste - floor)


def test_padding_stats_counts_real_and_padded_tokens() -> None:
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    assert padding_stats(batch) == {
        "real_tokens": 4.0, "padding_tokens": 4.0, "total_tokens": 8.0, "padding_fraction": 0.5,
    }
