"""Batched generation: same greedy text as one at a time, sampling reproducible, official output formats."""

from __future__ import annotations

import json

import pytest

from evals.generate import generate, generate_alpaca_outputs, render_prompts, write_json
from evals.sources import load_alpaca_eval, seeded_subset

CONVERSATIONS = [
    [{"role": "user", "content": "Two plus two?"}],
    [{"role": "user", "content": "Please write a short poem about the sea and the quick brown fox."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "The capital of France is"}],
]


def test_batched_greedy_matches_one_at_a_time(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    batched = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=12, batch_size=4)
    single = [generate(model, tokenizer, [c], max_new_tokens=12, batch_size=1)[0] for c in CONVERSATIONS]
    assert [g[0].text for g in batched] == [g[0].text for g in single]
    assert [g[0].new_tokens for g in batched] == [g[0].new_tokens for g in single]
    assert all(0 <= g[0].new_tokens <= 12 for g in batched)


def test_left_padding_and_chat_template(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    ids = render_prompts(tokenizer, CONVERSATIONS[:1])[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nTwo plus two?") and text.endswith("<|im_start|>assistant\n")


def test_sampling_is_seeded_and_gives_k_samples(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    first = generate(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=8, temperature=1.0, num_samples=3, seed=5)
    again = generate(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=8, temperature=1.0, num_samples=3, seed=5)
    assert [len(g) for g in first] == [3, 3]
    assert [[s.text for s in g] for g in first] == [[s.text for s in g] for g in again]
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, CONVERSATIONS[:1], num_samples=2, temperature=0.0)


def test_alpaca_outputs_format(tiny_model_and_tokenizer, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    rows = load_alpaca_eval("data/samples/eval/alpaca_eval_sample.json", limit=3, seed=1)
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    outputs = generate_alpaca_outputs(model, tokenizer, rows, generator="tiny", max_new_tokens=5, batch_size=2)
    path = write_json(outputs, tmp_path / "model_outputs.json")
    loaded = json.loads(path.read_text())
    assert [set(r) for r in loaded] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert [r["instruction"] for r in loaded] == [r["instruction"] for r in rows]


def test_seeded_subset():
    rows = list(range(100))
    assert seeded_subset(rows, 10, 0) == seeded_subset(rows, 10, 0)
    assert seeded_subset(rows, 10, 0) != seeded_subset(rows, 10, 1)
    assert seeded_subset(rows, None, 0) == rows and seeded_subset(rows, 500, 0) == rows


def test_alpaca_source_errors_name_the_record(tmp_path):
    from evals.sources import SourceError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z"}]))
    with pytest.raises(SourceError, match="record 1 has no output"):
        load_alpaca_eval(str(bad))


def test_shared_alpaca_eval_file_loads(shared_data):
    rows = load_alpaca_eval(str(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"), limit=32, seed=0)
    assert len(rows) == 32 and all(r["generator"] == "gpt4_1106_preview" for r in rows)


def test_end_of_turn_marker_comes_from_the_chat_template(tiny_model_and_tokenizer):
    from evals.generate import end_of_turn_marker

    _, tokenizer = tiny_model_and_tokenizer
    assert end_of_turn_marker(tokenizer) == "<|im_end|>"
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    assert end_of_turn_marker(tokenizer) == "</s>"


def test_generation_stops_at_the_end_of_turn_and_never_saves_it(tiny_model_and_tokenizer, monkeypatch):
    """A reply that runs past its turn end (marker in several tokens, no EOS) is cut where the turn ends."""
    import torch

    model, tokenizer = tiny_model_and_tokenizer
    continuation = tokenizer("Hello there<|im_end|>\n<|im_start|>user\nAn invented turn", add_special_tokens=False)
    seen = {}

    def fake_generate(input_ids, attention_mask, generation_config, tokenizer=None):
        seen.update(stop_strings=generation_config.stop_strings, eos=generation_config.eos_token_id, tok=tokenizer)
        tail = torch.tensor([continuation["input_ids"]] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    [[reply]] = generate(model, tokenizer, CONVERSATIONS[:1], max_new_tokens=64)
    assert reply.text == "Hello there"
    assert seen["stop_strings"] == ["<|im_end|>"] and seen["tok"] is tokenizer
