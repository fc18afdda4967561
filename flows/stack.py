"""The local stack: a Prefect server, the deployment-serving process and an MLflow server, on 127.0.0.1.

`stack_up` starts each as its own process group, waits for its health endpoint, and records PID, command
line and log path in `<workdir>/stack/processes.json`; `stack_down` stops exactly those processes (it checks
that a recorded PID still runs the recorded command before signalling it, so a reused PID is left alone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from orpo.config import PipelineConfig

HOST = "127.0.0.1"

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_UI_ENABLED": "true",
}


@dataclass(frozen=True)
class StackInfo:
    prefect_url: str
    mlflow_url: str
    state_dir: Path


def state_dir(config: PipelineConfig) -> Path:
    return Path(config.workdir).resolve() / "stack"


def stack_env(config: PipelineConfig, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    """Environment every stack process (and a user's shell) shares: where Prefect and MLflow live."""
    home = state_dir(config) / "prefect-home"
    return {
        **os.environ,
        **QUIET_ENV,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "MLFLOW_TRACKING_URI": config.resolved_tracking_uri(),
    }


def _wait_healthy(url: str, name: str, log_path: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not answer {url} within {timeout_s:.0f} s; see {log_path}")


def _start(name: str, command: list[str], env: dict[str, str], logs: Path) -> tuple[subprocess.Popen, Path]:
    log_path = logs / f"{name}.log"
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it after Popen
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle.close()
    return process, log_path


def stack_up(config: PipelineConfig, *, config_path: str | None = None, prefect_port: int = 4200,
             mlflow_port: int = 5000, timeout_s: float = 120.0) -> StackInfo:
    """Start the three processes (skipping none: call stack_down first if a stack is already up)."""
    root = state_dir(config)
    record_path = root / "processes.json"
    if record_path.is_file() and any(_alive(entry) for entry in json.loads(record_path.read_text())):
        raise RuntimeError(f"a stack is already running (see {record_path}); run `orpo stack down` first")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = stack_env(config, prefect_port, mlflow_port)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    tracking = config.resolved_tracking_uri()
    backend = tracking if tracking.startswith("sqlite:") else f"sqlite:///{root / 'mlflow.db'}"
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    specs = [
        ("prefect-server", [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
         f"http://{HOST}:{prefect_port}/api/health"),
        ("mlflow-server", [str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
                           "--backend-store-uri", backend, "--workers", "1"],
         f"http://{HOST}:{mlflow_port}/health"),
        ("deployments", [str(bin_dir / "orpo"), "deploy", *(["--config", config_path] if config_path else [])],
         None),
    ]
    records = []
    try:
        for name, command, health in specs:
            process, log_path = _start(name, command, env, logs)
            records.append({"name": name, "pid": process.pid, "command": command, "log": str(log_path)})
            record_path.write_text(json.dumps(records, indent=2))
            if health:
                _wait_healthy(health, name, log_path, process, timeout_s)
    except BaseException:
        stack_down(config)
        raise
    return StackInfo(f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}", root)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(entry: dict) -> bool:
    """The recorded process still runs what we started (a PID may have been reused by something else)."""
    cmdline = _cmdline(entry["pid"])
    if not cmdline:
        return False
    started = entry["command"]
    # A console script may run as `python <script> ...`: compare the arguments after the program.
    return cmdline[-len(started) + 1:] == started[1:] if len(started) > 1 else True


def stack_down(config: PipelineConfig, timeout_s: float = 20.0) -> list[str]:
    """Stop the processes recorded by stack_up (TERM, then KILL after `timeout_s`)."""
    record_path = state_dir(config) / "processes.json"
    if not record_path.is_file():
        return ["no stack recorded"]
    lines = []
    for entry in reversed(json.loads(record_path.read_text())):
        if not _alive(entry):
            lines.append(f"{entry['name']}: not running")
            continue
        os.killpg(entry["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(entry) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(entry):
            os.killpg(entry["pid"], signal.SIGKILL)
        lines.append(f"{entry['name']}: stopped (pid {entry['pid']})")
    record_path.unlink()
    return lines


def stack_status(config: PipelineConfig) -> list[str]:
    record_path = state_dir(config) / "processes.json"
    if not record_path.is_file():
        return ["no stack recorded"]
    return [f"{entry['name']}: {'running' if _alive(entry) else 'stopped'} (pid {entry['pid']}, log {entry['log']})"
            for entry in json.loads(record_path.read_text())]
