"""Learning-rate schedules come from transformers: our config names map to its schedules of the same shape."""

from __future__ import annotations

import math

import pytest
import torch

from orpo.config import TrainConfig
from orpo.model_setup import HF_SCHEDULERS, setup_lr_scheduler

TOTAL = 200


def _lrs(name: str, warmup: int, peak: float = 1e-3) -> list[float]:
    """Learning rates of the first TOTAL optimizer steps, read off the optimizer like the training loop."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    cfg = TrainConfig(lr_scheduler=name, warmup_steps=warmup, learning_rate=peak)
    scheduler = setup_lr_scheduler(optimizer, cfg, TOTAL)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_every_config_name_has_a_schedule():
    assert set(HF_SCHEDULERS) == set(TrainConfig.model_fields["lr_scheduler"].annotation.__args__)


def test_inverse_sqrt_is_the_papers_warmup_then_inverse_sqrt_decay():
    """With warmup w the official code's schedule (HF Trainer, inverse_sqrt) is lr * min(step / w, sqrt(w / step))."""
    warmup = 10
    for step, lr in enumerate(_lrs("inverse_sqrt", warmup)):
        expected = 1e-3 * (step / warmup if step < warmup else math.sqrt(warmup / step))
        assert lr == pytest.approx(expected, rel=1e-12), step


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_every_schedule_warms_up_linearly_from_zero(name):
    """`constant` must be transformers' constant_with_warmup: its plain `constant` ignores warmup_steps."""
    assert _lrs(name, warmup=8)[:9] == pytest.approx([1e-3 * s / 8 for s in range(9)])


def test_shapes_after_warmup():
    cosine, linear, constant = (_lrs(name, warmup=20) for name in ("cosine", "linear", "constant"))
    assert constant[20:] == pytest.approx([1e-3] * (TOTAL - 20))
    assert cosine[110] == pytest.approx(5e-4) and linear[110] == pytest.approx(5e-4)  # halfway through the decay
    assert cosine[-1] < 1e-6 and linear[-1] < 1e-5
