"""Sources that grow (a directory or glob of shards, listed in the manifest; incremental exclusion) and
empty data refused with the drop reasons (issue 17 item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.config import DataConfig
from orpo.data.binarize import DataPreparationError, dataset_key, prepare_dataset
from orpo.data.manifest import seen_shards
from orpo.handoffs import read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "samples" / "ultrafeedback_sample.jsonl"


def write_shards(directory: Path, *counts: int, start: int = 0) -> list[Path]:
    """Daily-drop shards cut from the sample: shard i holds the next `counts[i]` records."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    directory.mkdir(parents=True, exist_ok=True)
    written, offset = [], start
    for day, count in enumerate(counts, start=1):
        path = directory / f"2026-11-{day:02d}.jsonl"
        path.write_text("\n".join(lines[offset:offset + count]) + "\n", encoding="utf-8")
        written.append(path)
        offset += count
    return written


def options(source: str, **extra) -> DataConfig:
    return DataConfig(source=source, decontaminate=False, test_size=0.1, **extra)


def test_a_directory_of_shards_is_listed_shard_by_shard(tmp_path):
    write_shards(tmp_path / "drops", 40, 30)
    prepared = prepare_dataset(options(str(tmp_path / "drops")), tmp_path / "ds", progress=False, workers=1)
    manifest = read_manifest(prepared.dataset_dir)
    assert [s.name for s in manifest.shards] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]
    assert [s.records for s in manifest.shards] == [40, 30]
    assert sum(s.pairs for s in manifest.shards) == manifest.counts["pairs"] > 0
    assert all(len(s.sha256) == 64 and s.size > 0 for s in manifest.shards)


def test_a_glob_selects_shards_and_a_new_shard_changes_the_key(tmp_path):
    write_shards(tmp_path / "drops", 40, 30)
    (tmp_path / "drops" / "notes.txt").write_text("not data")
    glob = str(tmp_path / "drops" / "2026-*.jsonl")
    first = options(glob)
    prepared = prepare_dataset(first, tmp_path / "ds1", progress=False, workers=1)
    assert [s.name for s in read_manifest(prepared.dataset_dir).shards] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]
    key = dataset_key(first)

    write_shards(tmp_path / "drops", 40, 30, 20)  # the next day's drop lands
    assert dataset_key(first) != key
    union = prepare_dataset(first, tmp_path / "ds2", progress=False, workers=1)
    assert union.counts["records_in"] == 90 and union.counts["pairs"] > prepared.counts["pairs"]


def test_excluded_shards_are_left_out_and_listed_as_seen(tmp_path):
    write_shards(tmp_path / "drops", 40, 30)
    cfg = options(str(tmp_path / "drops"))
    night1 = prepare_dataset(cfg, tmp_path / "ds1", progress=False, workers=1)
    write_shards(tmp_path / "drops", 40, 30, 20)
    seen = seen_shards(night1.manifest_path)
    night2 = prepare_dataset(cfg, tmp_path / "ds2", progress=False, workers=1, exclude_shards=seen)
    manifest = read_manifest(night2.dataset_dir)
    assert [s.name for s in manifest.shards] == ["2026-11-03.jsonl"] and night2.counts["records_in"] == 20
    assert seen_shards(night2.manifest_path) == seen | {manifest.shards[0].sha256}
    with pytest.raises(DataPreparationError, match="no new data"):
        prepare_dataset(cfg, tmp_path / "ds3", progress=False, workers=1,
                        exclude_shards=seen_shards(night2.manifest_path))
    assert not (tmp_path / "ds3").exists()


def test_zero_pairs_is_an_error_naming_the_drop_reasons_and_leaves_nothing(tmp_path):
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:5]
    source = tmp_path / "tiny.jsonl"
    source.write_text("\n".join(lines) + "\n")
    cfg = options(str(source), max_length=9, tokenizer="builtin:tiny-llama")  # every pair is too long
    out = tmp_path / "work" / "data" / "ds"
    with pytest.raises(DataPreparationError, match="no preference pairs left from 5 records") as info:
        prepare_dataset(cfg, out, progress=False, workers=1)
    assert "too_long" in str(info.value) and "--allow-empty" in str(info.value)
    assert not (tmp_path / "work").exists()  # not even the parent directories it created

    prepared = prepare_dataset(cfg, out, progress=False, workers=1, allow_empty=True)
    assert prepared.counts["pairs"] == 0 and (out / "manifest.json").is_file()


def test_binarize_cli_exits_1_on_empty_data_without_a_traceback(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "orpo.data.cli", "binarize", "--source", str(empty), "--out", str(out),
               "--no-decontaminate", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "no preference pairs left from 0 records" in output and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.strip()]) <= 6
    assert not out.exists() and list(tmp_path.iterdir()) == [empty]

    result = subprocess.run([*command, "--allow-empty"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "manifest.json").read_text())["counts"]["pairs"] == 0


def test_files_under_hidden_directories_are_not_shards(tmp_path):
    """Jupyter's .ipynb_checkpoints (an older copy of a shard), .git or cache folders inside a source
    directory are not data: reading them trained on stale or duplicated records."""
    drops = tmp_path / "drops"
    write_shards(drops, 40, 30)
    write_shards(drops / ".ipynb_checkpoints", 10, start=200)
    write_shards(drops / "sub" / ".cache", 10, start=250)
    prepared = prepare_dataset(options(str(drops)), tmp_path / "ds", progress=False, workers=1)
    assert [s.name for s in read_manifest(prepared.dataset_dir).shards] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]
    globbed = prepare_dataset(options(str(drops / "**" / "*.jsonl")), tmp_path / "ds-glob", progress=False, workers=1)
    assert [s.name for s in read_manifest(globbed.dataset_dir).shards] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]
