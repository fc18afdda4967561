"""The local stack: a Prefect server, the deployment-serving process and an MLflow server, on 127.0.0.1.

`stack_up` starts each as its own process group, waits for its health endpoint, and records PID, command
line, port and log path in `<workdir>/stack/processes.json`; `stack_down` stops exactly those processes (it
checks that a recorded PID still runs the recorded command before signalling it, so a reused PID is left
alone). The record is found from the config (its workdir), so `down` and `status` take the same `--config`
and overrides as `up`; every started stack is also listed in a per-user index (`stacks.json` in the cache
directory), so a `down` that finds no record here can say where the running stack was started instead of
reporting nothing while its ports stay up.

The Prefect server runs with CSRF protection on and cross-origin requests allowed only from its own
origin; its clients (the deployment server, flows, `orpo`) fetch CSRF tokens themselves.
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
from orpo.errors import OrpoError

HOST = "127.0.0.1"
RECORD = "processes.json"

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_UI_ENABLED": "true",
}


class StackError(OrpoError, RuntimeError):
    """The stack cannot be started, found or stopped; the message names the record, port or log to look at."""


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
    origins = f"http://{HOST}:{prefect_port},http://localhost:{prefect_port}"
    return {
        **os.environ,
        **QUIET_ENV,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        # What Prefect offers a local server against other web pages (it has no Host-header check; see the
        # README): state-changing requests need a CSRF token, and only the UI's own origin may read answers.
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": origins,
        "MLFLOW_TRACKING_URI": config.resolved_tracking_uri(),
    }


def _wait_healthy(url: str, name: str, log_path: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout_s:.0f} s; see {log_path}")


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
    record_path = root / RECORD
    if record_path.is_file() and any(_alive(entry) for entry in json.loads(record_path.read_text())):
        raise StackError(f"a stack is already running (see {record_path}); stop it with `orpo stack down` and "
                         "the same --config and overrides")
    busy = [port for port in (prefect_port, mlflow_port) if _listening(port)]
    if busy:
        raise StackError(f"{HOST}:{busy[0]} is already in use: {_elsewhere(root)}")
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
         prefect_port, f"http://{HOST}:{prefect_port}/api/health"),
        ("mlflow-server", [str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
                           "--backend-store-uri", backend, "--workers", "1"],
         mlflow_port, f"http://{HOST}:{mlflow_port}/health"),
        ("deployments", [str(bin_dir / "orpo"), "deploy", *(["--config", config_path] if config_path else [])],
         None, None),
    ]
    records = []
    try:
        for name, command, port, health in specs:
            process, log_path = _start(name, command, env, logs)
            records.append({"name": name, "pid": process.pid, "command": command, "port": port, "log": str(log_path)})
            write_record(root, records)
            if health:
                _wait_healthy(health, name, log_path, process, timeout_s)
    except BaseException:
        if record_path.is_file():
            stack_down(config)
        raise
    return StackInfo(f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}", root)


def write_record(root: Path, records: list[dict]) -> None:
    """Record the started processes under `root` and list `root` in the per-user index of stacks."""
    root.mkdir(parents=True, exist_ok=True)
    (root / RECORD).write_text(json.dumps(records, indent=2))
    known = _index()
    if str(root) not in known:
        _write_index([*known, str(root)])


def _index_path() -> Path:
    from orpo.models import default_cache_dir

    return default_cache_dir().parent / "stacks.json"


def _index() -> list[str]:
    try:
        return [str(item) for item in json.loads(_index_path().read_text())]
    except (OSError, ValueError):
        return []


def _write_index(roots: list[str]) -> None:
    path = _index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(roots, indent=2))


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _running_elsewhere(root: Path) -> list[Path]:
    """State dirs of other recorded stacks with a live process (stale index entries are dropped)."""
    live, kept = [], []
    for item in _index():
        try:
            entries = json.loads((Path(item) / RECORD).read_text())
        except (OSError, ValueError):  # stopped (record removed) or unreadable: forget it
            continue
        kept.append(item)
        if Path(item) != root and any(_alive(entry) for entry in entries):
            live.append(Path(item))
    if kept != _index():
        _write_index(kept)
    return live


def _elsewhere(root: Path) -> str:
    """What to tell a user whose config points at `root` when a stack seems to run somewhere else."""
    others = _running_elsewhere(root)
    if not others:
        return (f"no stack of this project is recorded as running (looked in {root / RECORD} and {_index_path()}); "
                "stop whatever holds the port, or choose other ports")
    where = "; ".join(f"{other / RECORD} (stop it with `orpo stack down workdir={other.parent}`)" for other in others)
    return f"a stack started with another config or workdir is running: {where}"


def _no_record(root: Path, ports: tuple[int, ...]) -> list[str]:
    """Nothing recorded for this config: fine if nothing runs, an error if a stack or its ports are up."""
    busy = [port for port in ports if _listening(port)]
    if busy or _running_elsewhere(root):
        raise StackError(
            f"no stack recorded in {root / RECORD}"
            + (f", but {', '.join(f'{HOST}:{port}' for port in busy)} {'is' if len(busy) == 1 else 'are'} in use"
               if busy else "")
            + f": {_elsewhere(root)}. Use the same --config and overrides (workdir) as `orpo stack up`."
        )
    return [f"no stack recorded in {root / RECORD}, and ports {', '.join(map(str, ports))} are free"]


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


def stack_down(config: PipelineConfig, timeout_s: float = 20.0, ports: tuple[int, ...] = (4200, 5000)) -> list[str]:
    """Stop the processes recorded by stack_up for this config (TERM, then KILL after `timeout_s`).

    Without a record, raises StackError when one of `ports` is in use or another recorded stack runs.
    """
    root = state_dir(config)
    record_path = root / RECORD
    if not record_path.is_file():
        return _no_record(root, ports)
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
    _write_index([item for item in _index() if item != str(root)])
    return lines


def stack_status(config: PipelineConfig, ports: tuple[int, ...] = (4200, 5000)) -> list[str]:
    """One line per recorded process; without a record, as in stack_down."""
    root = state_dir(config)
    record_path = root / RECORD
    if not record_path.is_file():
        return _no_record(root, ports)
    return [f"{entry['name']}: {'running' if _alive(entry) else 'stopped'} (pid {entry['pid']}, log {entry['log']})"
            for entry in json.loads(record_path.read_text())]
