"""Which pairs each process sees at each optimizer step: deterministic in (seed, epoch), so resuming at step s
only needs s, and the same global batch gives the same pairs whatever the processes x accumulation split."""

from __future__ import annotations

import math
import random
from typing import Any


def nll_token_count(pair: dict[str, Any], nll_on_prompt: bool) -> int:
    """Tokens the NLL of this pair's chosen row covers, counted as orpo.logprobs does (row position 0 is
    predicted by nothing, so it is never a label)."""
    prompt, chosen = int(pair["prompt_length"]), int(pair["chosen_length"])
    if nll_on_prompt:
        return max(prompt + chosen - 1, 0)
    return chosen - 1 if prompt == 0 and chosen > 0 else chosen


class BatchPlan:
    """The pairs of every optimizer step, and each process's micro-batches of them.

    Each epoch uses `steps_per_epoch * global_batch_size` pairs: a random subset (the remainder of fewer
    than one global batch is left out, a different one each epoch) in a random order, or length-grouped
    (`orpo.collate.length_grouped_indices` with `global_batch_size`, so a step's pairs have similar lengths).
    Both depend only on (seed, epoch). Micro-batch g of process r in a step is the step's slice
    [(g * num_processes + r) * per_device_batch_size, ... + per_device_batch_size).
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        per_device_batch_size: int,
        num_processes: int,
        gradient_accumulation_steps: int,
        seed: int,
        group_by_length: bool,
    ) -> None:
        self.lengths = lengths
        self.per_device_batch_size = per_device_batch_size
        self.num_processes = num_processes
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.group_by_length = group_by_length
        self._cached: tuple[int, list[int]] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.num_processes * self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        from orpo.collate import length_grouped_indices  # here: importing this module stays torch-free

        # A string seed: random.Random hashes it with SHA-512, the same in every process and Python run.
        rng = random.Random(f"orpo-epoch:{self.seed}:{epoch}")
        order = rng.sample(range(len(self.lengths)), self.steps_per_epoch * self.global_batch_size)
        if self.group_by_length:
            grouped = length_grouped_indices(
                [self.lengths[i] for i in order], self.global_batch_size, seed=self.seed + epoch
            )
            order = [order[j] for j in grouped]
        self._cached = (epoch, order)
        return order

    def step_pairs(self, step: int) -> list[int]:
        """Dataset indices of all pairs of optimizer step `step` (0-based), over all processes."""
        epoch, within = divmod(step, self.steps_per_epoch)
        size = self.global_batch_size
        return self.epoch_order(epoch)[within * size : (within + 1) * size]

    def micro_batches(self, step: int, process_index: int) -> list[list[int]]:
        pairs = self.step_pairs(step)
        size = self.per_device_batch_size
        starts = [(g * self.num_processes + process_index) * size for g in range(self.gradient_accumulation_steps)]
        return [pairs[start : start + size] for start in starts]


def eval_batches(lengths: list[int], batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """This process's evaluation batches: pairs sorted by length (little padding), dealt round-robin.

    Every process gets the same number of batches, because sharded models (FSDP, ZeRO-3) need every rank
    in every forward; a process that runs out repeats its first pair, and its result is discarded (an
    empty batch is returned in its place: the caller runs `padding_batch` and ignores the output).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = order[process_index::num_processes]
    per_process = math.ceil(len(order) / num_processes)
    count = math.ceil(per_process / batch_size)
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(count)]

