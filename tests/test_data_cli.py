"""`orpo data binarize` (orpo.data.cli): flags become a DataConfig, errors exit non-zero with the location."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from orpo.data.cli import app

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "ultrafeedback_sample.jsonl"
runner = CliRunner()


def test_binarize_prints_summary_and_writes_dataset(tmp_path):
    out = tmp_path / "ds"
    result = runner.invoke(app, [
        "binarize", "--source", str(SAMPLE), "--recipe", "max-min", "--out", str(out), "--test-size", "0.1",
        "--no-decontaminate", "--no-dedupe", "--fix-overall-score", "--seed", "3", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    options = manifest["options"]
    assert (manifest["recipe"], manifest["seed"], options["test_size"]) == ("max-min", 3, 0.1)
    assert (options["decontaminate"], options["dedupe"], options["fix_overall_score"]) == (False, False, True)
    assert manifest["dropped"]["duplicate"] == 0 and manifest["dropped"]["decontaminated"] == 0
    for label, value in (("records in", manifest["counts"]["records_in"]), ("train", manifest["counts"]["train"])):
        assert label in result.output and str(value) in result.output
    assert "all_tied" in result.output


def test_config_file_data_section_is_the_base(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  source: {SAMPLE}\n  recipe: h4\n  test_size: 0.2\n  decontaminate: false\n")
    out = tmp_path / "ds"
    result = runner.invoke(app, ["binarize", "--config", str(config), "--seed", "5", "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["recipe"], manifest["seed"], manifest["options"]["test_size"]) == ("h4", 5, 0.2)


def test_malformed_input_exits_with_location(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:5]
    lines.insert(2, "{broken")
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["binarize", "--source", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 1
    assert "bad.jsonl:3" in result.output.replace("\n", "")
    skipped = runner.invoke(app, ["binarize", "--source", str(bad), "--out", str(tmp_path / "o"), "--no-progress",
                                  "--on-error", "skip"])
    assert skipped.exit_code == 0, skipped.output
    assert "malformed" in skipped.output


def test_invalid_option_value_exits_2(tmp_path):
    result = runner.invoke(app, ["binarize", "--source", str(SAMPLE), "--test-size", "1.5", "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "test_size" in result.output


def test_default_output_is_under_the_config_workdir(tmp_path):
    from orpo.config import load_config
    from orpo.data import dataset_key

    config = tmp_path / "cfg.yaml"
    config.write_text(f"workdir: {tmp_path / 'work'}\ndata:\n  source: {SAMPLE}\n  decontaminate: false\n")
    result = runner.invoke(app, ["binarize", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    key = dataset_key(load_config(config).data)
    assert (tmp_path / "work" / "data" / key / "manifest.json").is_file()
