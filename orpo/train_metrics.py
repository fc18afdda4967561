"""Training metrics: per-micro-batch sums on the device, reduced across processes once and divided once
(`orpo.loss.metrics_from_sums` holds the ORPO formulas), and the sink that writes them (metrics.jsonl, MLflow).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# orpo.loss.PAIR_SUM_KEYS, then the token counts behind throughput and padding_fraction.
TOKEN_SUM_KEYS = ("real_tokens", "input_tokens", "padded_tokens")
SUM_KEYS = (
    "nll_sum", "nll_tokens", "pairs", "log_sigmoid_sum", "log_ratio_sum", "chosen_logps_sum",
    "rejected_logps_sum", "correct", *TOKEN_SUM_KEYS,
)


def batch_sums(out, token_counts: dict[str, int], computed_positions: int) -> torch.Tensor:
    """The summable statistics of one micro-batch (see `SUM_KEYS`), as one float64 vector on its device.

    `out` is an `orpo.loss.ORPOOutput`; `token_counts` are the collator's: `conversation_tokens` (the pairs
    as two conversations each: the tokens that throughput counts, whatever the layout) and `input_tokens`
    (non-padding positions computed); `computed_positions` is the batch's rows x length.
    """
    import torch

    from orpo.loss import PAIR_SUM_KEYS

    pair_sums = out.sums()
    device = out.nll_sum.device
    tokens = (token_counts["conversation_tokens"], token_counts["input_tokens"], computed_positions)
    values = [pair_sums[key] for key in PAIR_SUM_KEYS] + [torch.tensor(float(n), device=device) for n in tokens]
    return torch.stack([v.detach().to(torch.float64) for v in values])


def pop_counts(batch: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Take the collator's host-side numbers out of a batch, leaving only tensors to move to the device."""
    counts = {key: batch.pop(key) for key in ("conversation_tokens", "input_tokens")}
    return batch.pop("num_pairs"), counts


def metrics_from_sums(sums: dict[str, float], orpo_lambda: float) -> dict[str, float]:
    """The ORPO metrics of summed statistics (`SUM_KEYS`), plus the share of computed positions that were padding."""
    from orpo.loss import metrics_from_sums as orpo_metrics

    return {
        **orpo_metrics(sums, orpo_lambda),
        "padding_fraction": 1.0 - sums["input_tokens"] / max(sums["padded_tokens"], 1.0),
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by tensors, or this process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class MetricsSink:
    """metrics.jsonl always; an MLflow run when one is active or MLFLOW_RUN_ID names one. Main process only."""

    path: Path
    enabled: bool
    mlflow: Any = None
    mlflow_run_id: str | None = None
    _started_run: bool = False

    @classmethod
    def open(cls, path: Path, enabled: bool, tracking_uri: str) -> MetricsSink:
        sink = cls(path=path, enabled=enabled)
        if not enabled:
            return sink
        # Import MLflow only if the caller already uses it or asked for a run: it is slow to import.
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and mlflow.active_run() is not None:
            sink.mlflow, sink.mlflow_run_id = mlflow, mlflow.active_run().info.run_id
        elif os.environ.get("MLFLOW_RUN_ID"):
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(tracking_uri)
            run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
            sink.mlflow, sink.mlflow_run_id, sink._started_run = mlflow, run.info.run_id, True
        if sink.mlflow_run_id:
            log.info("logging metrics live to MLflow run %s", sink.mlflow_run_id)
        return sink

    def write(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the output directory exists once there is output
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.mlflow is not None:
            step = int(record["step"])
            self.mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "step"}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        if self._started_run:
            self.mlflow.end_run()

