"""Under DeepSpeed the engine clips at its config's gradient_clipping: train.max_grad_norm must set it."""

import pytest

from orpo.train import set_deepspeed_clipping


@pytest.mark.parametrize(
    ("in_file", "max_grad_norm", "clipping", "replaced"),
    [
        (1.0, 0.5, 0.5, 1.0),  # the file's 1.0 (configs/accelerate/deepspeed_zero3.yaml) gives way, and is reported
        (1.0, None, 0.0, 1.0),  # no clipping is DeepSpeed's 0.0
        (1.0, 1.0, 1.0, None),  # same value: nothing to report
        ("auto", 2.0, 2.0, None),  # accelerate would fill "auto" with 1.0
        (None, 0.3, 0.3, None),  # absent from the file: DeepSpeed's default would be no clipping
    ],
)
def test_max_grad_norm_sets_deepspeed_gradient_clipping(in_file, max_grad_norm, clipping, replaced):
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}
    if in_file is not None:
        config["gradient_clipping"] = in_file
    assert set_deepspeed_clipping(config, max_grad_norm) == replaced
    assert config["gradient_clipping"] == clipping
    assert config["zero_optimization"] == {"stage": 3}
