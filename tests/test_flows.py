"""The pipeline flow end to end on a tiny model, under a temporary Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo.config import load_config
from tests.conftest import tiny_pipeline_overrides


@pytest.mark.slow
def test_alignment_pipeline_runs_end_to_end_and_reuses_the_dataset(prefect_harness, tmp_path, monkeypatch):
    import mlflow

    from flows.pipeline import alignment_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(None, tiny_pipeline_overrides(tmp_path, "orchestration.launch_with_accelerate=false"))
    summary = alignment_pipeline(config=config)

    assert summary.global_step == 3
    assert Path(summary.model_dir, "export_complete.json").is_file()
    assert summary.model_version == "1"
    assert summary.promoted  # no champion yet: the first passing version becomes champion
    assert "preference/accuracy" in summary.metrics and "preference/accuracy" in summary.base_metrics
    assert 0.0 <= summary.metrics["preference/accuracy"] <= 1.0
    manifest = json.loads(Path(summary.dataset_dir, "manifest.json").read_text())
    assert manifest["fingerprint"] == summary.data_fingerprint

    client = mlflow.MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)
    version = client.get_model_version_by_alias("tiny-orpo", "champion")
    assert str(version.version) == summary.model_version
    run = client.get_run(version.run_id)
    assert "preference/accuracy" in run.data.metrics
    assert any(key.startswith("loss") or key == "loss" for key in run.data.metrics)

    # A second nightly run on unchanged data reuses the prepared dataset and registers version 2.
    stamp = Path(summary.dataset_dir, "manifest.json").stat().st_mtime_ns
    second = alignment_pipeline(config=config)
    assert second.dataset_dir == summary.dataset_dir
    assert Path(second.dataset_dir, "manifest.json").stat().st_mtime_ns == stamp
    assert second.model_version == "2"
    assert second.run_name != summary.run_name


def test_flow_parameters_are_the_config_model():
    """The UI renders the pipeline's parameters as a form built from the pydantic config's schema."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import alignment_pipeline

    schema = parameter_schema(alignment_pipeline).model_dump()
    config_schema = schema["properties"]["config"]
    definitions = schema.get("definitions") or schema.get("$defs") or {}
    assert "PipelineConfig" in json.dumps(config_schema) or "PipelineConfig" in definitions
    assert {"DataConfig", "TrainConfig", "EvalConfig"} <= set(definitions)
    assert "config_path" in schema["properties"]


def test_bad_parameters_fail_before_any_work(tmp_path):
    from flows.pipeline import effective_config

    from orpo.config import ConfigError

    with pytest.raises(ConfigError, match="train.learning_rate"):
        effective_config({"train": {"learning_rate": -1}}, None)
