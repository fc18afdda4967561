"""Learning-rate schedules: the shapes we document, and the same numbers as transformers' schedules."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from orpo.schedules import SCHEDULES, build_lr_scheduler, lr_factor

TOTAL = 200


def _lrs(name: str, warmup: int, total: int = TOTAL, peak: float = 1e-3) -> list[float]:
    """Learning rates of the first `total` optimizer steps, read off the optimizer like a training loop."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = build_lr_scheduler(optimizer, name, warmup_steps=warmup, total_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_inverse_sqrt_is_min_of_warmup_and_inverse_sqrt_decay():
    """With warmup w the paper's schedule is lr * min(step / w, sqrt(w / step))."""
    warmup = 10
    lrs = _lrs("inverse_sqrt", warmup)
    for step, lr in enumerate(lrs):
        expected = 1e-3 * (step / warmup if step < warmup else math.sqrt(warmup / step))
        assert lr == pytest.approx(expected, rel=1e-12), step
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == warmup
    assert lrs[4 * warmup] == pytest.approx(1e-3 / 2)  # four times the warmup: half the peak


def test_inverse_sqrt_without_warmup_uses_hf_default_timescale():
    """HF's inverse_sqrt with no warmup decays as 1/sqrt((step + 10000) / 10000): 1.0 at step 0."""
    assert lr_factor("inverse_sqrt", 0, 0, TOTAL) == 1.0
    assert lr_factor("inverse_sqrt", 30_000, 0, TOTAL) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_zero(name):
    lrs = _lrs(name, warmup=8)
    assert lrs[:9] == pytest.approx([1e-3 * s / 8 for s in range(9)])


def test_shapes_after_warmup():
    cosine, linear, constant = (_lrs(name, warmup=20) for name in ("cosine", "linear", "constant"))
    assert constant[20:] == pytest.approx([1e-3] * (TOTAL - 20))
    # Halfway through the decay: cosine and linear both at half the peak.
    assert cosine[110] == pytest.approx(5e-4) and linear[110] == pytest.approx(5e-4)
    # Monotone decay towards 0 at the last step.
    assert all(a >= b for a, b in pairwise(cosine[20:]))
    assert all(a >= b for a, b in pairwise(linear[20:]))
    assert lr_factor("cosine", TOTAL, 20, TOTAL) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("linear", TOTAL, 20, TOTAL) == 0.0
    assert lr_factor("linear", TOTAL + 5, 20, TOTAL) == 0.0  # never negative past the end


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 7])
def test_matches_transformers_schedules(name, warmup):
    """Same learning rate at every step as transformers' schedule of the same name (what the HF Trainer
    and the official ORPO code use)."""
    import transformers

    hf_factories = {
        "inverse_sqrt": lambda opt: transformers.get_inverse_sqrt_schedule(opt, num_warmup_steps=warmup),
        "cosine": lambda opt: transformers.get_cosine_schedule_with_warmup(opt, warmup, TOTAL),
        "linear": lambda opt: transformers.get_linear_schedule_with_warmup(opt, warmup, TOTAL),
        "constant": lambda opt: transformers.get_constant_schedule_with_warmup(opt, warmup),
    }
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    hf = hf_factories[name](optimizer)
    expected = []
    for _ in range(TOTAL):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        hf.step()
    assert _lrs(name, warmup) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_unknown_schedule_and_bad_total_are_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        build_lr_scheduler(optimizer, "step", warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="total_steps must be positive"):
        build_lr_scheduler(optimizer, "cosine", warmup_steps=0, total_steps=0)
