"""Chat templates that end turns: a SentencePiece-style tokenizer without a template (like Mistral-7B-v0.1's)
gets turns closed by EOS and BOS where its post-processor puts it; a model trained on them learns to stop,
and the exported tokenizer carries the template."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train import BAD, GOOD, toy_config, toy_pairs

from orpo.chat_template import (
    NAMED_TEMPLATES,
    ZEPHYR_TEMPLATE,
    ChatTemplateError,
    apply_chat_template_config,
    fallback_template,
    load_named_or_file,
    post_processor_adds_bos,
)
from orpo.collate import tokenize_pair


def build_sentencepiece_style_tokenizer():
    """A Unigram tokenizer with Metaspace pre-tokenization and a `<s> $A` post-processor (the layout of
    Llama-2 / Mistral tokenizers) over the toy vocabulary: whole words, and their characters for the rest;
    no chat template. The vocabulary is written out rather than trained: the Unigram trainer's result
    varies from process to process, and with it what the training test below learns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({*GOOD, *BAD, "Please", "write", "<|user|>", "<|assistant|>", "<|system|>"})
    characters = sorted(set("".join(words)))
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("\u2581", -4.0)]
    vocab += [("\u2581" + word, -2.0) for word in words]
    vocab += [(piece, -6.0) for c in characters for piece in (c, "\u2581" + c)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="</s>")
    assert tokenizer.chat_template is None
    return tokenizer


def save_tiny_sentencepiece_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_sentencepiece_style_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_fallback_ends_every_response_with_eos_and_starts_with_bos_like_the_post_processor():
    tokenizer = build_sentencepiece_style_tokenizer()
    assert post_processor_adds_bos(tokenizer)
    apply_chat_template_config(tokenizer, None)
    assert tokenizer.chat_template == fallback_template(tokenizer) == "{{ bos_token }}" + ZEPHYR_TEMPLATE
    for pair in toy_pairs(6, seed=3):
        feature = tokenize_pair(pair, tokenizer, 128, 64)
        assert feature["chosen_input_ids"][-1] == tokenizer.eos_token_id
        assert feature["rejected_input_ids"][-1] == tokenizer.eos_token_id
        # BOS exactly as the tokenizer itself adds it: once, first.
        prompt_text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        without_bos = prompt_text.removeprefix(tokenizer.bos_token)
        assert feature["prompt_input_ids"] == tokenizer(without_bos)["input_ids"]
        assert feature["prompt_input_ids"].count(tokenizer.bos_token_id) == 1


def test_fallback_gives_the_ids_trl_builds_from_the_authors_template():
    """TRL's ORPOTrainer renders with the tokenizer's template (here the authors' Zephyr template, which writes
    no BOS), tokenizes without special tokens, then prepends BOS and appends EOS where missing. Our fallback
    writes both into the text: one BOS first and EOS last, as TRL has them."""
    from trl.experimental.utils import add_bos_token_if_needed, add_eos_token_if_needed

    import copy

    ours_tokenizer = apply_chat_template_config(build_sentencepiece_style_tokenizer(), None)
    trl_tokenizer = copy.deepcopy(ours_tokenizer)  # the same vocabulary (Unigram training is not reproducible)
    trl_tokenizer.chat_template = ZEPHYR_TEMPLATE
    for pair in toy_pairs(4, seed=4):
        ours = tokenize_pair(pair, ours_tokenizer, 128, 64)
        prompt = trl_tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        sides = {}
        for side in ("chosen", "rejected"):
            full = trl_tokenizer.apply_chat_template(pair[side], tokenize=False)
            sides[side] = {"input_ids": trl_tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"],
                           "attention_mask": [], "prompt_input_ids": [], "prompt_attention_mask": []}
        prompt_ids = trl_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt_tokens = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
        prompt_tokens, chosen, rejected = add_bos_token_if_needed(
            trl_tokenizer.bos_token_id, len(prompt_ids), prompt_tokens, 0, sides["chosen"], 0, sides["rejected"]
        )
        chosen, rejected = add_eos_token_if_needed(trl_tokenizer.eos_token_id, chosen, rejected)
        # TRL tokenizes the response alone, so SentencePiece gives it a leading space the conversation does
        # not have (we split one tokenized conversation, see tokenize_pair): compare the special tokens.
        bos, eos = trl_tokenizer.bos_token_id, trl_tokenizer.eos_token_id
        for side, trl_side in (("chosen", chosen), ("rejected", rejected)):
            our_ids = ours["prompt_input_ids"] + ours[f"{side}_input_ids"]
            trl_ids = prompt_tokens["prompt_input_ids"] + trl_side["input_ids"]
            assert our_ids[0] == trl_ids[0] == bos and our_ids.count(bos) == trl_ids.count(bos) == 1
            assert our_ids[-1] == trl_ids[-1] == eos and our_ids.count(eos) == trl_ids.count(eos)


def test_named_templates_and_files(tmp_path):
    assert load_named_or_file("zephyr") == NAMED_TEMPLATES["zephyr"]
    file = tmp_path / "template.jinja"
    file.write_text("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    assert load_named_or_file(str(file)) == file.read_text()
    with pytest.raises(ChatTemplateError, match=r"model.chat_template: 'zepyhr' is neither a template name"):
        load_named_or_file("zepyhr")
    tokenizer = build_sentencepiece_style_tokenizer()
    apply_chat_template_config(tokenizer, str(file))
    assert tokenizer.chat_template == file.read_text()  # a file is used as written


def test_zephyr_renders_the_authors_layout():
    tokenizer = build_sentencepiece_style_tokenizer()
    apply_chat_template_config(tokenizer, "zephyr")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s><|user|>\nHi</s>\n<|assistant|>\nHello</s>"
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>\nHi</s>\n<|assistant|>\n"
    )


@pytest.mark.slow
def test_trained_model_stops_by_itself_and_export_carries_the_template(tmp_path):
    """Full fine-tuning on pairs whose responses end with EOS: greedy generation from a training prompt then
    emits EOS well before the token limit, and the exported tokenizer renders with the same template."""
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo.train import train

    model_dir = save_tiny_sentencepiece_llama(tmp_path / "sp-llama")
    # Short chosen answers (two or three words), so where a reply ends is easy to learn.
    pairs = toy_pairs(64, seed=1)
    for index, pair in enumerate(pairs):
        words = pair["chosen"][-1]["content"].split()[: 2 + index % 2]
        pair["chosen"][-1]["content"] = " ".join(words)
    DatasetDict({"train": Dataset.from_list(pairs)}).save_to_disk(str(tmp_path / "data"))
    config = toy_config(tmp_path, model_dir, max_steps=150, logging_steps=50, lora={"enabled": False})
    result = train(config, tmp_path / "data", tmp_path / "out")

    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer.chat_template == "{{ bos_token }}" + ZEPHYR_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    replies = []
    for pair in pairs[:4]:
        text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        replies.append(out[0, ids.shape[1]:].tolist())
    # Without EOS in the training responses the model would go on to the token limit.
    assert all(tokenizer.eos_token_id in reply[:30] for reply in replies), [tokenizer.decode(r) for r in replies]
