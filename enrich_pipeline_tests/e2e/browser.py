"""The browser side of the end-to-end UI tests: Debian's Chromium driven by Playwright, pages
opened as a person who dismissed Dagster's welcome dialog sees them, screenshots kept in
``artifacts/`` (to be looked at), and the locators that read what the Dagster UI shows.

Never downloads a browser (no ``playwright install``): CI installs Debian's ``chromium``
package (see ``.ci/run``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from enrich_pipeline_tests.helpers import API_KEY

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A deadline for each wait on the page, not an expectation: the UI is slow on a busy machine.
UI_TIMEOUT_MS = 30_000


def shown(value: object) -> str:
    """A metadata value as the UI prints it (floats without a trailing ``.0``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    return sync_playwright


class Screenshots:
    """Full-page screenshots, each saved in ``artifacts/`` and in the test's own folder; every
    page shot is also checked for the API key."""

    def __init__(self, tmp_path: Path, prefix: str = "e2e_ui") -> None:
        self.folders = (ARTIFACTS, tmp_path)
        self.prefix = prefix
        self.saved: list[Path] = []
        ARTIFACTS.mkdir(exist_ok=True)

    def __call__(self, page: Any, name: str) -> Path:
        for folder in self.folders:
            page.screenshot(path=str(folder / f"{self.prefix}_{name}.png"), full_page=True)
        path = ARTIFACTS / f"{self.prefix}_{name}.png"
        self.saved.append(path)
        assert API_KEY not in page.content()
        return path


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (closed at the end of the block)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Debian's Chromium is missing ({CHROMIUM}): `apt-get install -y chromium` "
            "(.ci/run installs it); this test never downloads a browser"
        )
    with _playwright()() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def dagster_page(shots: Screenshots, failure_name: str) -> Iterator[Any]:
    """A Chromium page for the Dagster UI; on a failure its screen is saved as
    ``<prefix>_<failure_name>_failure.png`` before the browser closes."""
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1440, "height": 1100})
        # Dagster shows a "join the community" dialog once on a loopback origin; mark it as
        # seen, as a user who dismissed it would have.
        context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
        page = context.new_page()
        try:
            yield page
        except BaseException:
            shots(page, f"{failure_name}_failure")
            raise
        print("screenshots:", *shots.saved, sep="\n  ")


def metadata_row(page: Any, key: str) -> Any:
    """The value cell of metadata entry ``key`` in a materialization's or observation's table.

    The value is the row's last non-empty cell (the overview adds a timestamp column, the
    partition view an empty one)."""
    first = page.locator("td:first-child", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))
    cells = page.locator("tr").filter(has=first).locator("td")
    return cells.filter(has_text=re.compile(r"\S")).last


def partition_dot(page: Any, partition: str) -> Any:
    """The status dot beside a partition in an asset's Partitions view: its colour is how the
    view tells a materialized partition (green) from a failed one (red)."""
    name = page.locator(f"div[data-tooltip={json.dumps(partition)}]").first
    return name.locator("xpath=following-sibling::div[contains(@style, 'border-radius')]")


def dot_colour(dot: Any) -> str:
    """The dot's background as written in its style (``var(--color-accent-green)``)."""
    return dot.evaluate("e => e.style.background")
