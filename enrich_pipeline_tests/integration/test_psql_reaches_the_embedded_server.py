"""``enrich-dagster psql`` reaches the embedded server whatever database psql is asked for:
``-d dagster`` opens Dagster's storage in that same server (it used to replace the server's URL
with a bare name, which libpq looked for on its default socket, where no server runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from enrich_pipeline.cli.dagster import ensure_database
from enrich_pipeline.db import embedded
from enrich_pipeline.settings import DbSettings


@pytest.fixture
def home() -> Iterator[Path]:
    """An embedded server with its sample items and a ``dagster`` database, as enrich-dagster
    leaves it."""
    # Not under pytest's 0700 temp folder: as root, the server runs as its own user.
    folder = Path(tempfile.mkdtemp(prefix="enrich-psql-"))
    folder.chmod(0o755)
    settings = embedded.resolve(DbSettings.from_env({}), root=folder)
    ensure_database(settings.conninfo.get_secret_value(), "dagster")
    yield folder
    embedded.stop(folder)


def _psql(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_", "DAGSTER_", "PG"))
    }
    env["ENRICH_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "enrich_pipeline.cli.dagster", "psql", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_psql_opens_dagsters_database_in_the_embedded_server(home: Path) -> None:
    dagster = _psql(home, "-d", "dagster", "-Atc", "SELECT current_database()")
    assert dagster.returncode == 0, dagster.stderr
    assert dagster.stdout.strip() == "dagster"
    # Without -d: the items' database, as before.
    items = _psql(home, "-Atc", "SELECT count(*) > 0 FROM cleantab.items")
    assert items.returncode == 0, items.stderr
    assert items.stdout.strip() == "t"
    # A database the server does not have: psql's own error names it, from that server.
    missing = _psql(home, "-d", "nosuchdb", "-Atc", "SELECT 1")
    assert missing.returncode != 0
    assert '"nosuchdb" does not exist' in missing.stderr
