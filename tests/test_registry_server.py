"""Registration, evaluation, promotion and loading by alias against a real `mlflow server` on loopback
(sqlite backend, proxied artifacts), started and stopped by the test."""

from __future__ import annotations

import pytest
from test_registry_helpers import MlflowServer, make_train_dir

from orpo.config import PipelineConfig
from orpo.gate import promote
from orpo.registry import champion_uri, configure_mlflow, log_evaluation, register_training_run

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def test_register_evaluate_promote_and_load_by_alias_through_a_server(server, tmp_path, tiny_model_dir):
    import mlflow
    from mlflow import MlflowClient

    config = PipelineConfig.model_validate(
        {"workdir": str(tmp_path / "work"),
         # The point-estimate rules: these versions carry metrics, not the evaluation files head_to_head pairs;
         # the first version becomes champion without a comparison (there is no start-model evaluation here).
         "registry": {"tracking_uri": server.url, "registered_model_name": "srv",
                      "gate": {"mode": "threshold", "first_version": "promote"}}}
    )
    assert configure_mlflow(config) == server.url
    assert champion_uri(config) is None
    full = register_training_run(config, make_train_dir(tmp_path, lora=False, base_dir=tiny_model_dir, seed=0))
    lora_dir = make_train_dir(tmp_path, lora=True, base_dir=tiny_model_dir, seed=1)
    lora = register_training_run(config, lora_dir)
    assert (full.version, lora.version) == ("1", "2") and full.created and lora.created
    assert not register_training_run(config, lora_dir).created  # idempotent through the REST API too

    log_evaluation(config, full, {"mt_bench/score": 5.0, "alpaca/win_rate": 10.0, "preference/accuracy": 0.6})
    log_evaluation(config, lora, {"mt_bench/score": 4.5, "alpaca/win_rate": 9.0, "preference/accuracy": 0.6})
    assert promote(config, full).promoted  # no champion yet, first_version: promote
    decision = promote(config, lora)
    assert not decision.promoted and decision.compared["mt_bench/score"]["delta"] == pytest.approx(-0.5)
    assert champion_uri(config) == "models:/srv@champion"

    client = MlflowClient()
    assert str(client.get_model_version_by_alias("srv", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("srv", "challenger").version) == "2"
    assert client.get_model_version("srv", "2").tags["gate.decision"] == "rejected"
    # No files were written to a local store: everything went through the server.
    assert not (tmp_path / "work" / "mlflow.db").exists()

    for alias in ("champion", "challenger"):
        generator = mlflow.transformers.load_model(f"models:/srv@{alias}")
        text = generator("Two plus two", max_new_tokens=6, do_sample=False)[0]["generated_text"]
        assert text.startswith("Two plus two") and len(text) > len("Two plus two")
