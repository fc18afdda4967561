"""The model resolver: built-in models convert once and are reused; bad specs explain themselves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orpo.config import ModelConfig
from orpo.models import (
    SMOLLM2,
    TINY_LLAMA,
    ModelResolutionError,
    load_model_and_tokenizer,
    resolve_model,
)


def test_smollm2_gguf_converts_once_then_is_reused(tmp_path):
    """First call converts the shipped GGUF to safetensors; the second finds the cached copy at once."""
    started = time.perf_counter()
    first = resolve_model(SMOLLM2, tmp_path)
    convert_s = time.perf_counter() - started
    directory = Path(first.path)
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer_config.json").is_file()
    assert (directory / ".orpo-complete").is_file()
    stamp = (directory / "model.safetensors").stat().st_mtime_ns

    started = time.perf_counter()
    second = resolve_model(SMOLLM2, tmp_path)
    reuse_s = time.perf_counter() - started
    assert second.path == first.path
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert reuse_s < 0.5 and reuse_s < convert_s / 10

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=first.path))
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 49152
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_crashed_build_leaves_nothing_that_counts_as_done(tmp_path, monkeypatch):
    import orpo.models as models

    def broken(target):
        def build(tmp):
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
        return models._atomic_build(target, build)

    with pytest.raises(RuntimeError, match="disk full"):
        broken(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob("m.tmp-*"))


def test_tiny_llama_builtin_is_cached_and_loadable(tmp_path):
    resolved = resolve_model(TINY_LLAMA, tmp_path)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=resolved.path))
    assert model.config.num_hidden_layers == 2
    assert tokenizer.chat_template is not None
    assert tokenizer.pad_token_id is not None


def test_hub_ids_pass_through_and_bad_specs_fail_clearly(tmp_path):
    hub = resolve_model("mistralai/Mistral-7B-v0.1", tmp_path)
    assert hub.path == "mistralai/Mistral-7B-v0.1" and not hub.is_local
    with pytest.raises(ModelResolutionError, match="unknown built-in model"):
        resolve_model("builtin:gpt-5", tmp_path)
    with pytest.raises(ModelResolutionError, match="neither an existing directory nor a hub id"):
        resolve_model("./no/such/dir", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(empty), tmp_path)


def test_loading_refuses_pickle_weights(tmp_path, tiny_model_and_tokenizer):
    """Weights load from safetensors only: a directory with only a pickled checkpoint is refused."""
    import torch

    model, tokenizer = tiny_model_and_tokenizer
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what an old or untrusted checkpoint holds
    with pytest.raises(OSError):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
