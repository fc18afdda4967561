"""Preference accuracy, lm-eval on a local task, and evaluate_model end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.preference import pair_margins, preference_scores

PAIRS = [
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No, I will not."}]},
    {"chosen": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
     "rejected": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Five."}]},
    {"chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "I am not sure."}]},
]


def _swap(pair):
    return {"chosen": pair["rejected"], "rejected": pair["chosen"]}


def test_preference_margins_flip_sign_when_pairs_are_swapped(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    margins = pair_margins(model, tokenizer, PAIRS, max_length=64, max_prompt_length=32, batch_size=2)
    swapped = pair_margins(model, tokenizer, [_swap(p) for p in PAIRS], max_length=64, max_prompt_length=32)
    assert margins == pytest.approx([-m for m in swapped], abs=1e-5)
    scores = preference_scores(margins)
    assert scores.n_pairs == 3
    assert scores.accuracy == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert scores.accuracy + preference_scores(swapped).accuracy == pytest.approx(1.0)


def _local_task(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "mini.jsonl"
    docs = [("Which animal says moo?", [" a cow", " a cat"], 0), ("Sky color?", [" green", " blue"], 1),
            ("Legs of a spider?", [" eight", " six"], 0), ("Bees make?", [" milk", " honey"], 1)]
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in docs))
    (tasks / "mini.yaml").write_text(
        "task: orpo_test_mini\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{answer}}\"\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    return tasks


@pytest.mark.slow
def test_lm_eval_local_task_on_in_memory_model(tiny_model_and_tokenizer, tmp_path):
    from evals.harness import run_lm_eval

    model, tokenizer = tiny_model_and_tokenizer
    metrics = run_lm_eval(model, tokenizer, ["orpo_test_mini"], include_path=_local_task(tmp_path), batch_size=4)
    assert set(metrics) == {"lm_eval/orpo_test_mini/acc"}
    assert metrics["lm_eval/orpo_test_mini/acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.slow
def test_evaluate_model_end_to_end_with_hf_judge(tiny_model_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    from evals.run import evaluate_model
    from orpo.config import load_config

    dataset_dir = tmp_path / "dataset"
    DatasetDict({"train": Dataset.from_list(PAIRS), "test": Dataset.from_list(PAIRS)}).save_to_disk(str(dataset_dir))
    config = load_config(None, [
        f"workdir={tmp_path / 'work'}",
        "eval.judge.kind=hf",
        f"eval.judge.model={tiny_model_dir}",
        "eval.judge.max_new_tokens=6",
        "eval.alpaca_source=data/samples/eval/alpaca_eval_sample.json",
        "eval.mt_bench_questions=data/samples/eval/mt_bench_questions.jsonl",
        "eval.mt_bench_limit=3",
        "eval.max_new_tokens=12",
        "eval.diversity_prompts=2",
        "eval.diversity_samples=2",
        "eval.suites=[alpaca,mtbench,diversity,preference]",
    ])
    out = tmp_path / "report"
    result = evaluate_model(config, str(tiny_model_dir), out, dataset_dir=dataset_dir,
                            base_model_path=str(tiny_model_dir), progress=False)
    metrics = result.metrics
    # A local judge on sample data: numbers under self-explaining, non-leaderboard names.
    assert not any(name.startswith(("alpaca/", "alpaca_eval2/", "mt_bench/")) for name in metrics)
    assert metrics["alpaca_local_judge/n_total"] == 12 and 0.0 <= metrics["alpaca_local_judge/win_rate"] <= 100.0
    judgment_file = out / "model_judgment" / f"{Path(str(tiny_model_dir)).name}_single.jsonl"
    judgments = [json.loads(line) for line in judgment_file.read_text().splitlines()]
    assert len(judgments) == 6  # 3 questions x 2 turns
    assert metrics["mt_bench_local_judge/parse_failures"] == sum(j["score"] == -1 for j in judgments)
    assert {"diversity/distinct_1", "diversity/distinct_2", "diversity/self_bleu"} <= set(metrics)
    # Same weights for model and base: identical preference results.
    assert metrics["preference/accuracy"] == metrics["preference/base_accuracy"]
    assert metrics["preference/margin"] == pytest.approx(metrics["preference/base_margin"])
    report = json.loads(result.report_json.read_text())
    assert report["metrics"] == pytest.approx(metrics)
    assert set(report["protocols"]) == {"alpaca_local_judge", "mt_bench_local_judge"} == set(result.protocols)
    markdown = result.report_md.read_text()
    assert "| metric | value | protocol |" in markdown and "local hf judge" in markdown
    assert "alpaca_local_judge/length_controlled_winrate" not in metrics  # never the leaderboard's LC name
    label = result.report_dir.joinpath("model_answer")
    for path in (out / "model_outputs.json", out / "annotations.json", judgment_file):
        assert path.is_file(), path
    assert len(list(label.glob("*.jsonl"))) == 1
    assert result.charts and all(c.read_bytes()[:4] == b"\x89PNG" for c in result.charts)
    annotations = json.loads((out / "annotations.json").read_text())
    assert all(isinstance(a["is_swapped"], bool) for a in annotations)
    # The judge cache makes a second judging pass free.
    assert any((tmp_path / "work" / "judge-cache").rglob("*.json"))


def test_cli_help_is_fast_and_lists_commands():
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "evals.cli", "--help"], capture_output=True, text=True, check=True)
    assert {"run", "alpaca-metrics", "mt-bench-score"} <= set(done.stdout.split())
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, evals.cli; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert time.perf_counter() - start < 30


def test_cli_run_diversity_suite(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from evals.cli import app

    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_model_dir), "--suite", "diversity", "--out", str(out), "--limit", "4",
        f"workdir={tmp_path}", "eval.alpaca_source=data/samples/eval/alpaca_eval_sample.json",
        "eval.diversity_prompts=2", "eval.diversity_samples=2", "eval.max_new_tokens=6",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert set(metrics) == {"diversity/distinct_1", "diversity/distinct_2", "diversity/self_bleu"}
    samples = json.loads((out / "diversity_samples.json").read_text())
    assert len(samples) == 2 and all(len(s["samples"]) == 2 for s in samples)
    bad = CliRunner().invoke(app, ["run", "--model", str(tiny_model_dir), "--suite", "nonsense"])
    assert bad.exit_code == 2 and "eval.suites" in bad.output
