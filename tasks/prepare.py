"""Prefect task: binarize the raw preference data (orpo.data), cached on the inputs' fingerprint."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from orpo import registry
from orpo.config import DataConfig, PipelineConfig
from orpo.data.binarize import PreparedDataset, dataset_key, default_dataset_dir, prepare_dataset
from orpo.data.manifest import seen_shards
from orpo.data.readers import is_hub_id, list_shards
from orpo.handoffs import read_manifest
from orpo.models import PinnedModel
from tasks.common import retry_on_transient


@dataclass(frozen=True)
class SeenShards:
    """The shards a registered start model's data held (content hashes), and the names of those it did not."""

    version: str | None  # the start model's version, when it is one
    seen: list[str]
    new: list[str]


def dataset_dir_for(config: PipelineConfig, exclude_shards: list[str] | None = None) -> Path:
    return default_dataset_dir(config.data, config.workdir, exclude_shards or (), config.model.chat_template)


def _dataset_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Same input bytes + recipe + options + seed -> same key, across flow runs (nightly reuse).

    A key is only worth reusing while the dataset it points to is still on disk.
    """
    config: PipelineConfig = parameters["config"]
    exclude = sorted(parameters.get("exclude_shards") or [])
    directory = dataset_dir_for(config, exclude).resolve()
    if not (directory / "manifest.json").is_file():
        return f"prepare-data-{uuid.uuid4().hex}"
    # The directory is part of the key: a cached result must point at a dataset that exists, not at the same
    # data prepared under another (perhaps deleted) workdir.
    where = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    key = dataset_key(config.data, exclude_shards=exclude, chat_template=config.model.chat_template)
    return f"prepare-data-{key}-{where}"


@task(name="shards-seen-by-start-model", retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_on_transient)
def shards_seen_by(config: PipelineConfig, start: PinnedModel) -> SeenShards:
    """For data.incremental: the shards the start model (a registered version) has seen, and which are new."""
    if not (config.data.incremental and start.pinned.startswith("models:/")) or is_hub_id(config.data.source):
        return SeenShards(version=None, seen=[], new=[])
    name, _, version = start.pinned[len("models:/"):].rpartition("/")
    manifest = registry.version_data_manifest(config, name, version)
    seen = sorted(seen_shards(manifest)) if manifest is not None else []
    new = [s.name for s in list_shards(config.data.source) if s.sha256 not in set(seen)]
    return SeenShards(version=version, seen=seen, new=new)


def _manifest_markdown(prepared: PreparedDataset, data: DataConfig) -> str:
    lines = [
        "# Prepared dataset",
        "",
        f"- source: `{data.source}`, recipe `{data.recipe}`, seed {data.seed}",
        f"- directory: `{prepared.dataset_dir}`",
        f"- fingerprint: `{prepared.fingerprint}`",
        "",
        "| count | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in sorted(prepared.counts.items())]
    manifest = read_manifest(prepared.manifest_path)
    excluded = (manifest.model_extra or {}).get("excluded_shards") or []
    if manifest.shards or excluded:
        lines += ["", f"{len(manifest.shards)} shard(s) read, {len(excluded)} left out as already seen:", "",
                  "| shard | records | pairs | sha256 |", "|---|---|---|---|"]
        lines += [f"| {s.name or data.source} | {s.records} | {s.pairs} | `{s.sha256[:12]}` |" for s in manifest.shards]
    return "\n".join(lines)


@task(
    name="prepare-data",
    cache_key_fn=_dataset_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=[10, 60],  # hub streaming is the flaky part; local files succeed or fail at once
    retry_condition_fn=retry_on_transient,  # a bad source or empty data fails at once, not after 70 s
)
def prepare_data(config: PipelineConfig, exclude_shards: list[str] | None = None) -> PreparedDataset:
    """Binarize `config.data.source` into a DatasetDict + manifest.json (reused when nothing changed).

    Shards whose content hash is in `exclude_shards` are left out (data.incremental).
    """
    prepared = prepare_dataset(config.data, dataset_dir_for(config, exclude_shards), progress=False,
                               exclude_shards=exclude_shards or (), chat_template=config.model.chat_template)
    create_markdown_artifact(
        key="data-manifest", markdown=_manifest_markdown(prepared, config.data), description="Prepared dataset"
    )
    return prepared
