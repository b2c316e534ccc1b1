"""Idempotent, versioned migrations for the tables the pipeline owns.

Each ``migrations/NNNN_name.sql`` file runs once per namespace, inside one transaction, under an
advisory lock so that two runs starting together do not race (AnalyticDB's advisory locks are
per coordinator, which is where every session of one instance lands). ``{ns}`` in a file is
replaced by the quoted namespace with ``psycopg.sql`` (so braces meant for SQL are written
doubled).
"""

from __future__ import annotations

import re
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


# Greenplum-family servers (AnalyticDB) get each table as a heap table distributed by a column
# its key contains; the hint is a comment everywhere else.
_GREENPLUM_HINT = re.compile(r"/\*GREENPLUM (.*?) \*/")


def for_server(text: str, *, greenplum: bool) -> str:
    return _GREENPLUM_HINT.sub(r"WITH (appendonly=false) \1" if greenplum else "", text)


def pending(conn: psycopg.Connection, namespace: str) -> list[Migration]:
    """Migrations not applied yet, found with reads only (a role that may not create tables can
    still run a migrated namespace)."""
    table = conn.execute(
        "SELECT to_regclass(%s)",
        (sql.Identifier(namespace, "enrich_schema_migrations").as_string(conn),),
    ).fetchone()
    done: set[int] = set()
    if table and table[0] is not None:
        done = {
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT version FROM {}").format(
                    sql.Identifier(namespace, "enrich_schema_migrations")
                )
            )
        }
    conn.commit()
    return [m for m in available() if m.version not in done]


def migrate(conn: psycopg.Connection, namespace: str, *, greenplum: bool = False) -> list[int]:
    """Apply what is missing; return the versions applied now (empty when up to date)."""
    if not pending(conn, namespace):
        return []
    ns = sql.Identifier(namespace)
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        exists = conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (namespace,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ns))
        conn.execute(
            sql.SQL(
                for_server(
                    "CREATE TABLE IF NOT EXISTS {}.enrich_schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                    " /*GREENPLUM DISTRIBUTED BY (version) */",
                    greenplum=greenplum,
                )
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
            conn.execute(sql.SQL(for_server(migration.text, greenplum=greenplum)).format(ns=ns))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.enrich_schema_migrations (version, name) VALUES (%s, %s)"
                ).format(ns),
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
    return applied_now


def tables() -> list[str]:
    """The pipeline's own tables, as the migrations create them (and not drop them later)."""
    text = "".join(m.text for m in available())
    names = re.findall(r"CREATE TABLE IF NOT EXISTS \{ns\}\.(\w+)", text)
    dropped = set(re.findall(r"DROP TABLE \{ns\}\.(\w+)", text))
    return ["enrich_schema_migrations", *(n for n in dict.fromkeys(names) if n not in dropped)]
