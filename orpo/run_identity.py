"""What makes two training runs the same: their inputs, hashed into one key stored on each registered version.

A run's inputs are
- the data fingerprint (sha256 over the binarized pairs: covers the source and every data option),
- the configuration's semantic hash (the fields that change the trained weights; not run names, paths,
  evaluation, registry or orchestration settings),
- the start model pinned to one exact version (`models:/NAME/N`, a hub id at a commit, a built-in),
- the code revision (git commit, plus a digest of uncommitted changes when the tree is dirty).

A nightly run whose key is already on a registered version (tag `run_inputs`) has nothing new to learn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from orpo.config import ConfigError, PipelineConfig

log = logging.getLogger(__name__)

TAG_RUN_INPUTS = "run_inputs"
TAG_PREFIX = "run_inputs."

# Fields that never change the trained weights. Everything else in `model` and `train` counts; the data
# section counts through the data fingerprint (which hashes the pairs its options produced). The accelerate
# config's path does not count, its number of processes does (`training_processes`).
NON_MODEL_TRAIN_FIELDS = {"output_dir", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                         "accelerate_config",
                         # How the same numbers are computed: chunked log-probs, padding, the setup self-check
                         # (its fallback keeps the batches' pairs; orpo.train), equal up to float rounding.
                         "logprob_chunk_size", "pad_to_multiple_of", "setup_self_check"}
_IGNORED_MODEL_FIELDS = {"name_or_path", "revision", "cache_dir"}  # the pinned start model replaces these


def training_processes(config: PipelineConfig) -> int | str:
    """How many processes train: the accelerate config's `num_processes` (all machines together), 1 without one
    or in-process. It multiplies the global batch, so it changes the model; the file's path does not."""
    path = config.train.accelerate_config
    if not path or not config.orchestration.launch_with_accelerate:
        return 1
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"train.accelerate_config: cannot read {path} ({exc}); point it at one of "
                          "configs/accelerate/*.yaml or unset it for one process") from None
    # Absent, accelerate launches one process per visible GPU: recorded as such, not guessed here.
    return settings.get("num_processes", "all visible GPUs") if isinstance(settings, dict) else 1


def semantic_config_hash(config: PipelineConfig) -> str:
    """A hash of the configuration fields that change the model (not where or how the run is organised)."""
    payload = {
        "model": config.model.model_dump(mode="json", exclude=_IGNORED_MODEL_FIELDS),
        "train": config.train.model_dump(mode="json", exclude=NON_MODEL_TRAIN_FIELDS),
    }
    processes = training_processes(config)
    if processes != 1:  # absent for one process, so single-process hashes stay what they were
        payload["train"]["processes"] = processes
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# The project's code, wherever it is installed (a checkout, or site-packages without .git).
_SOURCE_PACKAGES = ("orpo", "evals", "tasks", "flows")
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the directory holding those packages


def source_digest(root: Path) -> str:
    """A digest of the files of the project's packages under `root` (not caches): what runs, without git."""
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        files = sorted(p for p in (root / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_revision() -> str:
    """The project's git commit; with uncommitted changes, `<commit>+dirty.<digest of the diff>`; where git cannot
    answer, `source.<digest of the packages' files>` (a constant would hide every code change)."""
    root = PROJECT_ROOT

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD", "--", ".")
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("git cannot name the code revision in %s (%s); identifying the code by its files", root,
                    getattr(exc, "stderr", None) or exc)
        return f"source.{source_digest(root)}"
    if not diff:
        return commit
    return f"{commit}+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class RunInputs:
    """The inputs that determine a trained model; `key` identifies them."""

    data_fingerprint: str
    config_hash: str
    start_model: str
    code_revision: str

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def tags(self) -> dict[str, str]:
        """Version tags: the key (searchable) and each input (readable)."""
        return {TAG_RUN_INPUTS: self.key, **{TAG_PREFIX + k: str(v)[:5000] for k, v in asdict(self).items()}}


def run_inputs(config: PipelineConfig, data_fingerprint: str, start_model_identity: str,
               revision: str | None = None) -> RunInputs:
    return RunInputs(
        data_fingerprint=data_fingerprint,
        config_hash=semantic_config_hash(config),
        start_model=start_model_identity,
        code_revision=revision if revision is not None else code_revision(),
    )
