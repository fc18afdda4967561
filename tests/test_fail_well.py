"""Foreseeable mistakes at the front doors: one short message naming the cause, the right exit code, no
traceback (unless asked for), fast, and nothing half-done left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import REPO_ROOT, free_port

ORPO = str(REPO_ROOT / ".venv" / "bin" / "orpo")
SAMPLE = REPO_ROOT / "data" / "samples" / "ultrafeedback_sample.jsonl"


def _orpo(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([ORPO, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=REPO_ROOT)


def _app():
    from orpo.cli import _mount_all, app

    if not any(group.name == "data" for group in app.registered_groups):
        _mount_all()
    return app


def _assert_short_error(output: str, *names: str, max_lines: int = 4) -> None:
    """The message names the cause, fits in a few lines, and shows no traceback."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, output
    flat = " ".join(output.split())  # rich may wrap long paths
    for name in names:
        assert name in flat, output


def test_train_with_an_unknown_model_exits_1_before_creating_anything(tmp_path):
    result = _orpo("train", f"workdir={tmp_path}", f"data.source={SAMPLE}", "data.decontamination_files=[]",
                   "model.name_or_path=nonexistent/dir", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stderr
    _assert_short_error(result.stderr, "nonexistent/dir", "HF_HUB_OFFLINE")
    assert list(tmp_path.iterdir()) == []  # no dataset, no output dir, no empty checkpoints/


def test_train_with_a_missing_data_source_exits_1_and_leaves_no_output(tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    result = CliRunner().invoke(_app(), ["train", f"workdir={tmp_path}", f"data.source={missing}",
                                         "model.name_or_path=builtin:tiny-llama"])
    assert result.exit_code == 1, result.output
    _assert_short_error(result.output, str(missing))
    assert not (tmp_path / "train").exists()
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def test_run_checks_its_inputs_before_starting_prefect(tmp_path):
    missing = tmp_path / "nope.jsonl"
    start = time.monotonic()
    result = CliRunner().invoke(_app(), ["run", f"workdir={tmp_path}", f"data.source={missing}",
                                         "model.name_or_path=builtin:tiny-llama"])
    assert result.exit_code == 1, result.output
    _assert_short_error(result.output, str(missing))
    assert time.monotonic() - start < 10  # no temporary Prefect server, no task retries
    assert list(tmp_path.iterdir()) == []


def test_flow_logs_leave_out_tracebacks_of_anticipated_errors_only():
    import io
    import logging

    from orpo.cli import _NoOrpoErrorTraceback
    from orpo.data.binarize import DataPreparationError

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_NoOrpoErrorTraceback(logging.Formatter("%(levelname)s %(message)s")))
    logger = logging.getLogger("tests.fail_well")
    logger.addHandler(handler)
    try:
        for error in (DataPreparationError("source x.jsonl is missing"), ValueError("a bug")):
            try:
                raise error
            except Exception:
                logger.error("task failed: %s", error, exc_info=True)
    finally:
        logger.removeHandler(handler)
    anticipated, bug = stream.getvalue().split("ERROR task failed: a bug")
    assert anticipated == "ERROR task failed: source x.jsonl is missing\n"
    assert "Traceback" in bug and "ValueError: a bug" in bug


def test_invalid_config_value_exits_2():
    result = CliRunner().invoke(_app(), ["config", "show", "data.recipe=h5"])
    assert result.exit_code == 2
    _assert_short_error(result.output, "data.recipe", "h5")


def test_unreachable_hub_fails_in_seconds_with_one_message(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: the hub is unreachable
    start = time.monotonic()
    result = _orpo("train", f"workdir={tmp_path}", "model.name_or_path=someorg/somemodel",
                   env={"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": endpoint})
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    _assert_short_error(result.stderr, "someorg/somemodel", endpoint)
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == []


def _complete_export(train_dir: Path, tiny_model_dir: Path) -> None:
    import shutil

    model_dir = train_dir / "model-export"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "export_complete.json").write_text("{}")
    (train_dir / "train_result.json").write_text(json.dumps({"model_dir": "model-export", "is_lora": False}))


def test_register_against_a_closed_port_fails_in_seconds_naming_the_url(tmp_path, tiny_model_dir, monkeypatch):
    from orpo.registry import MLFLOW_HTTP_DEFAULTS

    _complete_export(tmp_path, tiny_model_dir)
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:hunter2@127.0.0.1:{port}")
    for key in MLFLOW_HTTP_DEFAULTS:
        monkeypatch.setenv(key, "")  # remembered, so the defaults set by configure_mlflow are undone afterwards
        monkeypatch.delenv(key)
    start = time.monotonic()
    result = CliRunner().invoke(_app(), ["register", str(tmp_path), f"workdir={tmp_path}"])
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    _assert_short_error(result.output, f"http://127.0.0.1:{port}", "cannot be reached")
    assert "hunter2" not in result.output
    assert elapsed < 10, f"took {elapsed:.1f} s"
    # MLflow's own retry budget is bounded too, for failures after the first contact.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == MLFLOW_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = _orpo("--debug", "train", f"workdir={tmp_path}", f"data.source={missing}",
                   "model.name_or_path=builtin:tiny-llama")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "DataPreparationError" in result.stderr
    via_env = CliRunner().invoke(_app(), ["train", f"workdir={tmp_path}", f"data.source={missing}",
                                          "model.name_or_path=builtin:tiny-llama"], env={"ORPO_DEBUG": "1"})
    assert type(via_env.exception).__name__ == "DataPreparationError"


# --- the stack ------------------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture()
def fake_stack(tmp_path, monkeypatch):
    """A 'stack' recorded as `orpo stack up workdir=<tmp>/stack-work` records it: one long-running process
    serving a loopback port, standing in for the Prefect server."""
    from flows.stack import write_record

    monkeypatch.setenv("ORPO_CACHE_DIR", str(tmp_path / "cache"))  # the per-user stack index
    workdir = tmp_path / "stack-work"
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    log = tmp_path / "server.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    write_record(workdir.resolve() / "stack", [
        {"name": "prefect-server", "pid": process.pid, "command": command, "port": port, "log": str(log)},
    ])
    try:
        yield {"workdir": workdir, "port": port, "process": process}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stack_down_with_the_overrides_of_up_stops_it(fake_stack, tmp_path):
    workdir, port, process = fake_stack["workdir"], fake_stack["port"], fake_stack["process"]
    ports = ["--prefect-port", str(port), "--mlflow-port", str(free_port())]
    runner = CliRunner()

    # Another config: no record there, but the port is up; say where the stack is instead of exiting 0.
    wrong = runner.invoke(_app(), ["stack", "down", *ports, f"workdir={tmp_path / 'elsewhere'}"])
    assert wrong.exit_code == 1, wrong.output
    _assert_short_error(wrong.output, f"127.0.0.1:{port}", f"workdir={workdir.resolve()}")
    assert process.poll() is None

    # A second `up` on the same port refuses before starting anything, and says which stack holds it.
    twice = runner.invoke(_app(), ["stack", "up", *ports, f"workdir={tmp_path / 'elsewhere'}"])
    assert twice.exit_code == 1, twice.output
    _assert_short_error(twice.output, f"127.0.0.1:{port} is already in use", f"workdir={workdir.resolve()}")
    assert not (tmp_path / "elsewhere").exists()

    status = runner.invoke(_app(), ["stack", "status", *ports, f"workdir={workdir}"])
    assert status.exit_code == 0, status.output
    assert "prefect-server: running" in status.output

    down = runner.invoke(_app(), ["stack", "down", *ports, f"workdir={workdir}"])
    assert down.exit_code == 0, down.output
    assert f"prefect-server: stopped (pid {process.pid})" in down.output
    assert process.wait(timeout=10) is not None
    assert not _listening(port)
    assert not (workdir / "stack" / "processes.json").exists()

    again = runner.invoke(_app(), ["stack", "down", *ports, f"workdir={workdir}"])
    assert again.exit_code == 0 and "no stack recorded" in again.output


def test_stack_env_turns_on_prefect_csrf_protection(tmp_path):
    from flows.stack import stack_env
    from orpo.config import load_config

    env = stack_env(load_config(None, [f"workdir={tmp_path}"]), 4321, 5321)
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert env["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "true"
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"].split(",")[0] == "http://127.0.0.1:4321"
