"""MLflow: the training run, the registered model version, its lineage, and its evaluation.

Every completed training export becomes one version of `registry.registered_model_name`:

    version = register_training_run(config, "runs/train/my-run")   # alias `challenger`
    log_evaluation(config, version, {"mt_bench/score": 6.1, ...}, "runs/eval/my-run")
    decision = orpo.gate.promote(config, version)                  # maybe alias `champion`

The version page answers on its own what data (fingerprint, recipe), what code (git commit), what config
(hash, ORPO lambda, the resolved YAML), what base model (pinned: `models:/NAME/N`, never an alias), what
it scored and whether it beat the champion. The run's inputs (`orpo.run_identity`) are tags too, so
`find_version_with_inputs` finds a version trained from the same data, config, start model and code.

The model is logged with MLflow's transformers flavor (task text-generation) so that
`mlflow.transformers.load_model("models:/NAME@champion")` returns a generation pipeline:

- full fine-tuning: the exported directory is logged as a local checkpoint (never loaded into memory);
- LoRA: the adapter only. Its `adapter_config.json` names the base portably (a hub id, a built-in or
  `models:/NAME/N`; an adapter on any other local directory is refused), which is what `orpo.models`
  resolves on any machine. MLflow's own loader additionally gets the local base directory
  (`base_model_path`) when there is one, or the hub id and commit, as MLflow does for PEFT models.
  `registry.log_merged_model` also logs the adapter merged into its base (`merged_model`, not registered).

The default store is `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts`; any other
tracking URI (a real `mlflow server`) comes from the config or `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from orpo.config import PipelineConfig, flatten, load_config
from orpo.errors import OrpoError
from orpo.handoffs import (
    EXPORT_MARKER,
    MANIFEST,
    TRAIN_RESULT,
    DataManifest,
    HandoffError,
    TrainResult,
    read_manifest,
    read_metrics_jsonl,
    read_train_result,
)
from orpo.run_identity import TAG_RUN_INPUTS, RunInputs

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"

MODEL_ARTIFACT = "model"
MERGED_MODEL_ARTIFACT = "merged_model"

# The version tag that makes registration idempotent: one version per training export.
TAG_REGISTRATION_KEY = "registration_key"
# Evaluation metrics shown as version tags (and in the description); the rest stay on the run.
HEADLINE_METRICS = (
    "mt_bench/score",
    "alpaca_eval2/win_rate",
    "alpaca_eval2/length_controlled_winrate",
    "alpaca/win_rate",
    "alpaca/length_controlled_winrate",
    "preference/accuracy",
    "preference/margin",
)
EVAL_TAG_PREFIX = "eval."

# Curves drawn from metrics.jsonl: (file name, title, metric names).
_CURVES = (
    ("loss_curves.png", "ORPO loss", ("loss", "nll_loss", "log_odds_ratio", "eval_loss", "eval_nll_loss")),
    (
        "logprob_curves.png",
        "log-probabilities and rewards",
        ("logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected",
         "rewards/chosen", "rewards/rejected", "rewards/margins", "log_odds_chosen"),
    ),
)
# Files up to this size are hashed whole for the registration key; larger weight shards are sampled.
_FULL_HASH_LIMIT = 256 * 1024 * 1024
_SAMPLE_BYTES = 4 * 1024 * 1024
_SECRET_KEY = re.compile(r"(^|[._])(password|passwd|token|secret_key|api_key|access_key)$", re.IGNORECASE)
_MAX_PARAM_LENGTH = 6000


class RegistrationError(OrpoError, ValueError):
    """A training directory that cannot be registered; the message says which file and what to do."""


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version and the MLflow run that produced it."""

    name: str
    version: str
    run_id: str
    model_uri: str  # models:/NAME/VERSION
    created: bool  # False when an existing version was returned (idempotent re-registration)

    @classmethod
    def existing(cls, model_version: Any) -> RegisteredVersion:
        """An MLflow ModelVersion that was already registered (not created by this call)."""
        name, number = model_version.name, str(model_version.version)
        return cls(name, number, model_version.run_id, f"models:/{name}/{number}", False)


@dataclass(frozen=True)
class TrainExport:
    """What `register_training_run` reads from a training output directory, checked."""

    train_dir: Path
    result: TrainResult
    model_dir: Path
    is_lora: bool
    metrics_path: Path | None
    key: str


# --- the store -----------------------------------------------------------------------------------------


# MLflow's own HTTP settings, for this process when the user has set none: its defaults (7 retries with
# backoff factor 2, 120 s per request) turn one unreachable server into minutes of silence. A few retries
# still ride out a server restart; a transfer counts as stalled after 60 s without bytes, not 120.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
TRACKING_CONNECT_TIMEOUT_S = 5.0


def check_tracking_server(uri: str) -> None:
    """An http(s) tracking server must accept a connection now: one clear error in seconds instead of
    MLflow's retries failing minutes later inside whichever call came first."""
    import socket
    import urllib.request

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return  # reached through a proxy, as MLflow's requests will be: a direct connect proves nothing
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=TRACKING_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        shown = _redact("tracking_uri", uri)
        raise RegistrationError(
            f"the MLflow tracking server {shown} cannot be reached ({exc.strerror or exc}); start it "
            "(`orpo stack up`, or `mlflow server`), or point registry.tracking_uri / MLFLOW_TRACKING_URI at a "
            "running server (unset both for the local sqlite store)"
        ) from None


def configure_mlflow(config: PipelineConfig) -> str:
    """Point MLflow (tracking and registry) at the configured store and experiment; returns the URI.

    With the default sqlite store the experiment's artifacts go to `<workdir>/mlartifacts`, next to the
    database, instead of MLflow's default `./mlruns` under whatever the current directory is.
    """
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow

    uri = config.resolved_tracking_uri()
    check_tracking_server(uri)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; left there, it would become the store of every
    # config resolved later in this process (resolved_tracking_uri reads it). Keep the user's value.
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    name = config.registry.experiment_name
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(name) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            artifact_location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        try:
            client.create_experiment(name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            if client.get_experiment_by_name(name) is None:  # not just a concurrent create
                raise
    mlflow.set_experiment(name)
    return uri


def mlflow_client() -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient()


def champion_uri(config: PipelineConfig) -> str | None:
    """`models:/NAME@champion` when the registered model has a champion, else None."""
    configure_mlflow(config)
    name = config.registry.registered_model_name
    return f"models:/{name}@{ALIAS_CHAMPION}" if _alias_version(mlflow_client(), name, ALIAS_CHAMPION) else None


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_metrics(client: MlflowClient, name: str, version: str) -> dict[str, float]:
    """The latest value of every metric logged to the run behind a model version."""
    model_version = client.get_model_version(name, version)
    if not model_version.run_id:
        return {}
    return dict(client.get_run(model_version.run_id).data.metrics)


# --- reading a training directory ----------------------------------------------------------------------


def read_train_export(train_dir: str | Path) -> TrainExport:
    """Check a training output directory and compute its registration key; never touches MLflow.

    Every path is resolved inside `train_dir` itself, so a moved directory registers and a copy is judged
    by its own files: a copy without the completeness marker is refused even when the original has one.
    """
    train_dir = Path(train_dir)
    result_path = train_dir / TRAIN_RESULT
    try:
        result = read_train_result(train_dir)
    except HandoffError as exc:
        raise RegistrationError(str(exc)) from None
    model_dir = result.model_dir
    if not model_dir.is_dir():
        raise RegistrationError(f"{result_path}: model_dir {model_dir} does not exist")
    if not (model_dir / EXPORT_MARKER).is_file():
        raise RegistrationError(
            f"{model_dir} has no {EXPORT_MARKER}: the export is incomplete (training crashed, is still "
            "writing, or the directory was copied before the export finished); it is never registered. "
            "Re-run the export or training."
        )
    is_lora = (model_dir / "adapter_config.json").is_file()
    if not is_lora and not (model_dir / "config.json").is_file():
        raise RegistrationError(f"{model_dir} holds neither config.json nor adapter_config.json")
    if result.is_lora != is_lora:
        raise RegistrationError(
            f"{result_path}: is_lora={result.is_lora} but {model_dir} "
            f"{'holds an adapter' if is_lora else 'holds a full model'}"
        )
    metrics_path = result.metrics_path
    key = _registration_key(result_path, model_dir)
    return TrainExport(train_dir, result, model_dir, is_lora, metrics_path if metrics_path.is_file() else None, key)


def _registration_key(result_path: Path, model_dir: Path) -> str:
    """A hash of train_result.json and the exported files (names, sizes, contents)."""
    digest = hashlib.sha256(result_path.read_bytes())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            if size <= _FULL_HASH_LIMIT:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            else:
                # Multi-GB shards: the head (safetensors header with every tensor's offsets), middle and
                # tail identify an export well enough, at a fraction of the read time.
                for offset in (0, size // 2, size - _SAMPLE_BYTES):
                    handle.seek(max(offset, 0))
                    digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metric_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for index, row in enumerate(rows):
        step = row.get("step", index)
        step = int(step) if _numeric(step) is not None else index
        for key, raw in row.items():
            value = _numeric(raw)
            if key != "step" and value is not None:
                series.setdefault(key, []).append((step, value))
    return series


def _read_manifest(path: Path | None) -> DataManifest:
    if path is None or not path.is_file():
        return DataManifest()
    try:
        return read_manifest(path)
    except (OSError, HandoffError) as exc:
        log.warning("data manifest %s is unreadable (%s); lineage tags will say unknown", path, exc)
        return DataManifest()


def _manifest_path(export: TrainExport, data_manifest: str | Path | None) -> Path | None:
    if data_manifest is not None:
        path = Path(data_manifest)
        if not path.is_file():
            raise RegistrationError(f"data manifest {path} does not exist")
        return path
    candidate = export.result.dataset_dir / MANIFEST
    if str(export.result.dataset_dir) not in ("", ".") and candidate.is_file():
        return candidate
    return None


def _training_config(export: TrainExport, fallback: PipelineConfig) -> PipelineConfig:
    """The config the model was trained with (its exported orpo_config.yaml), else the given one."""
    path = export.model_dir / "orpo_config.yaml"
    if path.is_file():
        try:
            return load_config(path)
        except ValueError as exc:
            log.warning("%s does not load with this version of the config (%s); using the given config", path, exc)
    return fallback


def _git_commit() -> tuple[str, bool]:
    """The project's git commit and whether the work tree had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit or "unknown", bool(dirty)


def _redact(key: str, value: str) -> str | None:
    """Drop secret-looking keys; strip user:password from URLs."""
    if _SECRET_KEY.search(key):
        return None
    if "://" in value and "@" in value:
        parts = urlsplit(value)
        if parts.password or parts.username:
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            value = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return value[:_MAX_PARAM_LENGTH]


def safe_params(config: PipelineConfig) -> dict[str, str]:
    """The flattened config as MLflow params, without secrets."""
    params = {}
    for key, value in flatten(config).items():
        cleaned = _redact(key, value)
        if cleaned is not None:
            params[key] = cleaned
    return params


# --- lineage -------------------------------------------------------------------------------------------


def lineage_tags(export: TrainExport, train_config: PipelineConfig, manifest: DataManifest) -> dict[str, str]:
    """The version tags that say where a model came from."""
    commit, dirty = _git_commit()
    extra = manifest.model_extra or {}
    inputs = extra.get("input_fingerprints", manifest.input_fingerprint or None)
    return {
        "base_model": _portable(export.result.base_model or train_config.model.name_or_path),
        "data_fingerprint": manifest.fingerprint,
        "data_input_fingerprint": json.dumps(inputs, sort_keys=True)[:500] if inputs is not None else "unknown",
        "data_recipe": manifest.recipe or train_config.data.recipe,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "config_hash": train_config.config_hash(),
        "orpo_lambda": f"{train_config.train.orpo_lambda:g}",
        "finetune": "lora" if export.is_lora else "full",
        "global_step": str(export.result.global_step),
        "train_dir": str(export.train_dir.resolve()),
        TAG_REGISTRATION_KEY: export.key,
    }


def _portable(spec: str) -> str:
    """A start model as its pinned, portable name (a cached registry download as `models:/NAME/N`)."""
    from orpo.models import portable_reference

    return portable_reference(spec) or spec


def describe(tags: dict[str, str], final_metrics: dict[str, Any], eval_metrics: dict[str, float]) -> str:
    """The version description: lineage, training result and headline evaluation, in markdown."""
    lines = [
        f"ORPO {tags.get('finetune', '?')} fine-tune of `{tags.get('base_model', '?')}` "
        f"(lambda {tags.get('orpo_lambda', '?')}, {tags.get('global_step', '?')} steps).",
        "",
        f"- data: recipe `{tags.get('data_recipe', '?')}`, fingerprint `{tags.get('data_fingerprint', '?')}`",
        f"- code: git `{tags.get('git_commit', '?')}`" + (" (uncommitted changes)" if tags.get("git_dirty") == "true"
                                                          else ""),
        f"- config hash `{tags.get('config_hash', '?')}` (resolved YAML in the run's artifacts)",
        f"- training run `{tags.get('training_run_id', '?')}`",
    ]
    final = {k: v for k, v in final_metrics.items() if _numeric(v) is not None}
    if final:
        shown = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(final.items())[:8])
        lines.append(f"- final training metrics: {shown}")
    headline = {k: eval_metrics[k] for k in HEADLINE_METRICS if k in eval_metrics}
    if headline:
        lines += ["", "Evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in headline.items())]
    else:
        lines += ["", "Not evaluated yet."]
    if tags.get("gate.decision"):
        lines.append(f"Gate: {tags['gate.decision']} ({tags.get('gate.reason', '')})")
    return "\n".join(lines)


# --- registration --------------------------------------------------------------------------------------


def find_registered(client: MlflowClient, name: str, key: str) -> Any | None:
    """The model version registered from the export with this key, if any.

    A failing search raises: treating it as "not found" would register a duplicate.
    """
    found = client.search_model_versions(f"name = '{name}' and tags.{TAG_REGISTRATION_KEY} = '{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def find_version_with_inputs(config: PipelineConfig, inputs: RunInputs) -> Any | None:
    """The first registered version trained from exactly these inputs (tag `run_inputs`), if any."""
    configure_mlflow(config)
    name = config.registry.registered_model_name
    found = mlflow_client().search_model_versions(f"name = '{name}' and tags.{TAG_RUN_INPUTS} = '{inputs.key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def version_data_manifest(config: PipelineConfig, name: str, version: str) -> DataManifest | None:
    """The data manifest logged with a version's training run (None when it has none)."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    configure_mlflow(config)
    run_id = mlflow_client().get_model_version(name, version).run_id
    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="orpo-manifest-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"data/{MANIFEST}", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return read_manifest(path)


def register_training_run(
    config: PipelineConfig,
    train_dir: str | Path,
    *,
    data_manifest: str | Path | None = None,
    run_inputs: RunInputs | None = None,
) -> RegisteredVersion:
    """Log a training export as an MLflow run and register it as a new version (alias `challenger`).

    Idempotent: an export registered before (same train_result.json and model files) returns its existing
    version (`created=False`) and changes nothing. An export without `export_complete.json` is refused
    before anything is written to MLflow. `run_inputs` (data, config, start model, code) become the
    version's `run_inputs*` tags, which `find_version_with_inputs` searches.
    """
    import mlflow

    export = read_train_export(train_dir)
    manifest_path = _manifest_path(export, data_manifest)
    configure_mlflow(config)
    client = mlflow_client()
    name = config.registry.registered_model_name

    existing = find_registered(client, name, export.key)
    if existing is not None:
        log.info("%s is already registered as %s version %s", export.train_dir, name, existing.version)
        return RegisteredVersion.existing(existing)

    train_config = _training_config(export, config)
    manifest = _read_manifest(manifest_path)
    tags = lineage_tags(export, train_config, manifest)
    if run_inputs is not None:
        tags.update(run_inputs.tags())
    run_id = _training_run_id(client, config, export)

    # A new run is named after the training output directory, so runs are recognisable in the UI.
    # Nested when the caller already has an active run (a notebook, a flow that logs), instead of failing.
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else export.train_dir.name, nested=mlflow.active_run() is not None
    ) as run:
        run_id = run.info.run_id
        tags["training_run_id"] = run_id
        mlflow.set_tags({**tags, "orpo.kind": "training"})
        _log_params(client, run_id, safe_params(train_config))
        _log_training_metrics(client, run_id, read_metrics_jsonl(export.metrics_path))
        _log_training_artifacts(export, train_config, manifest_path)
        model_info = log_model(export, config)

    _ensure_registered_model(client, name)
    version = mlflow.register_model(model_info.model_uri, name, tags=tags)
    version_number = str(version.version)
    # register_model may return before the version is READY on a remote registry.
    _wait_ready(client, name, version_number)
    client.update_model_version(
        name, version_number, describe(tags, export.result.final_metrics, {})
    )
    client.set_registered_model_alias(name, ALIAS_CHALLENGER, version_number)
    log.info("registered %s version %s (run %s) as %s", name, version_number, run_id, ALIAS_CHALLENGER)
    return RegisteredVersion(name, version_number, run_id, f"models:/{name}/{version_number}", True)


def _training_run_id(client: MlflowClient, config: PipelineConfig, export: TrainExport) -> str | None:
    """The run to log into: the one training logged to, one left by an interrupted registration, or new."""
    from mlflow.exceptions import MlflowException

    run_id = export.result.mlflow_run_id
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException:
            log.warning("training run %s is not in this tracking store; starting a new run", run_id)
    experiment = client.get_experiment_by_name(config.registry.experiment_name)
    leftovers = client.search_runs(
        [experiment.experiment_id], f"tags.{TAG_REGISTRATION_KEY} = '{export.key}'", max_results=1
    )
    if leftovers:
        return leftovers[0].info.run_id
    return None


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    # A reused run may hold some params already; MLflow refuses to change a logged param.
    present = client.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in params.items() if k not in present]
    for start in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[start : start + 100])


def _log_training_metrics(client: MlflowClient, run_id: str, rows: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric

    present = set(client.get_run(run_id).data.metrics)  # histories logged live during training stay
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, value, now, step)
        for key, points in _metric_series(rows).items()
        if key not in present
        for step, value in points
    ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_training_artifacts(export: TrainExport, train_config: PipelineConfig, manifest_path: Path | None) -> None:
    import tempfile

    import mlflow

    from orpo.config import dump_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        dump_config(train_config, tmp_path / "orpo_config.yaml")
        mlflow.log_artifact(str(tmp_path / "orpo_config.yaml"), "config")
        (tmp_path / TRAIN_RESULT).write_text(json.dumps(export.result.to_json(), indent=2), encoding="utf-8")
        mlflow.log_artifact(str(tmp_path / TRAIN_RESULT), "training")
        if manifest_path is not None:
            mlflow.log_artifact(str(manifest_path), "data")
        if export.metrics_path is not None:
            mlflow.log_artifact(str(export.metrics_path), "training")
            for png in plot_training_curves(read_metrics_jsonl(export.metrics_path), tmp_path):
                mlflow.log_artifact(str(png), "training")


def plot_training_curves(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Loss and log-probability curves by step as PNG files (one per group that has data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _metric_series(rows)
    written = []
    for file_name, title, names in _CURVES:
        present = [n for n in names if n in series]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for metric in present:
            steps, values = zip(*series[metric])
            ax.plot(steps, values, label=metric, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / file_name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="ORPO-aligned chat models. Aliases: `champion` (serving), `challenger` (newest)."
            )
        except MlflowException:
            client.get_registered_model(name)  # created concurrently; anything else re-raises here


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistrationError(f"model version {name}/{version} did not become ready (status {status})")
        time.sleep(1.0)


# --- the model -----------------------------------------------------------------------------------------


def _chat_prompt_template(tokenizer) -> str | None:
    """The chat template rendered around a `{prompt}` slot, for MLflow's pyfunc prompt_template."""
    sentinel = "\x00PROMPT\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # a template that cannot render a lone user turn: serve raw prompts
        log.warning("chat template cannot render a single user turn (%s); no prompt template logged", exc)
        return None
    if not isinstance(text, str) or sentinel not in text:
        return None
    return text.replace("{", "{{").replace("}", "}}").replace(sentinel, "{prompt}")


def _signature():
    from mlflow.models import infer_signature

    return infer_signature(
        model_input=["Write a haiku about the sea."],
        model_output=["The sea ..."],
        params={"max_new_tokens": 256, "temperature": 1.0, "do_sample": False},
    )


def _pip_requirements(is_lora: bool) -> list[str]:
    """Pinned serving requirements. MLflow's default list always adds torchvision, which a text model
    does not need (and which may not be installed)."""
    from importlib.metadata import PackageNotFoundError, version

    packages = ["mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate"]
    if is_lora:
        packages.append("peft")
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


def log_model(export: TrainExport, config: PipelineConfig):
    """Log the export with the transformers flavor into the active run; returns MLflow's ModelInfo."""
    import mlflow

    from orpo.models import load_tokenizer

    tokenizer = load_tokenizer(str(export.model_dir))
    metadata = {
        "finetune": "lora" if export.is_lora else "full",
        "base_model": export.result.base_model,
        "chat_template": tokenizer.chat_template,
    }
    common = dict(
        task="text-generation",
        signature=_signature(),
        # MLflow runs the example through the freshly logged model to validate it; a short generation
        # keeps that check cheap for large models.
        input_example=(["Write a haiku about the sea."], {"max_new_tokens": 16}),
        prompt_template=_chat_prompt_template(tokenizer),
        model_config={"max_new_tokens": 256, "do_sample": False},
        metadata=metadata,
        pip_requirements=_pip_requirements(export.is_lora),
    )
    if not export.is_lora:
        # MLflow can log a checkpoint directory without loading it, but that path breaks on transformers 5
        # (pipelines.check_task returns the pipeline class by name); loading keeps one working route.
        model = _load_full_model(export.model_dir)
        return mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name=MODEL_ARTIFACT, **common)

    peft_model, base_path = _load_peft_model(export)
    info = mlflow.transformers.log_model(
        {"model": peft_model, "tokenizer": tokenizer},
        name=MODEL_ARTIFACT,
        base_model_path=base_path,
        **common,
    )
    if not config.registry.log_merged_model:
        return info
    merged_dir = export.result.merged_dir
    if merged_dir and (merged_dir / "config.json").is_file():
        merged = _load_full_model(merged_dir)
    else:
        merged = peft_model.merge_and_unload()
    mlflow.transformers.log_model({"model": merged, "tokenizer": tokenizer}, name=MERGED_MODEL_ARTIFACT, **common)
    return info


def _load_full_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", use_safetensors=True)


def _load_peft_model(export: TrainExport):
    """The adapter applied to its base, with a base reference that loads on any machine.

    The exported adapter names its base by whatever directory training loaded it from (often a cache);
    the logged adapter names it by a portable reference instead (hub id, built-in, `models:/NAME/N`).
    Returns the model and the local base directory for MLflow's own loader (None for a hub base).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from orpo.models import portable_reference, resolve_model

    named = PeftConfig.from_pretrained(str(export.model_dir)).base_model_name_or_path
    reference = next(
        (ref for ref in map(portable_reference, (named, export.result.base_model_path)) if ref), None
    )
    if reference is None:
        raise RegistrationError(
            f"{export.model_dir}: the adapter's base model {named!r} is a local directory that other machines "
            "cannot load; train from a hub id, a built-in or a registered models:/NAME/N, or export merged "
            "weights (train.lora.enabled=false or train.lora.merge_on_export=true with a full model)"
        )
    local = Path(named).expanduser()
    resolved = resolve_model(str(local) if (local / "config.json").is_file() else reference)
    base = AutoModelForCausalLM.from_pretrained(resolved.path, dtype="auto", use_safetensors=True)
    model = PeftModel.from_pretrained(base, str(export.model_dir))
    model.peft_config[model.active_adapter].base_model_name_or_path = reference
    return model, resolved.path if resolved.is_local else None


# --- evaluation ----------------------------------------------------------------------------------------


def log_evaluation(
    config: PipelineConfig,
    version: RegisteredVersion,
    metrics: dict[str, float],
    report_dir: str | Path | None = None,
) -> None:
    """Attach evaluation results to a version: metrics on its run, the report under `evaluation/`,
    headline metrics as version tags, and a refreshed description."""
    from mlflow.entities import Metric

    configure_mlflow(config)
    client = mlflow_client()
    clean = {k: float(v) for k, v in metrics.items() if _numeric(v) is not None}
    skipped = sorted(set(metrics) - set(clean))
    if skipped:
        log.warning("not logging non-numeric or non-finite evaluation metrics: %s", ", ".join(skipped))
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in clean.items()]
    for start in range(0, len(batch), 1000):
        client.log_batch(version.run_id, metrics=batch[start : start + 1000])
    if report_dir is not None and Path(report_dir).is_dir():
        client.log_artifacts(version.run_id, str(report_dir), "evaluation")
        # Which protocol produced each metric prefix (evals.protocols), as run tags next to the numbers.
        report = Path(report_dir) / "report.json"
        protocols = json.loads(report.read_text(encoding="utf-8")).get("protocols", {}) if report.is_file() else {}
        for prefix, description in protocols.items():
            client.set_tag(version.run_id, f"eval.protocol.{prefix}", str(description)[:5000])
    for key in HEADLINE_METRICS:
        if key in clean:
            client.set_model_version_tag(version.name, version.version, EVAL_TAG_PREFIX + key, f"{clean[key]:.4g}")
    refresh_description(client, version.name, version.version)


def refresh_description(client: MlflowClient, name: str, version: str) -> None:
    """Rewrite a version's description from its tags and its run's metrics."""
    model_version = client.get_model_version(name, version)
    final_metrics: dict[str, Any] = {}
    if model_version.run_id:
        run_metrics = client.get_run(model_version.run_id).data.metrics
        final_metrics = {
            k: run_metrics[k] for k in ("loss", "nll_loss", "log_odds_ratio", "eval_loss") if k in run_metrics
        }
        eval_metrics = run_metrics
    else:
        eval_metrics = {}
    client.update_model_version(name, version, describe(dict(model_version.tags), final_metrics, eval_metrics))
