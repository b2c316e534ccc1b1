"""Helpers shared by the test tiers: the test's items table, images to feed the pipeline,
request-log readers for the stand-in, and write logs."""

from __future__ import annotations

import base64
import colorsys
import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from enrich_pipeline.cli import captions
from enrich_pipeline.db.samples import create_sample_table, insert_sample_items
from enrich_pipeline.enrichment.images import ImageLoadError, ImagePolicy, load_image
from enrich_pipeline.enrichment.synthetic import mean_color
from enrich_pipeline.settings import DashScopeSettings, DbSettings
from enrich_pipeline_tests.standin import StandIn

API_KEY = "sk-test-0123456789abcdef"


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
        return DbSettings(conninfo=self.conninfo, namespace=self.namespace, table=self.table)

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

    def write_by_hand(self, item_id: str, **keys: Any) -> None:
        """Someone else sets keys of a row's metadata (read, merged, written back: portable to
        servers without jsonb ``||``)."""
        with psycopg.connect(self.conninfo) as conn:
            row = conn.execute(
                sql.SQL("SELECT metadata FROM {} WHERE id::text = %s FOR UPDATE").format(
                    self.ident
                ),
                (item_id,),
            ).fetchone()
            assert row is not None, item_id
            merged = {**(row[0] if isinstance(row[0], dict) else {}), **keys}
            conn.execute(
                sql.SQL("UPDATE {} SET metadata = %s::jsonb WHERE id::text = %s").format(
                    self.ident
                ),
                (json.dumps(merged), item_id),
            )

    def execute(self, query: str, params: Any = None) -> list[tuple]:
        """Run SQL with ``{items}``/``{ns}`` standing for the quoted names."""
        composed = sql.SQL(query).format(items=self.ident, ns=sql.Identifier(self.namespace))
        with psycopg.connect(self.conninfo) as conn:
            cur = conn.execute(composed, params)
            return cur.fetchall() if cur.description else []


# ---------------------------------------------------------------------------------------------
# The database cut off for a while


class TcpProxy:
    """A loopback TCP proxy in front of the test database. ``outage(seconds)`` drops every
    connection and turns new ones away for that long, as a failover does to its clients."""

    def __init__(self, conninfo: str) -> None:
        params = conninfo_to_dict(conninfo)
        host, port = str(params.get("host") or "localhost"), int(params.get("port") or 5432)
        self._unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._tcp = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        params.update(host="127.0.0.1", port=str(self.port))
        self.conninfo = make_conninfo(**params)
        self._down_until = 0.0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drop_all()
        self._listener.close()

    def outage(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            open_now, self._open = self._open, []
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            if time.monotonic() < self._down_until:
                client.close()
                continue
            if self._unix:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self._unix)
            else:
                upstream = socket.create_connection(self._tcp)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# The command line


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(items: Items, server: StandIn, **extra: str) -> dict[str, str]:
    """The environment of a command run as its own process against the test database and
    ``server``: this process's, without any setting of the project's, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_"))
    }
    env.update(
        ADBPG_URL=items.conninfo,
        ADBPG_NAMESPACE=items.namespace,
        DASHSCOPE_API_KEY=API_KEY,
        DASHSCOPE_BASE_URL=server.base_url,
        DASHSCOPE_BACKOFF_INITIAL="0.01",
        ENRICH_ALLOW_LOCAL_FILES="true",
        **extra,
    )
    return env


def deployment_env(
    items: Items, server: StandIn, pg_conninfo: str, home: Path, dbname: str, **extra: str
) -> dict[str, str]:
    """``cli_env`` for a Dagster deployment started as processes of its own (``enrich-dagster``
    or ``up``): a fresh ``DAGSTER_HOME`` at ``home`` holding the shipped instance file, Dagster's
    storage in database ``dbname`` of the test server (created; the caller drops it), and the
    short intervals that let a test see the sensor,
    the leases and the back-off act within seconds; ``extra`` last."""
    from enrich_pipeline.cli.dagster import dagster_url_for, ensure_database
    from enrich_pipeline.defs.instance import INSTANCE_YAML

    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    ensure_database(pg_conninfo, dbname)
    env = {k: v for k, v in cli_env(items, server).items() if not k.startswith("DAGSTER_")}
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_PG_URL=dagster_url_for(pg_conninfo, dbname),
        ENRICH_HOME=str(home.parent / "enrich_home"),
        ENRICH_MAX_CONCURRENT_RUNS="2",
        ENRICH_SENSOR_INTERVAL="2",
        # Short leases: rows of a run that is killed come back within seconds.
        ENRICH_LEASE_SECONDS="10",
        # Short waits before a user whose run left its rows is requested again.
        ENRICH_RERUN_BACKOFF="2",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = captions.main(argv, out=out)
    return code, out.getvalue()


def stat(report: str, name: str) -> str:
    match = re.search(rf"^  {name}:\s+(\S+)", report, re.M)
    assert match, f"{name} not in report:\n{report}"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Image bytes


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    # Noise defeats compression, so cutting the scan data loses real content.
    pixels = np.random.default_rng(7).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    raw = buffer.getvalue()
    return raw[: len(raw) * 6 // 10]


LOOPBACK = ImagePolicy(allow_private_networks=True, timeout=5.0)


ONLY_LOOPBACK_EXEMPT = ImagePolicy(allowed_networks=frozenset({"127.0.0.0/8"}), timeout=5.0)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid_png(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (20, 60, 200)
) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def noisy_jpeg(size: tuple[int, int] = (320, 240)) -> bytes:
    # Noise defeats compression, so the scan data is long and cutting it loses real content.
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height``: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PNG = solid_png()


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


def load_error(source: str, policy: ImagePolicy = LOOPBACK) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, policy)
    return info.value


# -- where a secret could leak (the secrets tests search these texts) --------------------


def log_texts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = [("caplog.text", caplog.text)]
    for record in caplog.records:
        texts.append((f"log {record.name}", formatter.format(record)))
        texts.append((f"log args {record.name}", repr(record.args)))
    return texts


def exception_texts(where: str, exc: BaseException) -> list[tuple[str, str]]:
    texts = [
        (f"{where} str", str(exc)),
        (f"{where} repr", repr(exc)),
        (f"{where} traceback", "".join(traceback.format_exception(exc))),
    ]
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        texts += [(f"{where} cause str", str(cause)), (f"{where} cause repr", repr(cause))]
    return texts


def table_texts(conninfo: str, namespace: str) -> list[tuple[str, str]]:
    """Every row of every table in the namespace: items, ledger, claims, cache, embeddings."""
    texts = []
    with psycopg.connect(conninfo) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (namespace,),
            )
        ]
        for table in tables:
            rows = conn.execute(
                sql.SQL("SELECT row_to_json(t)::text FROM {} t").format(
                    sql.Identifier(namespace, table)
                )
            ).fetchall()
            texts.append((f"table {table}", "\n".join(r[0] for r in rows)))
    return texts


def standin_settings(server: StandIn, **overrides: Any) -> DashScopeSettings:
    """DashScope settings for the stand-in: the production policy with backoffs of
    milliseconds, so that retry tests take no time."""
    base = DashScopeSettings(
        api_key=API_KEY,
        base_url=server.base_url,
        timeout=5.0,
        backoff_initial=0.01,
        backoff_max=0.05,
    )
    return base.with_(**overrides)


# -- pacing: a clock that moves only when told, and the provider's sliding count -----------


class FakeClock:
    """Time that moves only when the limiter sleeps (or the test says): exact and instant."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def most_in(stamps: list[float], span: float, weights: list[float] | None = None) -> float:
    """The most units in any half-open window ``(t - span, t]``: the provider's sliding count."""
    weights = weights or [1.0] * len(stamps)
    pairs = sorted(zip(stamps, weights, strict=True))
    best = total = 0.0
    start = 0
    for end, (t, w) in enumerate(pairs):
        total += w
        while t - pairs[start][0] >= span:
            total -= pairs[start][1]
            start += 1
        best = max(best, total)
        assert end >= start
    return best
