"""The typed files between stages: written and read back through orpo.handoffs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orpo.handoffs import (
    DataManifest,
    HandoffError,
    ShardInfo,
    TrainResult,
    read_eval_report,
    read_manifest,
    read_metrics_jsonl,
    read_train_result,
    write_manifest,
    write_train_result,
)


def _result(root: Path) -> TrainResult:
    return TrainResult(output_dir=root, model_dir=root / "model", merged_dir=root / "merged",
                       metrics_path=root / "metrics.jsonl", final_metrics={"loss": 0.5},
                       base_model="builtin:tiny-llama", base_model_path="builtin:tiny-llama", is_lora=True,
                       global_step=3, dataset_dir=Path("/data/ds"))


def test_train_result_paths_are_relative_and_follow_the_directory(tmp_path):
    result = _result(tmp_path / "run")
    (tmp_path / "run").mkdir()
    write_train_result(result)
    stored = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert (stored["model_dir"], stored["merged_dir"], stored["metrics_path"]) == ("model", "merged", "metrics.jsonl")
    assert stored["dataset_dir"] == "/data/ds" and stored["exported_at"]
    assert read_train_result(tmp_path / "run") == result
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = read_train_result(tmp_path / "moved")
    assert moved.model_dir == tmp_path / "moved" / "model" and moved.merged_dir == tmp_path / "moved" / "merged"
    assert moved.exported_at == result.exported_at  # the same export, wherever it lies


def test_missing_and_broken_files_name_the_file(tmp_path):
    with pytest.raises(HandoffError, match="train_result.json not found"):
        read_train_result(tmp_path)
    (tmp_path / "train_result.json").write_text("{")
    with pytest.raises(HandoffError, match="not valid JSON"):
        read_train_result(tmp_path)
    with pytest.raises(HandoffError, match="manifest.json not found"):
        read_manifest(tmp_path)
    with pytest.raises(HandoffError, match="report.json not found"):
        read_eval_report(tmp_path)


def test_manifest_round_trip_keeps_untyped_fields(tmp_path):
    manifest = DataManifest(fingerprint="fp", counts={"pairs": 2}, shards=[ShardInfo(name="a.jsonl", sha256="s",
                                                                                     size=1, records=2, pairs=2)],
                            decontamination={"ngram": 13})
    write_manifest(manifest, tmp_path)
    again = read_manifest(tmp_path)
    assert again.shards[0].records == 2 and again.model_extra["decontamination"] == {"ngram": 13}


def test_metrics_jsonl_skips_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n\n[1]\n{"step": 2}\n')
    assert read_metrics_jsonl(path) == [{"step": 1, "loss": 1.0}, {"step": 2}]
    assert read_metrics_jsonl(tmp_path / "absent.jsonl") == []


def test_eval_report_written_by_evals_reads_back_typed(tmp_path):
    from evals.report import Report, write_report

    write_report(Report(model="m", metrics={"preference/accuracy": 0.75, "mt_bench/score": math.nan},
                        sections={"preference": {"pairs": 8}}, notes=["n"]), tmp_path)
    report = read_eval_report(tmp_path)
    assert report.model == "m" and report.metrics == {"preference/accuracy": 0.75}  # null (NaN) dropped
    assert report.sections["preference"]["pairs"] == 8 and report.notes == ["n"]
