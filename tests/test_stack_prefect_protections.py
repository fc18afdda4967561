"""The stack's Prefect server with the protections stack_env turns on: a state-changing request without a CSRF
token is refused, a foreign origin gets no CORS grant, and Prefect's own client (what the deployment server and
flows use) still works."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orpo.config import load_config
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from flows.stack import stack_env

    workdir = tmp_path_factory.mktemp("prefect-protections")
    port = free_port()
    env = stack_env(load_config(None, [f"workdir={workdir}"]), port, free_port())
    Path(env["PREFECT_HOME"]).mkdir(parents=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    log = workdir / "prefect.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield {"api": api, "port": port}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _post(url: str, body: dict, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_post_without_csrf_token_is_refused(prefect_server):
    assert _post(f"{prefect_server['api']}/flows/", {"name": "csrf-probe"}) == 403


def test_foreign_origin_gets_no_cors_grant(prefect_server):
    request = urllib.request.Request(f"{prefect_server['api']}/flows/filter", method="OPTIONS", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            allowed = response.headers.get("access-control-allow-origin")
    except urllib.error.HTTPError as exc:
        allowed = exc.headers.get("access-control-allow-origin")
    assert allowed != "*" and allowed != "http://evil.example"


def test_prefect_client_works_with_csrf_on(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["api"], PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: True}):
        with get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("csrf-client-probe")
            assert client.read_flow(flow_id).name == "csrf-client-probe"
