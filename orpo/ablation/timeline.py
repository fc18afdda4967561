"""Held-out preference accuracy against training time, recorded while an arm trains.

Both trainers (ours and TRL's DPOTrainer) call `Timeline.probe` at the same steps (every `train.eval_steps`
and the last step). A probe scores the same held-out pairs with the evaluation library's own preference
measure (`evals.preference.pair_margins`: length-normalised log-odds, chosen minus rejected), so ORPO, SFT
and DPO arms are compared on one scale. Time spent evaluating and probing is not training time: the clock
counts only what the trainer spends between probes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMELINE_JSONL = "timeline.jsonl"
RESOURCES_JSON = "resources.json"


@dataclass
class Timeline:
    """Appends {"step", "train_seconds", "accuracy", "margin", "phase"} to `path` at each probe."""

    path: Path
    pairs: list[dict[str, Any]]
    max_length: int
    max_prompt_length: int
    batch_size: int
    chunk_size: int
    phase: str = "train"
    offset_seconds: float = 0.0  # training time of earlier phases (the SFT phase of SFT+DPO)
    _started: float | None = None
    _excluded: float = 0.0
    # CPU seconds of this process, the same way: on a shared machine they move far less with the load than
    # wall-clock seconds do.
    _cpu_started: float = 0.0
    _cpu_excluded: float = 0.0
    records: list[dict[str, float]] = field(default_factory=list)

    def start(self) -> None:
        """Start the training clock; probes before it (the start model's) cost no training time."""
        self._started = time.perf_counter()
        self._excluded = 0.0
        self._cpu_started = time.process_time()
        self._cpu_excluded = 0.0

    def train_seconds(self) -> float:
        if self._started is None:
            return 0.0
        return time.perf_counter() - self._started - self._excluded

    def train_cpu_seconds(self) -> float:
        if self._started is None:
            return 0.0
        return time.process_time() - self._cpu_started - self._cpu_excluded

    def exclude(self, seconds: float, cpu_seconds: float = 0.0) -> None:
        """Time inside the training loop that is not training (the trainer's own periodic evaluation)."""
        self._excluded += seconds
        self._cpu_excluded += cpu_seconds

    def probe(self, model, tokenizer, step: int) -> dict[str, float]:
        from evals.preference import pair_margins, preference_scores

        trained = self.train_seconds()
        began, cpu_began = time.perf_counter(), time.process_time()
        scores = preference_scores(pair_margins(
            model, tokenizer, self.pairs, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
            batch_size=self.batch_size, chunk_size=self.chunk_size,
        ))
        record = {"step": step, "train_seconds": self.offset_seconds + trained, "accuracy": scores.accuracy,
                  "margin": scores.margin, "phase": self.phase}
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.exclude(time.perf_counter() - began, time.process_time() - cpu_began)
        return record


def make_timeline(config, dataset_dir: str | Path, out_dir: Path, phase: str, offset_seconds: float = 0.0) -> Timeline:
    """A timeline over the first `ablation.probe_pairs` held-out pairs (the same pairs for every arm)."""
    from evals.preference import load_test_pairs

    pairs = load_test_pairs(dataset_dir, config.ablation.probe_pairs, config.eval.seed)
    train = config.train
    return Timeline(out_dir / TIMELINE_JSONL, pairs, train.max_length, train.max_prompt_length,
                    train.per_device_batch_size, train.logprob_chunk_size, phase=phase,
                    offset_seconds=offset_seconds)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_resources(out_dir: Path, *, wall_seconds: float, train_seconds: float, train_cpu_seconds: float,
                    peak_memory_mb: float, device: str, steps: int) -> dict[str, Any]:
    """What one training phase cost, measured in its own process."""
    data = {"wall_seconds": wall_seconds, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
            "peak_memory_mb": peak_memory_mb, "device": device, "steps": steps}
    (out_dir / RESOURCES_JSON).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return data


def read_resources(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RESOURCES_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
