"""Prefect task: binarize the raw preference data (orpo.data), cached on the inputs' fingerprint."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from orpo.config import DataConfig, PipelineConfig
from orpo.data.binarize import PreparedDataset, dataset_key, default_dataset_dir, prepare_dataset


def dataset_dir_for(config: PipelineConfig) -> Path:
    return default_dataset_dir(config.data, config.workdir)


def _dataset_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Same input bytes + recipe + options + seed -> same key, across flow runs (nightly reuse).

    A key is only worth reusing while the dataset it points to is still on disk.
    """
    config: PipelineConfig = parameters["config"]
    directory = dataset_dir_for(config).resolve()
    if not (directory / "manifest.json").is_file():
        return f"prepare-data-{uuid.uuid4().hex}"
    # The directory is part of the key: a cached result must point at a dataset that exists, not at the same
    # data prepared under another (perhaps deleted) workdir.
    where = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return f"prepare-data-{dataset_key(config.data)}-{where}"


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
    return "\n".join(lines)


@task(
    name="prepare-data",
    cache_key_fn=_dataset_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=[10, 60],  # hub streaming is the flaky part; local files succeed or fail at once
)
def prepare_data(config: PipelineConfig) -> PreparedDataset:
    """Binarize `config.data.source` into a DatasetDict + manifest.json (reused when nothing changed)."""
    prepared = prepare_dataset(config.data, dataset_dir_for(config), progress=False)
    create_markdown_artifact(
        key="data-manifest", markdown=_manifest_markdown(prepared, config.data), description="Prepared dataset"
    )
    return prepared
