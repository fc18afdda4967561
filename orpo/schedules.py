"""Learning-rate schedules with linear warmup, as multipliers of the peak learning rate.

Each schedule is a function `step -> factor` (the optimizer's lr is `learning_rate * factor`), and
`build_lr_scheduler` wraps one in a `torch.optim.lr_scheduler.LambdaLR`. The formulas are those of the
Hugging Face `transformers` schedules of the same names (`get_inverse_sqrt_schedule`,
`get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
`get_constant_schedule_with_warmup`), so a run configured like the official ORPO code
(`--lr_scheduler_type inverse_sqrt --warmup_steps 100` through the HF Trainer) gets the same learning rates.
`step` counts optimizer steps taken so far: the first update uses `factor(0)`.

inverse_sqrt (the paper's):
    factor(step) = step / warmup                               for step < warmup
                 = 1 / sqrt((step + shift) / timescale)        otherwise,
    with timescale = warmup (10_000 when warmup is 0) and shift = timescale - warmup. With warmup > 0 this
    is min(step / warmup, sqrt(warmup / step)): linear up to the peak, then decay as 1/sqrt(step).
cosine:   step / warmup, then 0.5 * (1 + cos(pi * progress)), progress = (step - warmup) / (total - warmup).
linear:   step / warmup, then (total - step) / (total - warmup), floored at 0.
constant: step / warmup, then 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

ScheduleName = Literal["inverse_sqrt", "cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = ("inverse_sqrt", "cosine", "linear", "constant")

# HF's inverse_sqrt uses this timescale when there is no warmup, so the decay starts gently.
_INVERSE_SQRT_DEFAULT_TIMESCALE = 10_000


def _warmup(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


def inverse_sqrt(step: int, warmup_steps: int, total_steps: int | None = None) -> float:
    """Linear warmup, then decay proportional to 1/sqrt(step). `total_steps` is unused (kept for one signature)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    timescale = warmup_steps or _INVERSE_SQRT_DEFAULT_TIMESCALE
    shift = timescale - warmup_steps
    return 1.0 / math.sqrt((step + shift) / timescale)


def cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then half a cosine from 1 to 0 at `total_steps`."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then a straight line from 1 to 0 at `total_steps`."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def constant(step: int, warmup_steps: int, total_steps: int | None = None) -> float:
    """Linear warmup, then the peak learning rate."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return 1.0


_FACTORS: dict[str, Callable[..., float]] = {
    "inverse_sqrt": inverse_sqrt,
    "cosine": cosine,
    "linear": linear,
    "constant": constant,
}


def lr_factor(name: ScheduleName, step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the peak learning rate that schedule `name` gives after `step` optimizer steps."""
    try:
        factor = _FACTORS[name]
    except KeyError:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return factor(step, warmup_steps, total_steps)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: ScheduleName, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying schedule `name`; call `.step()` once after each optimizer step."""
    from torch.optim.lr_scheduler import LambdaLR

    if name not in _FACTORS:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive to build a schedule (got {total_steps})")
    return LambdaLR(optimizer, lambda step: lr_factor(name, step, warmup_steps, total_steps))
