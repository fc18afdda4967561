"""The MLflow UI, driven by a headless Chromium (Playwright with Debian's /usr/bin/chromium, no
`playwright install`): the registered model shows its `champion` and `challenger` aliases, the version
page shows its lineage tags, and the compare page of the two versions (reached by ticking both and
pressing Compare) shows their evaluation metrics. Screenshots go to test-artifacts/mlflow-ui/ for people to look at."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from test_registry_helpers import MlflowServer, make_train_dir

from orpo.config import PipelineConfig
from orpo.gate import promote
from orpo.registry import configure_mlflow, log_evaluation, register_training_run

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "mlflow-ui"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def populated(tmp_path_factory, tiny_model_dir):
    """A server holding two evaluated versions: 1 is champion, 2 (rejected by the gate) is challenger."""
    root = tmp_path_factory.mktemp("ui")
    with MlflowServer(root / "server") as server:
        config = PipelineConfig.model_validate(
            {"workdir": str(root / "work"),
             # The point-estimate gate: these versions carry metrics, not evaluation files to pair; the first
             # version becomes champion without a comparison (no start-model evaluation here).
             "registry": {"tracking_uri": server.url, "registered_model_name": "ui-model",
                          "gate": {"mode": "threshold", "first_version": "promote"}}}
        )
        configure_mlflow(config)
        first = register_training_run(config, make_train_dir(root, lora=False, base_dir=tiny_model_dir, seed=0))
        second = register_training_run(config, make_train_dir(root, lora=True, base_dir=tiny_model_dir, seed=1))
        log_evaluation(config, first, {"mt_bench/score": 5.25, "alpaca/win_rate": 11.5, "preference/accuracy": 0.625})
        log_evaluation(config, second, {"mt_bench/score": 4.75, "alpaca/win_rate": 13.5, "preference/accuracy": 0.5})
        assert promote(config, first).promoted
        assert not promote(config, second).promoted
        yield {"url": server.url, "first": first, "second": second}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_model_page_shows_champion_and_challenger(populated, page):
    # MLflow pages scroll inside their own panes (a full-page shot shows only the viewport), and each
    # version row lists all its tags: a tall window gets both versions into the screenshot.
    page.set_viewport_size({"width": 1600, "height": 2600})
    page.goto(f"{populated['url']}/#/models/ui-model")
    page.get_by_text("Version 1", exact=True).wait_for(timeout=60_000)
    for version, alias in (("1", "champion"), ("2", "challenger")):
        row = page.get_by_role("row").filter(has=page.get_by_text(f"Version {version}", exact=True))
        # The alias chip reads "@ champion" (with a no-break space); gate tags mention the word too.
        row.get_by_text(re.compile(rf"^@\s*{alias}$")).wait_for(timeout=30_000)
    _shot(page, "registered-model")
    page.set_viewport_size({"width": 1600, "height": 1000})


def test_version_page_shows_lineage_and_gate(populated, page):
    page.goto(f"{populated['url']}/#/models/ui-model/versions/2")
    page.get_by_text("data_fingerprint").first.wait_for(timeout=60_000)
    _shot(page, "model-version")
    body = page.inner_text("body")
    for text in ("base_model", "builtin:tiny-llama", "fp0001abcdef", "gate.decision", "rejected", "challenger"):
        assert text in body, text


def test_compare_page_of_two_versions_shows_their_evaluation_metrics(populated, page):
    """The user's path: tick both versions on the model page, press Compare."""
    page.goto(f"{populated['url']}/#/models/ui-model")
    page.get_by_text("Version 1", exact=True).wait_for(timeout=60_000)
    for version in ("1", "2"):
        row = page.get_by_role("row").filter(has=page.get_by_text(f"Version {version}", exact=True))
        row.get_by_role("checkbox").check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("Comparing 2 Versions").wait_for(timeout=60_000)
    assert "compare-model-versions" in page.url
    expected = {  # metric -> (version 1, version 2), in the order the page lists versions
        "mt_bench/score": ("5.25", "4.75"),
        "alpaca/win_rate": ("11.5", "13.5"),
        "preference/accuracy": ("0.625", "0.5"),
    }
    for metric, values in expected.items():
        row = page.locator("tr").filter(has=page.get_by_text(metric, exact=True))
        row.wait_for(timeout=30_000)
        cells = [cell.strip() for cell in row.inner_text().split("\t")]
        assert cells == [metric, *values], cells
    page.get_by_text("mt_bench/score", exact=True).scroll_into_view_if_needed()
    _shot(page, "compare-versions")
    assert os.path.getsize(SCREENSHOTS / "compare-versions.png") > 20_000
