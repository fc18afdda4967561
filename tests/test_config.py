"""The config tree: defaults, YAML loading, dotted overrides, and error messages a person can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from orpo.config import ConfigError, PipelineConfig, dump_config, flatten, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate_and_hash_is_stable():
    first, second = PipelineConfig(), PipelineConfig()
    assert first.config_hash() == second.config_hash()
    assert first.train.orpo_lambda == 0.1
    assert first.train.lr_scheduler == "inverse_sqrt"
    assert first.model.trust_remote_code is False


@pytest.mark.parametrize("name", ["demo.yaml", "mistral-7b-orpo-beta.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(CONFIGS / name)
    assert config.data.source


def test_paper_recipe_matches_the_authors_script(monkeypatch):
    from orpo.run_identity import training_processes

    monkeypatch.chdir(CONFIGS.parent)  # train.accelerate_config is relative to the repository root
    config = load_config(CONFIGS / "mistral-7b-orpo-beta.yaml")
    assert config.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert config.data.source == "argilla/ultrafeedback-binarized-preferences-cleaned"
    assert (config.train.learning_rate, config.train.lr_scheduler, config.train.warmup_steps) == (5e-6, "inverse_sqrt", 200)
    assert (config.train.orpo_lambda, config.train.max_length, config.train.max_prompt_length) == (0.1, 2048, 1792)
    assert config.train.mixed_precision == "bf16"
    # The authors' global batch: 4 A100s x 8 per device x 1 accumulation = 32. What counts is the processes the
    # config's own accelerate file launches, not the authors' 4.
    processes = training_processes(config)
    assert processes * config.train.per_device_batch_size * config.train.gradient_accumulation_steps == 32
    # MT-Bench answers at FastChat's 1024 new tokens, else its numbers are not logged as mt_bench/*.
    from evals.protocols import OFFICIAL_MT_BENCH_MAX_NEW_TOKENS

    assert (config.eval.mt_bench_max_new_tokens or config.eval.max_new_tokens) == OFFICIAL_MT_BENCH_MAX_NEW_TOKENS


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(CONFIGS / "demo.yaml", ["train.learning_rate=1e-5", "train.lora.r=8",
                                                  "eval.suites=[preference]", "train.lora.enabled=false"])
    assert config.train.learning_rate == 1e-5
    assert config.train.lora.r == 8
    assert config.train.lora.enabled is False
    assert config.eval.suites == ["preference"]


def test_bad_value_names_key_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.recipe=h5"])
    message = str(info.value)
    assert "data.recipe" in message and "'h5'" in message and "argilla" in message


def test_unknown_key_is_an_error_not_ignored():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.learning_rat=1e-5"])
    assert "train.learning_rat" in str(info.value) and "unknown key" in str(info.value)


def test_cross_field_rule_explains_itself():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.max_length=256", "train.max_prompt_length=512"])
    assert "max_prompt_length (512)" in str(info.value) and "max_length (256)" in str(info.value)


def test_negative_number_is_refused_with_the_bound():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.per_device_batch_size=0"])
    assert "train.per_device_batch_size" in str(info.value) and "greater than 0" in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("train.learning_rate")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("train..r=3")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["workdir=x", "workdir.sub=1"])


def test_dump_round_trip_and_flatten(tmp_path):
    config = load_config(CONFIGS / "demo.yaml")
    path = dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(path) == config
    flat = flatten(config)
    assert flat["train.lora.r"] == str(config.train.lora.r)
    assert flat["model.name_or_path"] == config.model.name_or_path
    assert not any("api_key" in key and key != "eval.judge.api_key_env" and key != "eval.judge.api_key_secret"
                   for key in flat)


def test_tracking_uri_defaults_to_sqlite_in_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(None, [f"workdir={tmp_path}"])
    assert config.resolved_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert config.resolved_tracking_uri() == "http://127.0.0.1:5000"


def test_paper_recipe_drops_pairs_whose_prompt_training_would_cut():
    """xfactlab/orpo's main.py keeps only rows whose chat-formatted prompt is shorter than prompt_max_length
    (1792): those pairs are dropped, never trained on with a left-truncated prompt. The limit is counted with
    the model's tokenizer and the template training uses (data.tokenizer: the model itself)."""
    config = load_config(CONFIGS / "mistral-7b-orpo-beta.yaml")
    assert config.data.max_prompt_tokens == config.train.max_prompt_length == 1792
    assert config.data.tokenizer == config.model.name_or_path
