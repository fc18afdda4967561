"""A run killed with SIGKILL after a checkpoint, then re-run, ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import read_metrics, toy_config, write_toy_dataset

from orpo.config import dump_config

STEPS = 10


def _kill_after_first_checkpoint(command: list[str], checkpoints: Path, env: dict, timeout: float = 300.0) -> int:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        return process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (model_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(model_dir / name))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_killed_run_resumes_to_the_uninterrupted_result(lora, tiny_model_dir, tmp_path):
    """Checkpoint every 2 steps; SIGKILL the run as soon as the first checkpoint is on disk; re-run with the
    same output directory. Optimizer, schedule (cosine with warmup), RNG (LoRA dropout draws from it) and
    the position in the data are restored, so on CPU the final weights are bit-for-bit those of a run that
    was never interrupted."""
    from orpo.train import train

    dataset = write_toy_dataset(tmp_path / "dataset")
    lora_settings = {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.1}
    config = toy_config(tmp_path, tiny_model_dir, max_steps=STEPS, per_device_batch_size=4, save_steps=2,
                        save_total_limit=2, lr_scheduler="cosine", warmup_steps=3, learning_rate=1e-3,
                        eval_steps=5, lora=lora_settings)
    config_file = dump_config(config, tmp_path / "config.yaml")
    resumed_dir = tmp_path / "resumed"
    command = [sys.executable, "-m", "orpo.train", "--config", str(config_file), "--dataset-dir", str(dataset),
               "--output-dir", str(resumed_dir)]
    code = _kill_after_first_checkpoint(command, resumed_dir / "checkpoints", env=dict(os.environ))
    assert code == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (resumed_dir / "model" / "export_complete.json").exists()

    resumed = train(config, dataset, resumed_dir)
    uninterrupted = train(config, dataset, tmp_path / "uninterrupted")

    first, second = _weights(resumed.model_dir), _weights(uninterrupted.model_dir)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name
    # The log reads as one run: each step once, in order (lines past the checkpoint were dropped).
    steps = [row["step"] for row in read_metrics(resumed.metrics_path) if "loss" in row]
    assert steps == list(range(1, STEPS + 1))
    assert resumed.final_metrics["eval_loss"] == pytest.approx(uninterrupted.final_metrics["eval_loss"], abs=1e-12)
    # Only the last save_total_limit checkpoints are kept, and LoRA ones hold only the adapter.
    kept = {p.name for p in (resumed_dir / "checkpoints").iterdir()}
    assert kept == {f"step-{STEPS - 2}", f"step-{STEPS}"}
    checkpoint_weights = _weights_file_keys(resumed_dir / "checkpoints" / f"step-{STEPS}" / "model.safetensors")
    assert all("lora_" in key for key in checkpoint_weights) == lora


def _weights_file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


# ---- a corrupt newest checkpoint ------------------------------------------------------------------------


def _corrupt_weights(checkpoint: Path) -> Path:
    weights = checkpoint / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return weights


def _corrupt_state(checkpoint: Path) -> Path:
    state = checkpoint / "trainer_state.json"
    state.write_text('{"global_step": 6, "config_ha', encoding="utf-8")
    return state


@pytest.mark.parametrize("corrupt", [_corrupt_weights, _corrupt_state], ids=["truncated-weights", "bad-state"])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(corrupt, tiny_model_dir, tmp_path,
                                                                            caplog):
    """A finished run's newest checkpoint (step 6) is damaged; re-running with the same output directory moves
    it aside with a warning naming the file, resumes from step 4, and ends with the uninterrupted weights."""
    from orpo.train import train

    dataset = write_toy_dataset(tmp_path / "dataset", train_pairs=16, test_pairs=4)
    config = toy_config(tmp_path, tiny_model_dir, max_steps=6, per_device_batch_size=4, save_steps=2,
                        save_total_limit=3, lr_scheduler="cosine", warmup_steps=2, learning_rate=1e-3,
                        lora={"enabled": False})
    output = tmp_path / "out"
    uninterrupted = _weights(train(config, dataset, output).model_dir)
    checkpoints = output / "checkpoints"
    damaged = corrupt(checkpoints / "step-6")

    with caplog.at_level("WARNING", logger="orpo.checkpoints"):
        resumed = train(config, dataset, output)
    assert str(damaged) in caplog.text and "corrupt" in caplog.text
    assert (checkpoints / "step-6.corrupt").is_dir()
    assert resumed.global_step == 6 and (checkpoints / "step-6").is_dir()  # re-trained from step 4
    weights = _weights(resumed.model_dir)
    assert weights.keys() == uninterrupted.keys()
    for name in weights:
        assert weights[name].equal(uninterrupted[name]), name
    steps = [row["step"] for row in read_metrics(resumed.metrics_path) if "loss" in row]
    assert steps == list(range(1, 7))


def test_no_intact_checkpoint_says_how_to_start_over(tiny_model_dir, tmp_path):
    from orpo.checkpoints import CheckpointError
    from orpo.train import train

    dataset = write_toy_dataset(tmp_path / "dataset", train_pairs=8, test_pairs=2)
    config = toy_config(tmp_path, tiny_model_dir, max_steps=2, per_device_batch_size=4, save_steps=1,
                        lora={"r": 4, "alpha": 8})
    output = tmp_path / "out"
    train(config, dataset, output)
    for checkpoint in (output / "checkpoints").iterdir():
        _corrupt_state(checkpoint)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints: all 2 were corrupt.*"
                                              r"To start over, delete .*out or pass a new --output-dir"):
        train(config, dataset, output)


def test_checkpoint_problem_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from orpo.checkpoints import checkpoint_problem

    checkpoint = tmp_path / "step-1"
    checkpoint.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(checkpoint / "model.safetensors"))
    torch.save({"state": {}}, checkpoint / "optimizer.bin")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 1}')
    assert checkpoint_problem(checkpoint) is None

    _corrupt_weights(checkpoint)
    assert checkpoint_problem(checkpoint).startswith(f"{checkpoint / 'model.safetensors'} is truncated")
    save_file({"w": torch.ones(64, 64)}, str(checkpoint / "model.safetensors"))
    (checkpoint / "optimizer.bin").write_bytes((checkpoint / "optimizer.bin").read_bytes()[:100])
    assert "optimizer.bin is not a complete torch.save archive" in checkpoint_problem(checkpoint)
    _corrupt_state(checkpoint)
    assert checkpoint_problem(checkpoint).startswith(f"{checkpoint / 'trainer_state.json'} is unreadable")


def test_a_checkpoint_of_other_inputs_is_refused_and_a_longer_run_resumes(tiny_model_dir, tmp_path):
    """An output directory reused for other inputs (a fixed run_name or train.output_dir on a nightly schedule,
    a rerun on new data or at another learning rate) used to resume the old checkpoint with a warning: the new
    data's run started at the old run's last step with its weights, optimizer and schedule (the restored
    schedule even keeps the old learning rate), and a finished run trained nothing at all, exporting the old
    weights as the new model. It is refused, naming what differs. Asking for more steps still resumes."""
    from orpo.checkpoints import CheckpointError
    from orpo.train import train

    dataset = write_toy_dataset(tmp_path / "dataset", train_pairs=8, test_pairs=2)
    config = toy_config(tmp_path, tiny_model_dir, max_steps=2, per_device_batch_size=4, save_steps=2,
                        lora={"r": 4, "alpha": 8})
    output = tmp_path / "out"
    train(config, dataset, output)

    longer = train(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 4})}),
                   dataset, output)
    assert longer.global_step == 4
    assert [row["step"] for row in read_metrics(longer.metrics_path) if "loss" in row] == [1, 2, 3, 4]

    new_data = write_toy_dataset(tmp_path / "new-data", train_pairs=12, test_pairs=2)
    with pytest.raises(CheckpointError, match=r"step-4 .*dataset.*new --output-dir"):
        train(config, new_data, output)
    other_lr = config.model_copy(update={"train": config.train.model_copy(update={"learning_rate": 1e-4})})
    with pytest.raises(CheckpointError, match=r"train\.learning_rate"):
        train(other_lr, dataset, output)
