"""Idempotent, versioned migrations for the tables the pipeline owns.

Each ``migrations/NNNN_name.sql`` file runs once per namespace, inside one transaction, under an
advisory lock so that two runs starting together do not race. ``{ns}`` in a file is replaced by
the quoted namespace with ``psycopg.sql`` (so braces meant for SQL are written doubled).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

_LOCK_KEY = 0x656E7269  # "enri": one lock for every migration of this project


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


def available() -> list[Migration]:
    folder = resources.files("enrich_pipeline.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def migrate(conn: psycopg.Connection, namespace: str) -> list[int]:
    """Apply what is missing; return the versions applied now (empty when up to date)."""
    ns = sql.Identifier(namespace)
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ns))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.enrich_schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ns)
        )
        done = {
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT version FROM {}.enrich_schema_migrations").format(ns)
            )
        }
        for migration in available():
            if migration.version in done:
                continue
            conn.execute(sql.SQL(migration.text).format(ns=ns))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.enrich_schema_migrations (version, name) VALUES (%s, %s)"
                ).format(ns),
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
    return applied_now
