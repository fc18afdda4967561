"""The local stack for real: a Prefect server, the deployment-serving process and an MLflow server, on loopback.

Checks what a user relies on: the nightly deployment exists with its cron schedule and upcoming runs; a run
triggered through the API completes and registers a new model version; and in a real browser, the Prefect UI
shows the deployment's schedule and its Quick run completes (screenshots in test-artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
import yaml

from orpo.config import load_config
from tests.conftest import REPO_ROOT, free_port, tiny_pipeline_overrides

pytestmark = [pytest.mark.slow, pytest.mark.server]

ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from flows.stack import stack_down, stack_env, stack_up

    workdir = tmp_path_factory.mktemp("stack")
    config = load_config(None, tiny_pipeline_overrides(workdir, "eval.suites=[preference]",
                                                       f"registry.tracking_uri=sqlite:///{workdir}/mlflow.db"))
    config_path = workdir / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    prefect_port, mlflow_port = free_port(), free_port()
    info = stack_up(config, config_path=str(config_path), prefect_port=prefect_port, mlflow_port=mlflow_port,
                    timeout_s=180)
    saved = {key: os.environ.get(key) for key in ("PREFECT_API_URL", "PREFECT_HOME")}
    env = stack_env(config, prefect_port, mlflow_port)
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    os.environ["ORPO_TEST_STACK_LOGS"] = str(info.state_dir / "logs")
    try:
        yield {"config": config, "info": info, "mlflow_port": mlflow_port}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        lines = stack_down(config)
        assert all("stopped" in line or "not running" in line for line in lines)


@contextlib.contextmanager
def _client():
    """A client of the stack's API, even while another test's Prefect harness is active in this process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            yield client


def _wait_for_deployment(client, name: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return client.read_deployment_by_name(name)
        except Exception:  # noqa: BLE001 - not registered yet
            time.sleep(2)
    logs = sorted(Path(os.environ["ORPO_TEST_STACK_LOGS"]).glob("*.log"))
    tails = "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in logs)
    raise TimeoutError(f"deployment {name} never appeared; stack logs:\n{tails}")


def _versions(stack) -> int:
    import mlflow

    uri = stack["config"].resolved_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return len(client.search_model_versions(f"name='{stack['config'].registry.registered_model_name}'"))
    except Exception:  # noqa: BLE001 - no registered model yet
        return 0


def _wait_for_final_state(client, flow_run_id, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout_s} s")


def _wait_for_manual_run(client, deployment_id, timeout_s: float = 60):
    """The flow run a Quick run click created (the scheduler's own runs are auto-scheduled)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        manual = [run for run in runs if not run.auto_scheduled]
        if manual:
            return manual[0].id
        time.sleep(1)
    raise TimeoutError("clicking Quick run created no flow run")


def test_nightly_deployment_has_cron_schedule_and_upcoming_runs(stack):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    with _client() as client:
        deployment = _wait_for_deployment(client, "alignment-pipeline/nightly-alignment")
        crons = [getattr(s.schedule, "cron", None) for s in deployment.schedules]
        assert stack["config"].orchestration.cron in crons
        assert getattr(deployment, "concurrency_limit", None) == 1 or getattr(deployment, "global_concurrency_limit", None)
        deadline = time.monotonic() + 90
        scheduled = []
        while time.monotonic() < deadline and not scheduled:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(),
            )
            scheduled = [run for run in scheduled if run.state and run.state.is_scheduled()]
            time.sleep(2)
        assert scheduled, "the scheduler created no upcoming runs for the nightly deployment"
        assert all(run.expected_start_time.hour == 2 and run.expected_start_time.minute == 0 for run in scheduled)


def test_run_triggered_through_the_api_completes_and_registers(stack):
    from prefect.deployments import run_deployment

    before = _versions(stack)
    with _client() as client:
        _wait_for_deployment(client, "alignment-pipeline/on-demand")
        run = run_deployment("alignment-pipeline/on-demand", timeout=0)
        final = _wait_for_final_state(client, run.id)
    assert final.state.is_completed(), f"flow run ended {final.state.type}: {final.state.message}"
    assert _versions(stack) == before + 1


@pytest.mark.browser
def test_quick_run_from_the_prefect_ui(stack):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (make test installs Debian's chromium as root)")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    base = stack["info"].prefect_url
    before = _versions(stack)
    with _client() as client:
        deployment = _wait_for_deployment(client, "alignment-pipeline/nightly-alignment")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/deployments", wait_until="networkidle")
        page.get_by_text("nightly-alignment", exact=True).first.click()
        page.wait_for_url(f"**/deployments/deployment/{deployment.id}**")
        page.wait_for_load_state("networkidle")
        expect(page.get_by_text("At 02:00 AM").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "prefect-deployment.png"), full_page=True)

        # exact: the "Runs" tab is a button too, and comes first on the page
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Quick run", exact=True).click()
        with _client() as client:
            flow_run_id = _wait_for_manual_run(client, deployment.id)
            page.screenshot(path=str(ARTIFACTS / "prefect-quick-run-started.png"), full_page=True)
            final = _wait_for_final_state(client, flow_run_id)
        page.goto(f"{base}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "prefect-quick-run-completed.png"), full_page=True)
        browser.close()
    assert final.state.is_completed(), f"flow run ended {final.state.type}: {final.state.message}"
    # A manual run with inputs a registered version already has completes without training (issue 13): only a
    # first run on this stack registers.
    assert _versions(stack) == (before if before else 1)
