"""The ORPO training loop on a tiny model (CPU): it learns, it exports completely, its batches are exact.

The toy preference task: every chosen response is a random string of words from GOOD, every rejected one a
random string of words from BAD, after a random prompt. Held-out pairs are new random strings, so a
random model ranks them by chance (~50%), and learning the preference means learning which tokens are
preferred, which a 2-layer model does in a few dozen steps.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from orpo.config import PipelineConfig, validate_config

GOOD = ["Paris", "water", "four", "poem", "sea", "energy", "plants", "light"]
BAD = ["not", "sure", "cannot", "lazy", "dog", "help", "question", "boils"]


def toy_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        user = {"role": "user", "content": "Please write " + " ".join(rng.choices(GOOD + BAD, k=rng.randint(2, 6)))}
        good = " ".join(rng.choices(GOOD, k=rng.randint(3, 10)))
        bad = " ".join(rng.choices(BAD, k=rng.randint(3, 10)))
        pairs.append({
            "prompt": [user],
            "chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}],
        })
    return pairs


def write_toy_dataset(path: Path, train_pairs: int = 64, test_pairs: int = 32) -> Path:
    """A DatasetDict like the prepare stage writes (train/test, message-list columns), saved to disk."""
    from datasets import Dataset, DatasetDict

    DatasetDict({
        "train": Dataset.from_list(toy_pairs(train_pairs, seed=1)),
        "test": Dataset.from_list(toy_pairs(test_pairs, seed=2)),
    }).save_to_disk(str(path))
    return path


def toy_config(tmp_path: Path, model_dir: Path, **train) -> PipelineConfig:
    """A small, fast config: the tiny Llama, short rows, a constant high learning rate."""
    settings = {"max_length": 64, "max_prompt_length": 32, "per_device_batch_size": 8, "max_steps": 20,
                "learning_rate": 2e-3, "lr_scheduler": "constant", "logging_steps": 1, "seed": 0}
    settings.update(train)
    return validate_config({"workdir": str(tmp_path / "runs"), "model": {"name_or_path": str(model_dir)},
                            "train": settings})


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "dataset")


# ---- learning ------------------------------------------------------------------------------------------


def _train_with_eval_before(config: PipelineConfig, dataset: Path, output: Path):
    """Run the recipe, measuring held-out metrics of the untrained model first."""
    from orpo.train import ORPORecipe

    recipe = ORPORecipe(config, dataset, output)
    recipe.setup()
    try:
        before = recipe.evaluate()
        recipe.train()
        return before, recipe.export()
    finally:
        recipe.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_lowers_loss_and_learns_held_out_preference(lora, tiny_model_dir, toy_dataset, tmp_path):
    config = toy_config(tmp_path, tiny_model_dir, lora={"enabled": lora, "r": 8, "alpha": 16, "dropout": 0.0},
                        gradient_checkpointing=lora)
    before, result = _train_with_eval_before(config, toy_dataset, tmp_path / "out")

    train_rows = [row for row in read_metrics(result.metrics_path) if "loss" in row]
    assert [row["step"] for row in train_rows] == list(range(1, 21))
    first = sum(row["loss"] for row in train_rows[:3]) / 3
    last = sum(row["loss"] for row in train_rows[-3:]) / 3
    assert last < first - 0.1, (first, last)

    after = result.final_metrics
    assert before["eval_rewards/accuracies"] < 0.8  # the untrained model ranks held-out pairs near chance
    assert after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    assert after["eval_loss"] < before["eval_loss"]
    for name in ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                 "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm",
                 "learning_rate", "tokens_per_second", "peak_memory_mb", "padding_fraction", "epoch"):
        assert name in after, name
    assert result.is_lora is lora and result.global_step == 20


def test_eight_bit_adamw_trains_on_cpu(toy_dataset, tmp_path):
    """bitsandbytes' 8-bit AdamW (CPU-capable since 0.48) keeps its moments in uint8 and still learns.

    bitsandbytes keeps 32-bit moments for tensors under 4096 elements (its min_8bit_size); the rest are 8-bit.
    """
    pytest.importorskip("bitsandbytes")
    from orpo.models import build_tiny_llama
    from orpo.train import ORPORecipe

    model, tokenizer = build_tiny_llama(seed=0, hidden_size=64, layers=2)  # 64 x 256 MLP weights: 8-bit moments
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = toy_config(tmp_path, tmp_path / "model", optimizer="adamw_8bit", lora={"enabled": False})
    recipe = ORPORecipe(config, toy_dataset, tmp_path / "out")
    recipe.setup()
    try:
        before = recipe.evaluate()
        recipe.train()
        after = recipe.evaluate()
        optimizer = getattr(recipe.optimizer, "optimizer", recipe.optimizer)  # inside accelerate's wrapper
        states = [(param.numel(), state["state1"].dtype) for param, state in optimizer.state.items()]
    finally:
        recipe.cleanup()
    large = [dtype for numel, dtype in states if numel >= 4096]
    assert large and all(dtype == torch.uint8 for dtype in large), sorted(states)[-5:]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]


def test_lora_export_adapter_and_merged_model(tiny_model_dir, toy_dataset, tmp_path):
    """The adapter points at the resolved base, and the merged model computes what base + adapter does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = toy_config(tmp_path, tiny_model_dir, max_steps=3,
                        lora={"r": 4, "alpha": 8, "dropout": 0.0, "merge_on_export": True})
    from orpo.train import train

    result = train(config, toy_dataset, tmp_path / "out")
    adapter_config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == result.base_model_path == str(tiny_model_dir.resolve())
    for name in ("adapter_model.safetensors", "tokenizer.json", "generation_config.json", "orpo_config.yaml",
                 "metrics.json", "export_complete.json"):
        assert (result.model_dir / name).is_file(), name
    assert (result.merged_dir / "model.safetensors").is_file() and (result.merged_dir / "export_complete.json").is_file()

    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, result.model_dir).eval()  # wraps `base` in place
        merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32).eval()
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-4)  # training changed something


# ---- export ------------------------------------------------------------------------------------------


def test_export_complete_written_last_and_train_result_round_trips(tiny_model_dir, toy_dataset, tmp_path):
    from orpo.train import EXPORT_COMPLETE, TRAIN_RESULT, TrainResult, train

    config = toy_config(tmp_path, tiny_model_dir, max_steps=2, lora={"enabled": False})
    result = train(config, toy_dataset, tmp_path / "out")

    marker = result.model_dir / EXPORT_COMPLETE
    files = [p for p in result.model_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "generation_config.json",
                                       "tokenizer.json", "orpo_config.yaml", "metrics.json", EXPORT_COMPLETE}
    assert all(p.stat().st_mtime_ns <= marker.stat().st_mtime_ns for p in files)
    assert json.loads(marker.read_text())["global_step"] == 2
    result_file = result.output_dir / TRAIN_RESULT
    assert result_file.stat().st_mtime_ns >= marker.stat().st_mtime_ns

    saved = TrainResult.from_json(json.loads(result_file.read_text()))
    assert saved == result
    assert TrainResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    assert saved.mlflow_run_id is None and saved.merged_dir is None and not saved.is_lora
    assert json.loads((result.model_dir / "metrics.json").read_text()) == pytest.approx(result.final_metrics)


def test_default_output_dir(tmp_path):
    from datetime import datetime, timezone

    from orpo.train import default_output_dir

    config = validate_config({"workdir": str(tmp_path), "model": {"name_or_path": "builtin:tiny-llama"}})
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert default_output_dir(config, when) == tmp_path / "train" / "tiny-llama-20260102-030405"
    named = config.model_copy(update={"run_name": "nightly"})
    assert default_output_dir(named) == tmp_path / "train" / "nightly"


@pytest.mark.slow  # MLflow's sqlite store migrates its schema on first use
def test_metrics_logged_live_to_an_active_mlflow_run(tiny_model_dir, toy_dataset, tmp_path, monkeypatch):
    import mlflow

    from orpo.train import train

    # MLflow keeps the tracking URI (in the environment) and the active experiment in process-wide state:
    # isolate both from whatever an earlier test left there.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("train-live-logging")
    config = toy_config(tmp_path, tiny_model_dir, max_steps=2, lora={"r": 4, "alpha": 8})
    with mlflow.start_run() as run:
        result = train(config, toy_dataset, tmp_path / "out")
    assert result.mlflow_run_id == run.info.run_id
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "eval_rewards/accuracies")


# ---- batches and normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize("group_by_length", [True, False])
def test_batch_plan_splits_the_same_global_batches_whatever_the_processes(group_by_length):
    """Same global batch => same pairs per step for any processes x accumulation factorisation; each
    step's micro-batches partition its pairs; epochs are permutations; same seed, same order."""
    from orpo.batching import BatchPlan

    lengths = [random.Random(i).randint(5, 500) for i in range(103)]

    def plan(per_device, processes, accumulation, seed=3):
        return BatchPlan(lengths, per_device_batch_size=per_device, num_processes=processes,
                         gradient_accumulation_steps=accumulation, seed=seed, group_by_length=group_by_length)

    reference = plan(8, 1, 1)
    assert reference.steps_per_epoch == 12  # 103 // 8, the remainder is left out
    for other in (plan(4, 2, 1), plan(2, 2, 2), plan(1, 4, 2)):
        for step in range(30):  # across epoch boundaries
            assert other.step_pairs(step) == reference.step_pairs(step)
            micro = [m for rank in range(other.num_processes) for m in other.micro_batches(step, rank)]
            assert sorted(i for m in micro for i in m) == sorted(reference.step_pairs(step))
            assert all(len(m) == other.per_device_batch_size for m in micro)
    epoch0 = [i for s in range(12) for i in reference.step_pairs(s)]
    epoch1 = [i for s in range(12, 24) for i in reference.step_pairs(s)]
    assert len(set(epoch0)) == 96 and epoch0 != epoch1
    assert plan(8, 1, 1).step_pairs(13) == reference.step_pairs(13)
    assert plan(8, 1, 1, seed=4).step_pairs(0) != reference.step_pairs(0)
    if group_by_length:  # pairs of a step have similar lengths: much less spread than random batches
        spread = sum(max(lengths[i] for i in reference.step_pairs(s)) - min(lengths[i] for i in reference.step_pairs(s))
                     for s in range(12))
        assert spread < 12 * 150


def test_gradient_accumulation_steps_follow_the_one_big_batch(tiny_model_dir, toy_dataset, tmp_path):
    """4 micro-batches of 2 pairs per optimizer step train like one batch of 8: the same pairs (BatchPlan),
    every micro-batch normalised by the step's totals and `accelerator.backward`'s division by the accumulation
    steps undone. A per-micro-batch mean would change the loss by more than 1e-6 (its NLL weights short batches
    up) and a missing x4 would quarter the gradient norm. The schedule counts optimizer steps (inverse_sqrt with
    2 warmup steps: the same learning rate at every logged step)."""
    from orpo.train import train

    runs = {}
    for name, per_device, accumulation in (("one", 8, 1), ("accumulated", 2, 4)):
        config = toy_config(tmp_path, tiny_model_dir, max_steps=4, per_device_batch_size=per_device,
                            gradient_accumulation_steps=accumulation, learning_rate=1e-3, lr_scheduler="inverse_sqrt",
                            warmup_steps=2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
        result = train(config, toy_dataset, tmp_path / name)
        runs[name] = [row for row in read_metrics(result.metrics_path) if "loss" in row]
    assert [row["step"] for row in runs["accumulated"]] == [1, 2, 3, 4]
    for big, accumulated in zip(runs["one"], runs["accumulated"]):
        assert accumulated["loss"] == pytest.approx(big["loss"], abs=1e-6)
        assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
        assert accumulated["learning_rate"] == big["learning_rate"]
    # transformers' inverse_sqrt, stepped once per optimizer step (logged after the step: the next step's rate).
    assert [row["learning_rate"] for row in runs["one"]] == pytest.approx([5e-4, 1e-3, 1e-3 * (2 / 3) ** 0.5,
                                                                           1e-3 * (2 / 4) ** 0.5])


def test_eval_batches_give_every_process_the_same_number_of_batches():
    from orpo.batching import eval_batches

    lengths = list(range(7))
    shards = [eval_batches(lengths, batch_size=2, num_processes=3, process_index=r) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    assert sorted(i for s in shards for b in s for i in b) == list(range(7))
    assert shards[0][0][0] == 6  # longest first: batches of similar lengths
    assert shards[1][-1] == [] and shards[2][-1] == []  # out of pairs: an empty batch, run as padding and ignored


@pytest.mark.parametrize("layout", ["stacked", "shared_prompt"])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_nll_token_count_matches_logprobs(nll_on_prompt, layout, tiny_model_and_tokenizer):
    """The step normalisers are counted from token lengths before any forward; they must equal the
    token counts orpo.logprobs actually sums over, in either batch layout."""
    from orpo.collate import make_collator, tokenize_pair
    from orpo.logprobs import model_sequence_logps
    from orpo.batching import nll_token_count

    model, tokenizer = tiny_model_and_tokenizer
    features = [tokenize_pair(pair, tokenizer, 64, 32) for pair in toy_pairs(5, seed=9)]
    batch = make_collator(layout, tokenizer.pad_token_id)(features)
    seq = model_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt, chunk_size=16)
    assert seq.nll_tokens.item() == sum(nll_token_count(f, nll_on_prompt) for f in features)


def test_metrics_from_sums_are_global_means():
    from orpo.loss import PAIR_SUM_KEYS
    from orpo.train_metrics import SUM_KEYS, metrics_from_sums

    assert SUM_KEYS[: len(PAIR_SUM_KEYS)] == PAIR_SUM_KEYS  # batch_sums stacks the loss's sums first

    sums = {"nll_sum": 30.0, "nll_tokens": 10.0, "pairs": 4.0, "log_sigmoid_sum": -2.0, "log_ratio_sum": 1.0,
            "chosen_logps_sum": -4.0, "rejected_logps_sum": -8.0, "correct": 3.0, "real_tokens": 90.0,
            "input_tokens": 75.0, "padded_tokens": 100.0}
    metrics = metrics_from_sums(sums, orpo_lambda=0.1)
    assert metrics["nll_loss"] == 3.0
    assert metrics["log_odds_ratio"] == -0.5
    assert metrics["loss"] == pytest.approx(3.0 + 0.1 * 0.5)
    assert metrics["rewards/chosen"] == pytest.approx(-0.1) and metrics["rewards/rejected"] == pytest.approx(-0.2)
    assert metrics["rewards/margins"] == pytest.approx(0.1) and metrics["rewards/accuracies"] == 0.75
    assert metrics["logps/chosen"] == -1.0 and metrics["padding_fraction"] == 0.25


def test_bad_inputs_are_clear_errors(tiny_model_dir, toy_dataset, tmp_path):
    from orpo.config import ConfigError
    from orpo.train import train

    with pytest.raises(ConfigError, match="does not exist"):
        train(toy_config(tmp_path, tiny_model_dir), tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(toy_config(tmp_path, tiny_model_dir, per_device_batch_size=64, gradient_accumulation_steps=2),
              toy_dataset, tmp_path / "out")
    with pytest.raises(ConfigError, match="QLoRA needs a CUDA GPU"):
        train(toy_config(tmp_path, tiny_model_dir, lora={"load_in_4bit": True}), toy_dataset, tmp_path / "out")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="adamw_8bit needs the bitsandbytes package"):
            train(toy_config(tmp_path, tiny_model_dir, optimizer="adamw_8bit"), toy_dataset, tmp_path / "out")


def test_dataset_is_checked_before_anything_is_built(tiny_model_dir, tmp_path):
    """An empty train split or missing columns stop in one message, and leave no output directory behind."""
    from datasets import Dataset, DatasetDict

    from orpo.config import ConfigError
    from orpo.train import train

    empty = tmp_path / "empty"
    test = Dataset.from_list(toy_pairs(2, seed=0))
    DatasetDict({"train": test.select([]), "test": test}).save_to_disk(str(empty))
    _add_empty_shard(empty / "train", test.features)  # as orpo.data.binarize writes 0 pairs
    with pytest.raises(ConfigError, match=r"the train split of .*empty is empty: nothing to train on"):
        train(toy_config(tmp_path, tiny_model_dir), empty, tmp_path / "out")
    columns = tmp_path / "columns"
    DatasetDict({"train": Dataset.from_list([{"prompt": "hi", "answer": "hello"}])}).save_to_disk(str(columns))
    with pytest.raises(ConfigError, match=r"has no chosen, rejected column"):
        train(toy_config(tmp_path, tiny_model_dir), columns, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_setup_leaves_no_checkpoints_dir(tiny_model_dir, toy_dataset, tmp_path):
    from orpo.config import ConfigError
    from orpo.train import train

    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(toy_config(tmp_path, tiny_model_dir, per_device_batch_size=512), toy_dataset, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()


def _add_empty_shard(split_dir: Path, features) -> None:
    """save_to_disk writes no data file for an empty split; give it one with the schema and no rows."""
    import pyarrow as pa

    name = "data-00000-of-00001.arrow"
    with pa.ipc.new_stream(str(split_dir / name), features.arrow_schema):
        pass
    state = json.loads((split_dir / "state.json").read_text())
    state["_data_files"] = [{"filename": name}]
    (split_dir / "state.json").write_text(json.dumps(state))

