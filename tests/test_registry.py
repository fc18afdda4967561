"""Registration on the embedded sqlite store: lineage, idempotence, incomplete exports refused, the
round trip by alias to a working generation pipeline, and evaluation results on the version."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_registry_helpers import make_train_dir

from orpo.config import PipelineConfig, load_config
from orpo.registry import (
    RegistrationError,
    configure_mlflow,
    log_evaluation,
    read_train_export,
    register_training_run,
    safe_params,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """One sqlite store holding a full fine-tune (version 1) and a LoRA adapter (version 2)."""
    root = tmp_path_factory.mktemp("registry")
    config = PipelineConfig(workdir=str(root / "work"))
    full_dir = make_train_dir(root, lora=False, base_dir=tiny_model_dir, seed=0)
    lora_dir = make_train_dir(root, lora=True, base_dir=tiny_model_dir, seed=1)
    full = register_training_run(config, full_dir)
    lora = register_training_run(config, lora_dir)
    return {"root": root, "config": config, "full_dir": full_dir, "lora_dir": lora_dir, "full": full, "lora": lora,
            "base_dir": tiny_model_dir}


def _client(config):
    from mlflow import MlflowClient

    configure_mlflow(config)
    return MlflowClient()


def test_default_store_is_sqlite_in_the_workdir(store):
    config = store["config"]
    assert configure_mlflow(config) == f"sqlite:///{Path(config.workdir).resolve() / 'mlflow.db'}"
    assert (Path(config.workdir) / "mlflow.db").is_file()
    experiment = _client(config).get_experiment_by_name(config.registry.experiment_name)
    # Artifacts live next to the database, not in ./mlruns of whatever directory we ran from.
    assert experiment.artifact_location == (Path(config.workdir).resolve() / "mlartifacts").as_uri()


def test_versions_are_new_and_challenger_moves_to_the_newest(store):
    full, lora = store["full"], store["lora"]
    assert full.created and lora.created
    assert (full.version, lora.version) == ("1", "2")
    assert lora.model_uri == "models:/orpo-model/2"
    client = _client(store["config"])
    assert str(client.get_model_version_by_alias("orpo-model", "challenger").version) == "2"


def test_version_tags_and_description_carry_the_lineage(store):
    client = _client(store["config"])
    trained = load_config(store["lora_dir"] / "model" / "orpo_config.yaml")
    version = client.get_model_version("orpo-model", store["lora"].version)
    tags = version.tags
    assert tags["base_model"] == "builtin:tiny-llama"
    assert tags["data_fingerprint"] == "fp0001abcdef"
    assert tags["data_recipe"] == "argilla"
    assert json.loads(tags["data_input_fingerprint"]) == {"sample.jsonl": "in123"}
    assert tags["config_hash"] == trained.config_hash()
    assert tags["orpo_lambda"] == "0.15"
    assert tags["finetune"] == "lora"
    assert client.get_model_version("orpo-model", store["full"].version).tags["finetune"] == "full"
    assert tags["training_run_id"] == store["lora"].run_id == version.run_id
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert "fp0001abcdef" in version.description and "builtin:tiny-llama" in version.description
    assert "Not evaluated yet" in version.description


def test_training_run_has_params_metric_histories_and_artifacts(store):
    client = _client(store["config"])
    run = client.get_run(store["full"].run_id)
    assert run.data.params["train.orpo_lambda"] == "0.1"
    assert run.data.params["model.name_or_path"] == "builtin:tiny-llama"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [3, 6]
    assert "logps/chosen" in run.data.metrics and "note" not in run.data.metrics

    def listing(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"config/orpo_config.yaml"} <= listing("config")
    assert {"data/manifest.json"} <= listing("data")
    assert {"training/metrics.jsonl", "training/loss_curves.png", "training/logprob_curves.png",
            "training/train_result.json"} <= listing("training")
    png = Path(client.download_artifacts(run.info.run_id, "training/loss_curves.png", str(store["root"])))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_secrets_never_become_params():
    config = PipelineConfig.model_validate({"registry": {"tracking_uri": "https://alice:s3cret@mlflow.example:8443/x"}})
    params = safe_params(config)
    assert params["registry.tracking_uri"] == "https://mlflow.example:8443/x"
    assert not any("s3cret" in value for value in params.values())
    # The judge's key is named by an environment variable; the name may be shown, never a value.
    assert params["eval.judge.api_key_env"] == "OPENAI_API_KEY"


def test_reregistration_is_idempotent(store):
    config = PipelineConfig(workdir=store["config"].workdir)  # a fresh config object, same store
    again = register_training_run(config, store["full_dir"])
    assert not again.created
    assert (again.version, again.run_id) == (store["full"].version, store["full"].run_id)
    client = _client(config)
    assert len(client.search_model_versions("name = 'orpo-model'")) == 2
    # Re-registering does not steal the challenger alias back.
    assert str(client.get_model_version_by_alias("orpo-model", "challenger").version) == store["lora"].version


def test_incomplete_export_is_refused_and_nothing_is_registered(store):
    incomplete = make_train_dir(store["root"], lora=False, base_dir=store["base_dir"], seed=7, complete=False)
    client = _client(store["config"])
    experiment = client.get_experiment_by_name(store["config"].registry.experiment_name)
    runs_before = len(client.search_runs([experiment.experiment_id]))
    with pytest.raises(RegistrationError, match="export_complete.json"):
        register_training_run(store["config"], incomplete)
    assert len(client.search_runs([experiment.experiment_id])) == runs_before
    assert len(client.search_model_versions("name = 'orpo-model'")) == 2


def test_bad_train_dirs_name_the_file(tmp_path):
    with pytest.raises(RegistrationError, match="train_result.json"):
        read_train_export(tmp_path)
    (tmp_path / "train_result.json").write_text("{not json")
    with pytest.raises(RegistrationError, match="not valid JSON"):
        read_train_export(tmp_path)
    (tmp_path / "train_result.json").write_text(json.dumps({"model_dir": str(tmp_path / "missing")}))
    with pytest.raises(RegistrationError, match="does not exist"):
        read_train_export(tmp_path)


def test_registration_key_changes_with_the_model_files(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store["full_dir"], copy)
    key = read_train_export(store["full_dir"]).key
    assert read_train_export(copy).key == key  # same result file and model bytes: same export
    result = json.loads((copy / "train_result.json").read_text())
    result["global_step"] += 1
    (copy / "train_result.json").write_text(json.dumps(result))
    changed = read_train_export(copy).key
    assert changed != key  # train_result.json is part of the key
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert read_train_export(copy).key not in (key, changed)


@pytest.mark.slow
def test_round_trip_by_alias_generates_text(store):
    import mlflow

    from orpo.gate import promote

    # About loading by alias, not the gate: the first version becomes champion without a comparison.
    config = store["config"].model_copy(deep=True)
    config.registry.gate.first_version = "promote"
    decision = promote(config, store["full"])
    assert decision.promoted
    for alias in ("champion", "challenger"):  # full model, then the LoRA adapter on its local base
        generator = mlflow.transformers.load_model(f"models:/orpo-model@{alias}")
        out = generator("The capital of France is", max_new_tokens=8, do_sample=False)
        text = out[0]["generated_text"]
        assert isinstance(text, str) and len(text) > len("The capital of France is")
        assert generator.tokenizer.chat_template  # the chat template travels with the model
    assert type(generator.model).__name__ == "PeftModel"


def test_lora_version_resolves_through_the_model_resolver(store, tmp_path):
    from orpo.config import ModelConfig
    from orpo.models import load_model_and_tokenizer, resolve_model

    configure_mlflow(store["config"])
    resolved = resolve_model(f"models:/orpo-model/{store['lora'].version}", cache_dir=tmp_path / "models")
    assert (Path(resolved.path) / "adapter_config.json").is_file()
    # The base is named portably (the export named the local cache it was trained from), so the version
    # loads on any machine that reaches the registry.
    adapter = json.loads((Path(resolved.path) / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "builtin:tiny-llama"
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="unused"), path=resolved.path)
    assert type(model).__name__ == "PeftModel"
    assert tokenizer("hello")["input_ids"]


def test_full_version_loads_through_the_model_resolver(store, tmp_path):
    from orpo.config import ModelConfig
    from orpo.models import load_model_and_tokenizer, resolve_model

    configure_mlflow(store["config"])
    resolved = resolve_model(f"models:/orpo-model/{store['full'].version}", cache_dir=tmp_path / "models")
    assert (Path(resolved.path) / "config.json").is_file()
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="unused"), path=resolved.path)
    assert tokenizer("hello")["input_ids"] and model.config.model_type == "llama"


def test_evaluation_lands_on_the_run_the_tags_and_the_description(store, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# Evaluation\n")
    (report / "metrics.json").write_text("{}")
    metrics = {"mt_bench/score": 6.125, "alpaca/win_rate": 12.5, "preference/accuracy": 0.71,
               "mt_bench/category/writing": 7.0, "alpaca/avg_length": float("nan"), "bad": "text"}
    log_evaluation(store["config"], store["lora"], metrics, report)
    client = _client(store["config"])
    run = client.get_run(store["lora"].run_id)
    assert run.data.metrics["mt_bench/score"] == 6.125
    assert run.data.metrics["mt_bench/category/writing"] == 7.0
    assert "alpaca/avg_length" not in run.data.metrics and "bad" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/report.md", "evaluation/metrics.json"}
    version = client.get_model_version("orpo-model", store["lora"].version)
    assert version.tags["eval.mt_bench/score"] == "6.125"
    assert version.tags["eval.preference/accuracy"] == "0.71"
    assert "mt_bench/score 6.125" in version.description
    assert "Not evaluated yet" not in version.description


def test_training_run_id_from_train_result_is_reused(store, tmp_path):
    """A run that training logged live is completed, not duplicated; its live histories stay as they were."""
    import mlflow

    config = store["config"]
    configure_mlflow(config)
    with mlflow.start_run() as live:
        for step in range(3):
            mlflow.log_metric("loss", 9.0, step=step)
    train_dir = make_train_dir(tmp_path, lora=True, base_dir=store["base_dir"], seed=3)
    result = json.loads((train_dir / "train_result.json").read_text())
    result["mlflow_run_id"] = live.info.run_id
    (train_dir / "train_result.json").write_text(json.dumps(result))
    version = register_training_run(config, train_dir)
    assert version.created and version.run_id == live.info.run_id
    client = _client(config)
    assert [m.value for m in client.get_metric_history(live.info.run_id, "loss")] == [9.0, 9.0, 9.0]
    assert "rewards/margins" in client.get_run(live.info.run_id).data.metrics


def test_configuring_one_store_does_not_leak_into_the_next_config(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; the next config's default store must not change."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = PipelineConfig.model_validate({"registry": {"tracking_uri": f"sqlite:///{tmp_path / 'a.db'}"}})
    configure_mlflow(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = PipelineConfig(workdir=str(tmp_path / "b"))
    assert configure_mlflow(second) == f"sqlite:///{(tmp_path / 'b' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'user.db'}")
    configure_mlflow(first)
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'user.db'}"  # the user's choice stays


def test_lora_with_merged_model_logs_both_and_registers_the_adapter(store, tmp_path):
    import mlflow

    config = store["config"].model_copy(deep=True)
    config.registry.log_merged_model = True
    config.registry.registered_model_name = "orpo-merged"
    version = register_training_run(config, make_train_dir(tmp_path, lora=True, base_dir=store["base_dir"], seed=5))
    client = _client(config)
    experiment = client.get_experiment_by_name(config.registry.experiment_name)
    logged = {m.name: m for m in client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{version.run_id}'")}
    assert set(logged) == {"model", "merged_model"}
    registered = client.get_model_version("orpo-merged", version.version)
    assert registered.source.endswith(logged["model"].model_id) or logged["model"].model_id in registered.source
    merged = mlflow.transformers.load_model(f"models:/{logged['merged_model'].model_id}")
    assert type(merged.model).__name__ == "LlamaForCausalLM"  # weights merged, no adapter left
    assert merged("Water boils", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("Water boils")


def test_a_copy_without_the_marker_is_refused_and_a_moved_directory_registers(store, tmp_path):
    """Issue 17 item 5: train_result.json paths are relative; the marker checked is the given directory's."""
    import shutil

    original = make_train_dir(store["root"], lora=False, base_dir=store["base_dir"], seed=11)
    client = _client(store["config"])
    versions_before = len(client.search_model_versions("name = 'orpo-model'"))

    copy = tmp_path / "copy-without-marker"
    shutil.copytree(original, copy)
    (copy / "model" / "export_complete.json").unlink()
    with pytest.raises(RegistrationError, match="export_complete.json"):
        register_training_run(store["config"], copy)
    assert len(client.search_model_versions("name = 'orpo-model'")) == versions_before

    moved = tmp_path / "moved"
    shutil.move(original, moved)
    export = read_train_export(moved)
    assert export.model_dir == moved / "model" and export.metrics_path == moved / "metrics.jsonl"
    version = register_training_run(store["config"], moved)
    assert version.created and int(version.version) == versions_before + 1
    assert client.get_model_version("orpo-model", version.version).tags["train_dir"] == str(moved.resolve())


def test_legacy_absolute_paths_follow_the_directory(tmp_path):
    """A train_result.json written with absolute paths (before they were relative) still reads its own files."""
    from orpo.handoffs import read_train_result

    written = {"output_dir": "/elsewhere/run", "model_dir": "/elsewhere/run/model",
               "metrics_path": "/elsewhere/run/metrics.jsonl", "dataset_dir": "/data/x", "is_lora": False}
    (tmp_path / "train_result.json").write_text(json.dumps(written))
    result = read_train_result(tmp_path)
    assert result.model_dir == tmp_path / "model" and result.metrics_path == tmp_path / "metrics.jsonl"
    assert result.dataset_dir == Path("/data/x")
