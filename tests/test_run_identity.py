"""A run's identity: which config fields count, how the inputs combine, and portable model references."""

from __future__ import annotations

import pytest

from orpo.config import ConfigError, load_config
from orpo.run_identity import RunInputs, code_revision, run_inputs, semantic_config_hash


def test_only_fields_that_change_the_weights_change_the_config_hash(tmp_path):
    base = load_config(None, ["model.name_or_path=builtin:tiny-llama"])
    same = load_config(None, [
        "model.name_or_path=models:/orpo-model@champion", f"model.cache_dir={tmp_path}", "run_name=other",
        f"workdir={tmp_path}", "train.output_dir=/x", "train.save_steps=5", "train.logging_steps=7",
        "eval.suites=[preference]", "registry.registered_model_name=x", "orchestration.cron=0 3 * * *",
        "orchestration.launch_with_accelerate=false", "data.test_size=0.5", "data.export=parquet",
        # How the same numbers are computed (memory and speed knobs): tuning them must not retrain a night.
        "train.logprob_chunk_size=64", "train.pad_to_multiple_of=64", "train.setup_self_check=false",
    ])
    assert semantic_config_hash(same) == semantic_config_hash(base)
    for override in ("train.learning_rate=1e-4", "train.lora.r=4", "train.orpo_lambda=0.2", "model.dtype=bfloat16",
                     "train.max_steps=10", "train.seed=1"):
        changed = load_config(None, ["model.name_or_path=builtin:tiny-llama", override])
        assert semantic_config_hash(changed) != semantic_config_hash(base), override


def test_every_input_changes_the_key_and_the_tags_are_searchable():
    inputs = RunInputs("data", "config", "models:/m/1", "abc")
    keys = {inputs.key, RunInputs("data2", "config", "models:/m/1", "abc").key,
            RunInputs("data", "config2", "models:/m/1", "abc").key,
            RunInputs("data", "config", "models:/m/2", "abc").key,
            RunInputs("data", "config", "models:/m/1", "abd").key}
    assert len(keys) == 5
    tags = inputs.tags()
    assert tags["run_inputs"] == inputs.key and tags["run_inputs.start_model"] == "models:/m/1"
    config = load_config(None, [])
    assert run_inputs(config, "data", "builtin:tiny-llama", revision="abc").code_revision == "abc"


def test_code_revision_names_a_commit():
    revision = code_revision()
    assert revision.startswith("source.") or len(revision.split("+")[0]) == 40


def test_incremental_data_needs_the_champion_as_start():
    with pytest.raises(ConfigError, match="start_from: champion"):
        load_config(None, ["data.incremental=true"])
    assert load_config(None, ["data.incremental=true", "orchestration.start_from=champion"]).data.incremental


def test_portable_references(tiny_model_dir, tmp_path):
    from orpo.models import TINY_LLAMA, pin_model, portable_reference

    assert portable_reference(str(tiny_model_dir)) == TINY_LLAMA  # a built-in's cache maps back to its name
    assert portable_reference("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_reference("models:/orpo-model/3") == "models:/orpo-model/3"
    assert portable_reference("models:/orpo-model@champion") is None  # an alias moves
    (tmp_path / "mine").mkdir()
    assert portable_reference(str(tmp_path / "mine")) is None  # a local directory exists only here
    cached = tmp_path / "cache" / "mlflow" / "abc" / "models" / "m" / "2"
    (cached / "model").mkdir(parents=True)
    (cached / ".orpo-source").write_text("models:/m/2")
    assert portable_reference(str(cached / "model")) == "models:/m/2"

    pinned = pin_model(TINY_LLAMA, tiny_model_dir.parent)
    assert (pinned.pinned, pinned.identity, pinned.path) == (TINY_LLAMA, TINY_LLAMA, str(tiny_model_dir))
    local = pin_model(str(tiny_model_dir))
    assert local.identity.startswith(str(tiny_model_dir)) and "#" in local.identity


def test_the_number_of_training_processes_changes_the_config_hash(tmp_path):
    """The accelerate config's num_processes sets the global batch (per device x processes x accumulation), so
    the same YAML on more GPUs trains another model and must not be skipped as unchanged; its path does not
    count."""
    def accelerate_yaml(name: str, processes: int):
        path = tmp_path / name
        path.write_text(f"distributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: {processes}\n")
        return path

    two, two_elsewhere, eight = accelerate_yaml("a.yaml", 2), accelerate_yaml("b.yaml", 2), accelerate_yaml("c.yaml", 8)
    one_process = semantic_config_hash(load_config(None, []))
    hashes = {name: semantic_config_hash(load_config(None, [f"train.accelerate_config={path}"]))
              for name, path in (("two", two), ("two_elsewhere", two_elsewhere), ("eight", eight))}
    assert hashes["two"] == hashes["two_elsewhere"]  # where the file lives is not an input
    assert len({one_process, hashes["two"], hashes["eight"]}) == 3
    # In-process training runs one process whatever the accelerate config says.
    in_process = load_config(None, [f"train.accelerate_config={eight}", "orchestration.launch_with_accelerate=false"])
    assert semantic_config_hash(in_process) == one_process
    with pytest.raises(ConfigError, match="missing.yaml"):
        semantic_config_hash(load_config(None, [f"train.accelerate_config={tmp_path / 'missing.yaml'}"]))


def test_without_git_the_code_revision_is_a_digest_of_the_sources(monkeypatch, tmp_path):
    """A worker where git cannot answer (not installed, a copy without .git, or git refusing a checkout owned by
    another user) used to record "unknown" every night, so a change of the training code never made a run
    differ from the last one. It records a digest of the project's sources instead, which a code change moves."""
    import subprocess

    import orpo.run_identity as identity

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0], stderr="fatal: detected dubious ownership")

    monkeypatch.setattr(identity.subprocess, "run", no_git)
    revision = identity.code_revision()
    assert revision != "unknown" and revision == identity.code_revision()

    for package in ("orpo", "evals"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "loss.py").write_text("LAMBDA = 0.1\n")
    (tmp_path / "orpo" / "__pycache__").mkdir()
    (tmp_path / "orpo" / "__pycache__" / "loss.cpython-311.pyc").write_bytes(b"\x00")
    (tmp_path / "runs").mkdir()  # outputs are not code
    before = identity.source_digest(tmp_path)
    (tmp_path / "runs" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "orpo" / "__pycache__" / "loss.cpython-311.pyc").write_bytes(b"\x01")
    assert identity.source_digest(tmp_path) == before
    (tmp_path / "orpo" / "loss.py").write_text("LAMBDA = 0.2\n")
    assert identity.source_digest(tmp_path) != before
