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


# --- hub ids: one lookup per run, and the same pinned commit with or without the hub ---------------------

HUB_ID = "example-org/example-model"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """`huggingface_hub.model_info` counted (answering SHA, or raising `hub.error`), an empty HF cache."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    class Hub:
        error: Exception | None = None
        offline = False
        cache = tmp_path / "hf-cache"

        @staticmethod
        def cache_snapshot(commit: str) -> None:
            repo = Hub.cache / f"models--{HUB_ID.replace('/', '--')}"
            (repo / "snapshots" / commit).mkdir(parents=True)
            (repo / "snapshots" / commit / "config.json").write_text("{}")
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text(commit)

    def model_info(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        if Hub.error is not None:
            raise Hub.error
        return type("Info", (), {"sha": SHA})()

    Hub.calls = calls
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: Hub.offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Hub.cache))
    return Hub


def test_preflight_and_pin_ask_the_hub_once(hub, tmp_path):
    from orpo.models import check_model_available, pin_model

    check_model_available(HUB_ID, tmp_path)
    pinned = pin_model(HUB_ID, tmp_path)
    assert len(hub.calls) == 1
    assert (pinned.revision, pinned.identity) == (SHA, f"{HUB_ID}@{SHA}")
    # The probe's answer serves one pin: a later pin (the next night, in a served flow) asks again.
    pin_model(HUB_ID, tmp_path)
    assert len(hub.calls) == 2


@pytest.mark.parametrize("offline", [True, False])
def test_without_the_hub_a_cached_model_pins_its_snapshot_commit(hub, tmp_path, offline):
    from orpo.models import check_model_available, pin_model

    cached = "fedcba9876543210fedcba9876543210fedcba98"
    hub.cache_snapshot(cached)
    hub.offline = offline
    hub.error = None if offline else ConnectionError("connection refused")
    check_model_available(HUB_ID, tmp_path)
    assert pin_model(HUB_ID, tmp_path).identity == f"{HUB_ID}@{cached}"  # not @main: no retrain the next night
    assert pin_model(HUB_ID, tmp_path).identity == f"{HUB_ID}@{cached}"  # without the pre-flight too
    assert len(hub.calls) == (0 if offline else 2)


def test_unreachable_hub_without_a_cached_copy_still_fails_clearly(hub, tmp_path):
    from orpo.models import check_model_available

    hub.error = ConnectionError("connection refused")
    with pytest.raises(ModelResolutionError, match="cannot reach the Hugging Face hub .* no cached copy"):
        check_model_available(HUB_ID, tmp_path)
