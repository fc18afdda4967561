"""What the Prefect tasks share: which failures are worth a retry, and log streaming of subprocesses."""

from __future__ import annotations

import collections
import subprocess
import threading
from typing import Iterable

_TRANSIENT = (ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Network trouble and server-side errors are worth retrying; bad input and bugs are not."""
    if isinstance(exc, _TRANSIENT):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    name = type(exc).__name__
    return name in {"ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "HfHubHTTPError"}


def retry_on_transient(task, task_run, state) -> bool:
    """`retry_condition_fn` for Prefect tasks: retry only on transient failures."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify whatever the task raised
        return is_transient(exc)
    return False


def stream_subprocess(command: list[str], log, *, env: dict | None = None, cwd: str | None = None,
                      timeout_s: float | None = None, tail_lines: int = 40) -> tuple[int, list[str]]:
    """Run `command`, forwarding each output line to `log.info`; returns (exit code, last lines).

    With `timeout_s`, the process is killed when it runs longer and TimeoutError is raised.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, cwd=cwd
    )
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        process.kill()

    watchdog = threading.Timer(timeout_s, kill_on_timeout) if timeout_s else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    try:
        for line in _lines(process.stdout):
            tail.append(line)
            log.info(line)
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        if watchdog:
            watchdog.cancel()
    if timed_out.is_set():
        raise TimeoutError(f"{command[0]} ran longer than {timeout_s:.0f} s and was stopped; last output:\n"
                           + "\n".join(tail))
    return code, list(tail)


def _lines(stream) -> Iterable[str]:
    assert stream is not None
    for raw in stream:
        line = raw.rstrip()
        # tqdm redraws with carriage returns; the last redraw is the line worth keeping
        if "\r" in line:
            line = line.rsplit("\r", 1)[-1]
        if line:
            yield line
