"""The pipeline flow end to end on a tiny model, under a temporary Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo.config import load_config
from orpo.handoffs import read_manifest
from tests.conftest import tiny_pipeline_overrides
from tests.test_data_shards import write_shards


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _nightly_config(tmp_path, source, *extra):
    """The tiny pipeline, in-process, evaluated with the preference suite only (seconds, not minutes).

    These tests are about nights, skips and resumes, not about the gate: the first version becomes champion
    unchecked (a 3-step tiny model is no significant improvement on its start model). The gate of a first
    version against its start model is tested below and in test_gate.py."""
    return load_config(None, tiny_pipeline_overrides(
        tmp_path, "orchestration.launch_with_accelerate=false", f"data.source={source}", "eval.suites=[preference]",
        f"model.cache_dir={tmp_path / 'models'}", "registry.gate.first_version=promote", *extra))


@pytest.mark.slow
def test_three_nights_train_skip_and_train_on_the_new_shard(prefect_harness, tmp_path, monkeypatch):
    """Night 1 trains and registers version 1 (champion); night 2 with nothing new is skipped; night 3 with a
    new shard trains on more pairs and registers version 2. A forced run on unchanged inputs still trains."""
    import mlflow

    from flows.pipeline import alignment_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    drops = tmp_path / "drops"
    write_shards(drops, 60, 60)
    config = _nightly_config(tmp_path / "work", drops)

    night1 = alignment_pipeline(config=config)
    assert (night1.model_version, night1.unchanged_since, night1.promoted) == ("1", None, True)
    assert night1.global_step == 3 and Path(night1.model_dir, "export_complete.json").is_file()
    assert "preference/accuracy" in night1.metrics and "preference/accuracy" in night1.base_metrics
    # The base model is scored once, by its own evaluation; its numbers are copied, not recomputed.
    assert night1.metrics["preference/base_accuracy"] == night1.base_metrics["preference/accuracy"]
    manifest = read_manifest(night1.dataset_dir)
    assert manifest.fingerprint == night1.data_fingerprint and [s.records for s in manifest.shards] == [60, 60]

    client = mlflow.MlflowClient(tracking_uri=night1.tracking_uri, registry_uri=night1.tracking_uri)
    version1 = client.get_model_version("tiny-orpo", "1")
    assert version1.tags["run_inputs"] == night1.run_inputs_key
    assert version1.tags["run_inputs.start_model"] == "builtin:tiny-llama"
    assert str(client.get_model_version_by_alias("tiny-orpo", "champion").version) == "1"

    night2 = alignment_pipeline(config=config)
    assert night2.unchanged_since == "1" and night2.model_version == "1" and night2.train_dir == ""
    assert night2.run_inputs_key == night1.run_inputs_key
    assert len(client.search_model_versions("name = 'tiny-orpo'")) == 1
    assert not (tmp_path / "work" / "train" / night2.run_name).exists()
    unchanged = _artifacts("unchanged")
    assert unchanged and "Unchanged since version 1" in unchanged[0].data and "force" in unchanged[0].data

    base_report = tmp_path / "work" / "reports" / "base-builtin-tiny-llama" / "report.json"
    stamp = base_report.stat().st_mtime_ns
    forced = alignment_pipeline(config=config, force=True)
    assert forced.model_version == "2" and forced.run_inputs_key == night1.run_inputs_key
    # The same inputs give the same model: no significant difference, so version 1 stays champion.
    assert not forced.promoted
    assert str(client.get_model_version_by_alias("tiny-orpo", "champion").version) == "1"
    # Same base model, eval settings and data: the base evaluation of night 1 is reused, not recomputed.
    assert base_report.stat().st_mtime_ns == stamp and forced.base_metrics == night1.base_metrics

    write_shards(drops, 60, 60, 40)  # the third day's drop
    night3 = alignment_pipeline(config=config)
    assert night3.model_version == "3" and night3.unchanged_since is None
    assert night3.data_counts["pairs"] > night1.data_counts["pairs"]
    assert night3.data_counts["records_in"] == 160
    assert client.get_model_version("tiny-orpo", "3").tags["data_fingerprint"] == night3.data_fingerprint
    assert base_report.stat().st_mtime_ns != stamp  # new test data: the base model is scored again


@pytest.mark.slow
def test_start_from_champion_pins_the_version_downloads_once_and_leaves_no_temporary_directory(
    prefect_harness, tmp_path, monkeypatch
):
    import tempfile

    import mlflow

    from flows.pipeline import alignment_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    drops = tmp_path / "drops"
    write_shards(drops, 60, 60)
    config = _nightly_config(tmp_path / "work", drops, "orchestration.start_from=champion")
    night1 = alignment_pipeline(config=config)  # no champion yet: trains from the base model
    assert night1.model_version == "1" and night1.start_model == "builtin:tiny-llama"

    downloads = []
    real_download = mlflow.artifacts.download_artifacts

    def counting(*args, **kwargs):
        uri = kwargs.get("artifact_uri") or (args[0] if args else None)
        if uri and str(uri).startswith("models:/"):
            downloads.append(uri)
        return real_download(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    night2 = alignment_pipeline(config=config)

    assert night2.start_model == "models:/tiny-orpo/1" and night2.model_version == "2"
    assert downloads == ["models:/tiny-orpo/1"]  # resolved once; training and evaluation use the cache
    client = mlflow.MlflowClient(tracking_uri=night2.tracking_uri, registry_uri=night2.tracking_uri)
    tags = client.get_model_version("tiny-orpo", "2").tags
    assert tags["base_model"] == "models:/tiny-orpo/1" and tags["run_inputs.start_model"] == "models:/tiny-orpo/1"
    trained_from = load_config(Path(night2.model_dir) / "orpo_config.yaml").model.name_or_path
    assert trained_from == "models:/tiny-orpo/1"
    # The adapter continued from version 1 names the base it applies to portably, never a cache path.
    adapter = json.loads((Path(night2.model_dir) / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "builtin:tiny-llama"

    cache = tmp_path / "work" / "models"
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
    assert not [p for p in set(Path(tempfile.gettempdir()).iterdir()) - temp_before if "mlflow" in p.name]
    assert len(list((cache / "mlflow").rglob(".orpo-source"))) == 1

    # data.incremental: only shards the champion's data has not seen; none new -> nothing to do.
    incremental = config.model_copy(update={"data": config.data.model_copy(update={"incremental": True})})
    quiet = alignment_pipeline(config=incremental)
    assert quiet.unchanged_since is not None and quiet.train_dir == ""
    assert "no new shard" in quiet.decision
    write_shards(drops, 60, 60, 40)
    night4 = alignment_pipeline(config=incremental)
    assert night4.data_counts["records_in"] == 40  # the new shard alone
    excluded = read_manifest(night4.dataset_dir).model_extra["excluded_shards"]
    assert [s["name"] for s in excluded] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]


@pytest.mark.slow
def test_the_first_version_is_gated_against_the_start_models_evaluation(prefect_harness, tmp_path, monkeypatch):
    """By default a first version is compared with the model it was trained from, on the start model's own
    evaluation (orchestration.evaluate_base_model), and the decision names the start model as the opponent."""
    import mlflow

    from flows.pipeline import alignment_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _nightly_config(tmp_path / "work", Path(__file__).parents[1] / "data" / "samples"
                             / "ultrafeedback_sample.jsonl", "registry.gate.first_version=beat_start_model",
                             "registry.gate.primary_metric=preference/accuracy")
    night1 = alignment_pipeline(config=config)
    assert "against the start model builtin:tiny-llama" in night1.decision
    client = mlflow.MlflowClient(tracking_uri=night1.tracking_uri, registry_uri=night1.tracking_uri)
    version = client.get_model_version("tiny-orpo", night1.model_version)
    assert version.tags["gate.opponent"] == "start model builtin:tiny-llama"
    assert version.tags["gate.champion_version"] == "none"
    compared = json.loads(version.tags["gate.compared"])
    # Paired on the held-out pairs both evaluations scored: the start model's evaluation was really read.
    assert compared["preference/accuracy"]["n"] == len(
        json.loads((Path(night1.report_dir) / "preference_margins.json").read_text()))
    aliases = {alias for v in client.search_model_versions("name = 'tiny-orpo'") for alias in v.aliases}
    assert ("champion" in aliases) == night1.promoted
    latest = max(_artifacts("promotion-decision"), key=lambda artifact: artifact.created)  # the session's others
    assert "compared with: start model builtin:tiny-llama" in latest.data


def test_the_start_models_cached_evaluation_is_keyed_by_the_evaluation_code(tmp_path, monkeypatch):
    """Same model, settings, data and code: the same key (nightly reuse). New code: a new key, so a gate
    never compares a challenger scored by today's code with a start model scored by older code."""
    import flows.pipeline as pipeline

    config = _nightly_config(tmp_path / "work", tmp_path / "drops")
    parameters = {"config": config, "model_path": "builtin:tiny-llama", "dataset_dir": tmp_path / "data",
                  "out_dir": tmp_path / "reports" / "base"}
    today = pipeline._base_eval_key(None, parameters)
    assert pipeline._base_eval_key(None, parameters) == today
    monkeypatch.setattr(pipeline, "source_digest", lambda root: "0123456789abcdef")
    assert pipeline._base_eval_key(None, parameters) != today
    changed_settings = {**parameters, "config": config.model_copy(
        update={"eval": config.eval.model_copy(update={"max_new_tokens": 7})})}
    assert pipeline._base_eval_key(None, changed_settings) != pipeline._base_eval_key(None, parameters)


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


def test_orpo_run_passes_force_and_reports_an_unchanged_run(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import flows.pipeline
    from flows.pipeline import PipelineSummary
    from orpo.cli import app

    calls = []

    def fake_pipeline(config, force=False):
        calls.append(force)
        return PipelineSummary(run_name="r", dataset_dir="", data_fingerprint="", data_counts={},
                               unchanged_since="4", model_uri="models:/tiny-orpo/4", decision="skipped")

    monkeypatch.setattr(flows.pipeline, "alignment_pipeline", fake_pipeline)
    result = CliRunner().invoke(app, ["run", f"workdir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "unchanged since version 4" in result.output and "--force" in result.output
    CliRunner().invoke(app, ["run", "--force", f"workdir={tmp_path}"])
    assert calls == [False, True]


@pytest.mark.slow
def test_a_version_registered_by_a_run_that_died_before_its_gate_is_evaluated_and_gated_not_skipped(
    prefect_harness, tmp_path, monkeypatch
):
    """A night that dies after registering (the judge was down during evaluation) leaves a version with these
    inputs but no evaluation and no gate decision. The next night must not call that "unchanged" (it would skip
    every night until the inputs change, and the model would never be judged): it evaluates and gates that
    version, without training it again. The night after that is unchanged."""
    import mlflow

    import flows.pipeline as pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _nightly_config(tmp_path / "work", Path(__file__).parents[1] / "data" / "samples"
                             / "ultrafeedback_sample.jsonl")

    def judge_down(*args, **kwargs):
        raise RuntimeError("judge endpoint down")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "evaluate", judge_down)
        with pytest.raises(RuntimeError, match="judge endpoint down"):
            pipeline.alignment_pipeline(config=config)
    client = mlflow.MlflowClient(tracking_uri=config.resolved_tracking_uri(),
                                 registry_uri=config.resolved_tracking_uri())
    assert "gate.decision" not in client.get_model_version("tiny-orpo", "1").tags

    night2 = pipeline.alignment_pipeline(config=config)
    assert night2.unchanged_since is None and night2.model_version == "1" and night2.train_dir == ""
    assert night2.promoted and "preference/accuracy" in night2.metrics
    assert len(client.search_model_versions("name = 'tiny-orpo'")) == 1  # not trained or registered again
    assert client.get_model_version("tiny-orpo", "1").tags["gate.decision"] == "promoted"
    assert str(client.get_model_version_by_alias("tiny-orpo", "champion").version) == "1"

    night3 = pipeline.alignment_pipeline(config=config)
    assert night3.unchanged_since == "1" and night3.train_dir == ""


@pytest.mark.slow
def test_a_night_whose_training_died_is_resumed_by_the_next_night(prefect_harness, tmp_path, monkeypatch):
    """Training dies after its first checkpoint (a preempted node, an OOM). The next scheduled night is a new flow
    run with a new name; with the same inputs it must resume that checkpoint, not train from step 0 again (for a
    7B model, a day of GPU time lost every time a night fails)."""
    import flows.pipeline as pipeline
    from orpo.train import ORPORecipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _nightly_config(tmp_path / "work", Path(__file__).parents[1] / "data" / "samples"
                             / "ultrafeedback_sample.jsonl", "train.save_steps=1")
    real_save, real_step = ORPORecipe.save_checkpoint, ORPORecipe.train_step
    steps = []

    def save_then_die(self):
        real_save(self)
        raise RuntimeError("node preempted")

    def counting_step(self):
        steps.append(self.global_step)
        return real_step(self)

    monkeypatch.setattr(ORPORecipe, "train_step", counting_step)
    with monkeypatch.context() as patch:
        patch.setattr(ORPORecipe, "save_checkpoint", save_then_die)
        with pytest.raises(RuntimeError, match="node preempted"):
            pipeline.alignment_pipeline(config=config)
    assert steps == [0]

    night2 = pipeline.alignment_pipeline(config=config)
    assert night2.global_step == 3 and night2.model_version == "1"
    assert steps == [0, 1, 2]  # steps 2 and 3 only: resumed from night 1's checkpoint at step 1
