"""`compare_versions`, the comparison chart, its MLflow run, and the `register` / `compare` / `ui` commands."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import typer
from test_registry_helpers import fake_version, free_port
from typer.testing import CliRunner

from orpo.compare import compare_versions, log_comparison
from orpo.config import PipelineConfig, dump_config
from orpo.registry import configure_mlflow

CATEGORIES = ("writing", "roleplay", "reasoning", "math")


def _metrics(score: float, win_rate: float, accuracy: float) -> dict[str, float]:
    metrics = {"mt_bench/score": score, "alpaca/win_rate": win_rate, "preference/accuracy": accuracy}
    for i, category in enumerate(CATEGORIES):
        metrics[f"mt_bench/category/{category}"] = score + i - 1.5
    return metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("compare")
    config = PipelineConfig.model_validate(
        {"workdir": str(root / "work"), "registry": {"registered_model_name": "cmp-model"}}
    )
    configure_mlflow(config)
    v1 = fake_version("cmp-model", _metrics(5.0, 10.0, 0.60), {"finetune": "lora"})
    v2 = fake_version("cmp-model", _metrics(6.0, 14.5, 0.65), {"finetune": "full"})
    v3 = fake_version("cmp-model", {"mt_bench/score": 4.0}, {"finetune": "lora"})  # partly evaluated
    client = MlflowClient()
    # Version 2 was gated head-to-head against version 1 (the tags `orpo.gate.promote` records).
    compared = {
        "head_to_head/win_rate": {"estimate": 62.5, "low": 55.0, "high": 70.0, "n": 40, "margin": 50.0},
        "mt_bench/score": {"estimate": -0.1, "low": -0.4, "high": 0.2, "n": 10},
        "preference/accuracy": {"missing": "no per-pair preference margins"},
    }
    for key, value in {"gate.mode": "head_to_head", "gate.decision": "promoted", "gate.champion_version": v1,
                       "gate.compared": json.dumps(compared)}.items():
        client.set_model_version_tag("cmp-model", v2, key, value)
    client.set_registered_model_alias("cmp-model", "champion", v1)
    client.set_registered_model_alias("cmp-model", "challenger", v3)
    config_path = dump_config(config, root / "config.yaml")
    return {"root": root, "config": config, "config_path": config_path, "versions": (v1, v2, v3)}


def test_table_has_metrics_and_deltas_against_the_champion(store, tmp_path):
    png = tmp_path / "chart.png"
    frame = compare_versions(store["config"], None, png)
    assert list(frame.index) == ["1", "2", "3"]
    assert frame.loc["1", "aliases"] == "champion" and frame.loc["3", "aliases"] == "challenger"
    assert frame.loc["2", "finetune"] == "full"
    assert frame.loc["2", "delta mt_bench/score"] == pytest.approx(1.0)
    assert frame.loc["2", "delta alpaca/win_rate"] == pytest.approx(4.5)
    assert frame.loc["2", "delta preference/accuracy"] == pytest.approx(0.05)
    assert frame.loc["1", "delta mt_bench/score"] == 0.0
    assert frame.loc["3", "delta mt_bench/score"] == pytest.approx(-1.0)
    assert math.isnan(frame.loc["3", "alpaca/win_rate"]) and math.isnan(frame.loc["3", "delta alpaca/win_rate"])
    assert frame.loc["2", "mt_bench/category/math"] == pytest.approx(7.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_recorded_gate_differences_become_columns_and_a_chart(store, tmp_path):
    from orpo.compare import gate_png_path

    png = tmp_path / "chart.png"
    frame = compare_versions(store["config"], None, png)
    assert frame.loc["2", "h2h head_to_head/win_rate"] == 62.5
    assert (frame.loc["2", "h2h head_to_head/win_rate low"], frame.loc["2", "h2h head_to_head/win_rate high"]) == (
        55.0, 70.0)
    assert frame.loc["2", "h2h mt_bench/score n"] == 10
    assert "h2h preference/accuracy" not in frame.columns  # not compared: no column
    assert math.isnan(frame.loc["1", "h2h head_to_head/win_rate"])
    gate_png = gate_png_path(png)
    assert gate_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A comparison without any gated version leaves no chart of intervals behind.
    compare_versions(store["config"], ["1", "3"], png)
    assert not gate_png.exists()


def test_selected_versions_and_unknown_ones(store):
    frame = compare_versions(store["config"], ["2", "1"])
    assert list(frame.index) == ["2", "1"]
    with pytest.raises(ValueError, match="no version '99'"):
        compare_versions(store["config"], ["99"])
    other = store["config"].model_copy(deep=True)
    other.registry.registered_model_name = "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        compare_versions(other)


def test_comparison_is_logged_to_mlflow(store, tmp_path):
    from mlflow import MlflowClient

    png = tmp_path / "chart.png"
    frame = compare_versions(store["config"], ["1", "2"], png)
    run_id = log_comparison(store["config"], frame, png)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["orpo.kind"] == "compare" and run.data.tags["versions"] == "1,2"
    assert {a.path for a in client.list_artifacts(run_id, "compare")} == {
        "compare/chart.png", "compare/chart-gate.png", "compare/compare.csv"}


def _app() -> typer.Typer:
    from orpo import registry_cli
    from orpo.cli import OrpoGroup

    app = typer.Typer(cls=OrpoGroup)  # as orpo.cli mounts them: anticipated errors become exit codes
    app.command("register")(registry_cli.register)
    app.command("compare")(registry_cli.compare)
    app.command("ui")(registry_cli.ui)
    return app


def test_compare_command_prints_the_table_and_writes_the_chart(store, tmp_path):
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(
        _app(), ["compare", "--config", str(store["config_path"]), "--versions", "1,2", "--out", str(out)],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    assert "+1.000" in result.output  # mt_bench delta of version 2 against the champion
    assert "+4.500" in result.output
    assert "champion" in result.output
    assert "gate decisions" in result.output and "62.5 [55, 70], n=40" in result.output
    assert out.is_file() and out.with_name("cli-gate.png").is_file()
    result = CliRunner().invoke(_app(), ["compare", "--config", str(store["config_path"]), "--name", "nope"])
    assert result.exit_code == 2 and "nope" in result.output


def test_register_command_refuses_an_incomplete_export(store, tmp_path):
    (tmp_path / "train_result.json").write_text('{"model_dir": "%s"}' % (tmp_path / "final"))
    (tmp_path / "final").mkdir()
    result = CliRunner().invoke(_app(), ["register", "--config", str(store["config_path"]), str(tmp_path)])
    assert result.exit_code == 1
    assert "export_complete.json" in result.output


def test_help_texts_mount_cleanly():
    result = CliRunner().invoke(_app(), ["compare", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--versions" in result.output and "delta" in result.output


@pytest.mark.server
@pytest.mark.slow
def test_ui_serves_the_local_store_on_loopback(store):
    import httpx

    port = free_port()
    code = (
        "import typer, sys; from orpo.registry_cli import ui; app = typer.Typer(); app.command()(ui); "
        "app(sys.argv[1:])"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(store["config_path"]), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode()[-2000:]
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/registered-models/get",
                                     params={"name": "cmp-model"}, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("orpo ui did not answer in 120 s")
        assert response.status_code == 200
        aliases = {a["alias"] for a in response.json()["registered_model"]["aliases"]}
        assert aliases == {"champion", "challenger"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
