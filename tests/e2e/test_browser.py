"""The two UIs as a person uses them: headless Chromium (Debian's) driven by Playwright.

They run against the deployment of ``stack.py`` (Postgres-backed Dagster webserver + daemon +
gRPC code server, Postgres-backed MLflow server), the MLflow and catalog tests after the session's
whole-graph run on it (``dagster asset materialize --select '*'``). Every test saves a screenshot
under ``$SCRIPTORIUM_TEST_ARTIFACTS`` (or a temp dir) and prints its path.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

from tests.e2e.stack import Deployment, ensure_system_deps, wait_for
from tests.e2e.tiny_graph import GraphRun, cli_run_id

TIMEOUT_MS = 60_000  # a cold UI bundle on 2 busy cores


def chromium_executable() -> str:
    """Debian's Chromium binary (not the /usr/bin shell wrapper); ``$CHROMIUM_PATH`` overrides."""
    ensure_system_deps("chromium", "playwright")
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/lib/chromium/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium executable")
    return found


@pytest.fixture(scope="module")
def browser_page(artifacts_dir: Path) -> Iterator[Page]:
    """One headless browser page for the module (Playwright's own browsers are never downloaded).
    Module-scoped, not session-scoped: Playwright's event loop would stay open in this thread
    under later tests that run their own (``dagster.materialize``). The asset-graph test runs
    before the whole-graph run ends and the others after (tests/conftest.py), so the browser
    starts twice."""
    executable = chromium_executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        context = browser.new_context(viewport={"width": 1600, "height": 1800})
        # As if "Skip" had been clicked on Dagster's one-time "Join the Dagster community" dialog,
        # which would otherwise cover the page (it is shown on localhost origins only).
        context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        try:
            yield page
        finally:
            context.close()
            browser.close()


def screenshot(page: Page, artifacts_dir: Path, name: str) -> Path:
    path = artifacts_dir / "browser" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    return path


@pytest.fixture
def page(browser_page: Page, artifacts_dir: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """The shared page; a failing test leaves ``<test name>-failure.png`` to show what was there.
    Between tests the page is blank: a live UI left open keeps polling its server."""
    try:
        yield browser_page
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            with contextlib.suppress(Exception):
                screenshot(browser_page, artifacts_dir, f"{request.node.name}-failure")
        with contextlib.suppress(Exception):
            browser_page.goto("about:blank")


def shown_as(name: str, label: str) -> bool:
    """A graph node label shows ``name`` in full or middle-truncated (``alpaca…_strategyqa``)."""
    if "…" not in label:
        return label == name
    head, tail = label.split("…", 1)
    return name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail)


def test_dagster_asset_graph_shows_every_asset(
    page, deployment: Deployment, artifacts_dir: Path
) -> None:
    from pipeline.definitions import defs

    names = sorted(k.path[-1] for k in defs.resolve_asset_graph().get_all_asset_keys())
    page.goto(f"{deployment.webserver_url}/asset-groups")
    page.locator("foreignObject").first.wait_for(state="visible")  # the graph has rendered
    page.mouse.click(1000, 300, button="right")  # the graph's context menu
    page.get_by_role("menuitem", name="Expand all groups").first.click()
    # Nodes outside the viewport are not rendered: zoom out step by step until all of them are.
    nodes = page.locator("foreignObject [class*='AssetNode_assetName']")
    for _ in range(4):
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: nodes.count() >= len(names), "every asset node", 3)
            break
        page.locator("[aria-label=zoom_out]").click()
    labels = nodes.all_inner_texts()
    missing = [n for n in names if not any(shown_as(n, label.strip()) for label in labels)]
    screenshot(page, artifacts_dir, "dagster-asset-graph")
    assert not missing, f"not in the asset graph: {missing}; labels: {labels}"


def test_dagster_materialise_catalog_from_ui(
    page, deployment: Deployment, graph_run: GraphRun, artifacts_dir: Path
) -> None:
    # After the whole-graph run (graph_run): this run writes into the same data root.
    before = {r[0] for r in deployment.postgres.query("dagster", "SELECT run_id FROM runs")}
    page.goto(f"{deployment.webserver_url}/assets/gutenberg_catalog")
    page.locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$")).first.click()

    def new_run() -> str | None:
        rows = deployment.postgres.query("dagster", "SELECT run_id FROM runs")
        fresh = {r[0] for r in rows} - before
        return fresh.pop() if fresh else None

    run_id = wait_for(new_run, "a run launched from the UI", 60)
    assert deployment.wait_for_run(run_id, timeout=300) == "SUCCESS", deployment.logs()
    page.goto(f"{deployment.webserver_url}/runs/{run_id}")
    page.get_by_text("Success", exact=False).first.wait_for(state="visible")
    screenshot(page, artifacts_dir, "dagster-catalog-run")
    # The new materialisation's metadata on the asset's page (tiny profile: 7 selected books).
    page.goto(f"{deployment.webserver_url}/assets/gutenberg_catalog")
    row = page.locator("tr", has_text="selected_books").first
    row.wait_for(state="visible")
    cells = row.inner_text().split("\n")  # key, timestamp, value
    assert cells[0].strip() == "selected_books" and cells[-1].strip() == "7", cells
    page.locator("tr", has_text="catalog_rows").first.wait_for(state="visible")
    screenshot(page, artifacts_dir, "dagster-catalog-metadata")


def test_mlflow_ui_shows_pretraining_run(
    page, graph_run: GraphRun, deployment: Deployment, artifacts_dir: Path
) -> None:
    from mlflow import MlflowClient

    url = deployment.mlflow.url
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("scriptorium")
    assert experiment is not None
    [run] = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`dagster.run_id` = '{cli_run_id(graph_run)}' "
            "and tags.`dagster.asset_key` = 'pretrained_weights'"
        ),
    )
    base = f"{url}/#/experiments/{experiment.experiment_id}"
    page.goto(f"{base}/runs")
    page.get_by_text(run.info.run_name, exact=True).first.wait_for(state="visible")
    screenshot(page, artifacts_dir, "mlflow-runs")

    page.goto(f"{base}/runs/{run.info.run_id}/model-metrics")
    page.get_by_text("loss", exact=True).first.wait_for(state="visible")
    page.locator("canvas, svg.main-svg").first.wait_for(state="visible")
    time.sleep(1)  # let the chart finish drawing before the screenshot
    screenshot(page, artifacts_dir, "mlflow-loss-chart")

    page.goto(f"{base}/runs/{run.info.run_id}/artifacts")
    for name in ("model", "plots"):
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    screenshot(page, artifacts_dir, "mlflow-artifacts")
