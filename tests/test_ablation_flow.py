"""The ablation-study flow end to end on the tiny model: every arm trained, registered with the study tag,
evaluated, and the report written with each section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo.config import load_config
from tests.conftest import tiny_pipeline_overrides


@pytest.mark.slow
def test_ablation_study_registers_every_arm_and_reports_each_section(prefect_harness, tmp_path, monkeypatch):
    import mlflow

    from flows.ablation import ablation_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(None, tiny_pipeline_overrides(
        tmp_path, "train.max_steps=4", "train.eval_steps=2", "eval.suites=[preference,diversity]",
        "eval.diversity_prompts=2", "eval.diversity_samples=2", "ablation.study=tiny-study",
        "ablation.orpo_lambdas=[0.1,0.5]", "ablation.seeds=[1,2]", "ablation.probe_pairs=8",
    ))
    summary = ablation_study(config=config)

    arms = {"sft", "orpo-0.1", "orpo-0.5", "sft-dpo"}
    assert set(summary.versions) == {f"{a}-seed{s}" for a in arms for s in (1, 2)}
    client = mlflow.MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)
    versions = client.search_model_versions(f"name = '{summary.registered_model_name}'")
    tagged = [v for v in versions if v.tags.get("ablation.study") == "tiny-study"]
    assert {(v.tags["ablation.arm"], v.tags["ablation.seed"]) for v in tagged} == {(a, str(s)) for a in arms
                                                                                   for s in (1, 2)}
    for version in tagged:
        run = client.get_run(version.run_id)
        assert "preference/accuracy" in run.data.metrics and "ablation/peak_memory_mb" in run.data.metrics
        assert run.data.tags["ablation.study"] == "tiny-study"

    dpo = summary.resources["sft-dpo-seed1"]
    assert set(dpo["phases"]) == {"sft", "dpo"}
    assert dpo["train_seconds"] > summary.resources["sft-seed1"]["train_seconds"]  # both phases are counted

    report = Path(summary.report)
    text = report.read_text()
    for section in ("Held-out log-probabilities over training", "Held-out preference accuracy and log-odds margin",
                    "Cost: one phase (ORPO) vs two phases (SFT+DPO)", "Per-input diversity",
                    "Odds ratio vs probability ratio"):
        assert f"## {section}" in text
    for figure in ("logprobs.png", "time_to_accuracy.png", "diversity.png", "or_vs_pr.png"):
        assert (report.parent / figure).stat().st_size > 1000
        assert f"({figure})" in text
    summary_json = json.loads((report.parent / "report.json").read_text())["summary"]
    assert summary_json["arms"]["orpo-0.1"]["preference_accuracy"]["n"] == 2
    timeline = summary_json["time_to_accuracy"][0]
    assert timeline["target_accuracy"] is not None
    assert timeline["time_to_target"]["orpo-0.1"] is not None or timeline["time_to_target"]["orpo-0.5"] is not None

    dpo_train = Path(tmp_path, "ablation", "tiny-study", "train", "sft-dpo-seed1")
    phases = [json.loads(line)["phase"] for line in (dpo_train / "timeline.jsonl").read_text().splitlines()]
    assert phases[0] == "sft" and phases[-1] == "dpo"
    sft_train = Path(tmp_path, "ablation", "tiny-study", "train", "sft-seed1")
    first = json.loads((sft_train / "timeline.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["train_seconds"]) == (0, 0.0)  # the start model, before any training
    assert json.loads((sft_train / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0
    report_runs = client.search_runs([client.get_experiment_by_name(config.registry.experiment_name).experiment_id],
                                     "tags.`orpo.kind` = 'ablation-report'")
    assert [a.path for a in client.list_artifacts(report_runs[0].info.run_id, "ablation_report")]


def test_ablation_flow_parameters_render_as_a_form():
    """From the Prefect UI: the config form (with its ablation section), a YAML path, and the quick switch."""
    from prefect.utilities.callables import parameter_schema

    from flows.ablation import ablation_study

    schema = parameter_schema(ablation_study).model_dump()
    definitions = schema.get("definitions") or schema.get("$defs") or {}
    assert {"PipelineConfig", "AblationConfig"} <= set(definitions)
    assert {"config", "config_path", "quick"} <= set(schema["properties"])
