"""The UI in a real browser: headless Chromium (found or installed by the `chromium` fixture, browser.py) driven by
Playwright against the webserver and the finished `phi2_pipeline` run the GraphQL tests share (dagster_ui.py).
Screenshots land in the test's temporary directory; the ones in docs/screenshots/ come from such a run.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# Wide enough that the expanded graph draws full nodes (name, status, kinds) instead of truncated labels.
VIEWPORT = {"width": 2400, "height": 1350}
# Generous: the first page load compiles the UI's bundle and queries a busy webserver.
UI_TIMEOUT_MS = 60_000
STAGE_GROUPS = ("data", "training", "evaluation", "release")
GRAPH_ASSETS = (
    "tokenized_xsum", "lora_adapter", "evaluation_xsum", "baseline_summaries", "finetuned_summaries",
    "prompt_template_report", "rouge_report",
)
REPORTED_METRIC = "finetuned_rougeL"


@pytest.fixture(scope="module")
def page(dagster_ui, chromium) -> Iterator[Page]:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui_screenshots")


def metadata_row(page: Page, label: str) -> Locator:
    """The row of the asset page's metadata table whose key cell is exactly `label`."""
    return page.locator("tr", has=page.get_by_role("cell", name=label, exact=True)).first


def test_asset_graph_shows_every_stage(page, dagster_ui, pipeline_run, screenshots):
    page.goto(f"{dagster_ui.url}/asset-groups")
    # Several groups open collapsed; the graph's settings menu expands them all, as a user would.
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    page.get_by_text("Hide navigation").click()
    for name in (*STAGE_GROUPS, *GRAPH_ASSETS):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_role("button", name="Materialize all")).to_be_visible()
    page.screenshot(path=screenshots / "asset_graph.png")


def test_rouge_report_page_shows_rouge_values_and_plots(page, dagster_ui, pipeline_run, screenshots):
    _, entries = dagster_ui.latest_materialization(["rouge_report"])
    expected = entries[REPORTED_METRIC]["floatValue"]
    page.goto(f"{dagster_ui.url}/assets/rouge_report")
    row = metadata_row(page, REPORTED_METRIC)
    expect(row).to_be_visible()
    shown = float(row.locator("td").last.inner_text().strip())
    assert shown == pytest.approx(expected, abs=1e-4)
    assert 0.0 <= shown <= 1.0
    row.evaluate("row => row.scrollIntoView({block: 'center'})")
    page.screenshot(path=screenshots / "rouge_report.png")

    plot = next(label for label, entry in entries.items()
                if entry["__typename"] == "MarkdownMetadataEntry" and entry["mdStr"].startswith("!["))
    metadata_row(page, plot).get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator("img").first
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth > 0"), "the plot's PNG decodes"
    page.screenshot(path=screenshots / "rouge_report_plot.png")
