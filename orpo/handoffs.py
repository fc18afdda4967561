"""The files that pass from stage to stage, typed, with their names: one place that reads and writes them.

    prepare  -> <dataset_dir>/manifest.json              DataManifest   (read_manifest / write_manifest)
    train    -> <train_dir>/train_result.json            TrainResult    (read_train_result / write_train_result)
                <train_dir>/metrics.jsonl                 rows           (read_metrics_jsonl)
                <train_dir>/pipeline_config.yaml          the resolved training config (RESOLVED_CONFIG)
                <train_dir>/model/export_complete.json    the export's completeness marker (EXPORT_MARKER)
    evaluate -> <report_dir>/report.json                  EvalReport     (read_eval_report)

Paths inside `train_result.json` that lie in the training directory are stored relative to it, so a moved
or copied directory reads back pointing at its own files, never at the original's.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orpo.errors import OrpoError

log = logging.getLogger(__name__)

TRAIN_RESULT = "train_result.json"
MANIFEST = "manifest.json"
METRICS_JSONL = "metrics.jsonl"
RESOLVED_CONFIG = "pipeline_config.yaml"
EXPORT_MARKER = "export_complete.json"
EVAL_REPORT = "report.json"


class HandoffError(OrpoError, ValueError):
    """A hand-off file that is missing or unreadable; the message names the file and what to do."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- train_result.json ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Where a finished training run put things. `model_dir` is complete once it holds export_complete.json."""

    output_dir: Path
    model_dir: Path  # LoRA adapter + tokenizer, or the full model; safetensors, orpo_config.yaml, metrics.json
    merged_dir: Path | None  # the adapter merged into its base (train.lora.merge_on_export)
    metrics_path: Path  # one JSON object per logged step (train metrics, and eval_ metrics)
    final_metrics: dict[str, float]
    base_model: str  # the model spec trained from (config.model.name_or_path)
    base_model_path: str  # the resolved local directory or hub id (what an adapter applies to)
    is_lora: bool
    global_step: int
    dataset_dir: Path
    mlflow_run_id: str | None = None
    # Each export is its own event: two exports with identical weights (a forced re-run) stay two versions.
    exported_at: str = field(default_factory=_utc_now)

    def to_json(self) -> dict[str, Any]:
        """Paths under `output_dir` relative to it (`output_dir` itself is kept only as where it was written)."""
        return {
            "output_dir": str(self.output_dir),
            "model_dir": _relative(self.model_dir, self.output_dir),
            "merged_dir": _relative(self.merged_dir, self.output_dir) if self.merged_dir else None,
            "metrics_path": _relative(self.metrics_path, self.output_dir),
            "final_metrics": dict(self.final_metrics),
            "base_model": self.base_model,
            "base_model_path": self.base_model_path,
            "is_lora": self.is_lora,
            "global_step": self.global_step,
            "dataset_dir": str(self.dataset_dir),
            "mlflow_run_id": self.mlflow_run_id,
            "exported_at": self.exported_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: str | Path | None = None) -> TrainResult:
        """Relative paths are resolved against `directory` (where the file was read), else `output_dir`."""
        written = Path(data.get("output_dir") or ".")
        root = Path(directory) if directory is not None else written

        def under(value: str) -> Path:
            path = Path(value)
            if not path.is_absolute():
                return root / path
            # Files written before paths were relative: follow the directory, not the original.
            return root / path.relative_to(written) if path.is_relative_to(written) else path

        return cls(
            output_dir=root,
            model_dir=under(data["model_dir"]),
            merged_dir=under(data["merged_dir"]) if data.get("merged_dir") else None,
            metrics_path=under(data.get("metrics_path") or METRICS_JSONL),
            final_metrics={k: float(v) for k, v in (data.get("final_metrics") or {}).items()},
            base_model=data.get("base_model") or "",
            base_model_path=data.get("base_model_path") or "",
            is_lora=bool(data.get("is_lora", False)),
            global_step=int(data.get("global_step", 0)),
            dataset_dir=Path(data.get("dataset_dir") or ""),
            mlflow_run_id=data.get("mlflow_run_id"),
            exported_at=data.get("exported_at") or "",
        )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)  # outside the training directory: it does not move with it


def write_train_result(result: TrainResult, directory: str | Path | None = None) -> Path:
    path = Path(directory or result.output_dir) / TRAIN_RESULT
    path.write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    return path


def _read_json(path: Path, missing_hint: str) -> Any:
    """A hand-off file's JSON; a missing or unreadable file is a HandoffError naming it and what to do."""
    if not path.is_file():
        raise HandoffError(f"{path} not found; {missing_hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HandoffError(f"{path} is not valid JSON: {exc}") from exc


def read_train_result(train_dir: str | Path) -> TrainResult:
    """The training result of `train_dir`, its paths resolved inside `train_dir` (wherever it was written)."""
    path = Path(train_dir) / TRAIN_RESULT
    data = _read_json(path, "pass the output directory of `orpo train`")
    if not isinstance(data, dict) or not data.get("model_dir"):
        raise HandoffError(f"{path}: field 'model_dir' is missing")
    return TrainResult.from_json(data, directory=Path(train_dir))


# --- manifest.json -------------------------------------------------------------------------------------


class ShardInfo(BaseModel):
    """One input file of a directory or glob source."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Path relative to the source directory (the file name for a glob).")
    sha256: str
    size: int
    records: int = 0
    pairs: int = 0


class DataManifest(BaseModel):
    """manifest.json of a prepared dataset. Only the fields other stages read are typed; the rest is kept."""

    model_config = ConfigDict(extra="allow")

    format: str = ""
    dataset_key: str = ""
    source: str = ""
    input_fingerprint: str = ""
    recipe: str = ""
    seed: int = 0
    fingerprint: str = Field("unknown", description="sha256 over the output pairs.")
    counts: dict[str, int] = Field(default_factory=dict)
    dropped: dict[str, int] = Field(default_factory=dict)
    shards: list[ShardInfo] = Field(default_factory=list, description="The input files read (local sources).")


def write_manifest(manifest: DataManifest | dict[str, Any], dataset_dir: str | Path) -> Path:
    data = manifest.model_dump(mode="json") if isinstance(manifest, DataManifest) else manifest
    path = Path(dataset_dir) / MANIFEST
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(path: str | Path) -> DataManifest:
    """A manifest file, or the manifest.json of a dataset directory."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise HandoffError(f"{path} not found; run `orpo data binarize` first")
    try:
        return DataManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HandoffError(f"{path} is not a readable dataset manifest: {exc}") from exc


# --- metrics.jsonl -------------------------------------------------------------------------------------


def read_metrics_jsonl(path: str | Path | None) -> list[dict[str, Any]]:
    """The logged rows (one JSON object per line); unreadable lines are skipped with a warning."""
    if path is None or not Path(path).is_file():
        return []
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- the evaluation report -----------------------------------------------------------------------------


class EvalReport(BaseModel):
    """report.json of an evaluation (written by evals.report): the flat metrics, and each suite's details."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str = ""
    metrics: dict[str, float] = Field(default_factory=dict, description="Finite metrics only (null ones dropped).")
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    charts: list[str] = Field(default_factory=list, description="Chart file names next to report.json.")


def read_eval_report(report_dir: str | Path) -> EvalReport:
    data = _read_json(Path(report_dir) / EVAL_REPORT, "evaluate the model first (`orpo eval run`)")
    metrics = {k: float(v) for k, v in (data.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    return EvalReport.model_validate({**data, "metrics": metrics})
