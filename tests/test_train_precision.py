"""Mixed precision on CPU: full fine-tuning never updates bf16 weights unless told to; with bf16 autocast
and float32 master weights a 5e-6 learning rate moves the weights; LoRA adapters are float32."""

from __future__ import annotations

import pytest
import torch
from test_train import toy_config, write_toy_dataset

from orpo.config import ConfigError


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses a second mixed precision: reset it around
    each test (as accelerate's own test case does), so bf16 runs can follow fp32 ones in one pytest process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("precision") / "dataset", train_pairs=16, test_pairs=4)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


def _run(config, dataset, output):
    """Set up, train, and return (trainable weights before, after, the unwrapped model)."""
    from orpo.train import ORPORecipe

    recipe = ORPORecipe(config, dataset, output)
    recipe.setup()
    try:
        model = recipe.accelerator.unwrap_model(recipe.model)
        before = _weights(model)
        recipe.train()
        return before, _weights(model), model
    finally:
        recipe.cleanup()


def _moved_share(before, after) -> float:
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_bf16_loaded_full_fine_tuning_is_refused_with_what_to_set(tiny_model_dir, dataset, tmp_path):
    from orpo.train import ORPORecipe

    config = toy_config(tmp_path, tiny_model_dir, lora={"enabled": False}, mixed_precision="bf16")
    config.model.dtype = "bfloat16"
    recipe = ORPORecipe(config, dataset, tmp_path / "out")
    with pytest.raises(ConfigError) as error:
        recipe.setup()
    message = str(error.value)
    for hint in ("model.dtype=bfloat16", "model.dtype=float32", "train.mixed_precision=bf16", "FSDP",
                 "train.allow_low_precision_master_weights=true"):
        assert hint in message, hint
    assert not (tmp_path / "out").exists()  # nothing was written


def test_autocast_with_fp32_masters_moves_weights_at_5e_6_and_bf16_weights_do_not(tiny_model_dir, dataset, tmp_path):
    """The issue's arithmetic: an AdamW step at 5e-6 is below half a bf16 ulp for any weight above ~1.3e-3."""
    settings = dict(lora={"enabled": False}, learning_rate=5e-6, max_steps=2, mixed_precision="bf16",
                    max_grad_norm=None)
    config = toy_config(tmp_path, tiny_model_dir, **settings)  # model.dtype auto: float32 on CPU
    before, after, model = _run(config, dataset, tmp_path / "fp32-masters")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _moved_share(before, after) > 0.9

    low = toy_config(tmp_path, tiny_model_dir, allow_low_precision_master_weights=True, **settings)
    low.model.dtype = "bfloat16"
    before, after, model = _run(low, dataset, tmp_path / "bf16-weights")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert _moved_share(before, after) < 0.2  # most updates rounded away


def test_lora_adapters_are_float32_on_a_bf16_base(tiny_model_dir, dataset, tmp_path):
    config = toy_config(tmp_path, tiny_model_dir, max_steps=2, mixed_precision="bf16",
                        lora={"r": 4, "alpha": 8, "dropout": 0.0})
    config.model.dtype = "bfloat16"
    before, after, model = _run(config, dataset, tmp_path / "lora")
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert _moved_share(before, after) > 0.4  # lora_B starts at zero; every element of it moves
