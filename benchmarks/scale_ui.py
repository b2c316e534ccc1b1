"""The Dagster UI side of ``benchmarks.scale``: a webserver on an instance, and the asset page
and its Partitions tab timed in Debian's Chromium (``e2e/browser.py``'s browser)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench.harness import REPO, child_env, free_port

ASSET = "enriched_items"
# A deadline for each page, far above the goal: a page that misses is timed, not dropped.
PAGE_DEADLINE_MS = 120_000


def load() -> str:
    """The load average (1, 5, 15 minutes), printed beside every figure."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def libpq_url(dagster_url: str) -> str:
    """A ``DAGSTER_PG_URL`` (SQLAlchemy's form) as psycopg takes it."""
    return dagster_url.replace("postgresql+psycopg2://", "postgresql://", 1)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited ({proc.returncode})")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def webserver(env: dict[str, str], home: Path) -> Iterator[str]:
    """``dagster-webserver`` on the repository's workspace and this instance; its URL."""
    port = free_port()
    with (home / "webserver.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster_webserver",
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=child_env({**env, "DAGSTER_HOME": str(home)}),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/server_info", 300, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class PageTimes:
    """Seconds from navigation until the page shows what a person came for, opened twice
    (the second with the webserver's and the browser's caches warm)."""

    asset_s: list[float]
    partitions_s: list[float]
    load: str

    def describe(self, goal: float) -> str:
        worst = max(self.asset_s + self.partitions_s)
        return (
            f"asset page {' / '.join(f'{s:.1f}' for s in self.asset_s)} s, Partitions tab "
            f"{' / '.join(f'{s:.1f}' for s in self.partitions_s)} s "
            f"{'ok' if worst < goal else 'MISS'} (load {self.load})"
        )


def time_pages(url: str, first_key: str, shots: Path | None = None) -> PageTimes:
    """The asset page until its status section is drawn, and the Partitions tab until the
    first partition of the list and the materialized count are shown."""
    from playwright.sync_api import expect

    from enrich_pipeline_tests.e2e.browser import chromium

    asset: list[float] = []
    partitions: list[float] = []
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1440, "height": 1100})
        context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
        page = context.new_page()
        for round_ in range(2):
            started = time.perf_counter()
            page.goto(f"{url}/assets/{ASSET}")
            expect(
                page.get_by_text(re.compile(r"Latest materialization|Never materialized")).first
            ).to_be_visible(timeout=PAGE_DEADLINE_MS)
            asset.append(round(time.perf_counter() - started, 2))
            if shots and round_ == 0:
                page.screenshot(path=str(shots / "scale_asset.png"))
            started = time.perf_counter()
            page.goto(f"{url}/assets/{ASSET}?view=partitions")
            expect(page.get_by_text(re.compile(r"Materialized \(")).first).to_be_visible(
                timeout=PAGE_DEADLINE_MS
            )
            expect(page.get_by_title(first_key, exact=True).first).to_be_visible(
                timeout=PAGE_DEADLINE_MS
            )
            partitions.append(round(time.perf_counter() - started, 2))
            if shots and round_ == 0:
                page.screenshot(path=str(shots / "scale_partitions.png"))
        context.close()
    return PageTimes(asset, partitions, load())
