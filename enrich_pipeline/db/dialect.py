"""What the server can do, probed at connect rather than guessed from a version number.

AnalyticDB for PostgreSQL 7.0 is Greenplum 7 (PostgreSQL 12); 6.0 is Greenplum 6 (PostgreSQL 9.4
with backports). The pipeline's statements are written for the common subset (see README
"Running on AnalyticDB"); where servers differ, the store asks the ``Dialect``:

- Greenplum-family servers get heap tables with ``DISTRIBUTED BY`` and no ``CONCURRENTLY``;
- an append-optimized items table gets no ``UPDATE ... RETURNING`` (written rows are read back);
- search ranks with FastANN's ``<=>`` on ``real[]``, pgvector's, or plain SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

_GREENPLUM = re.compile(r"Greenplum Database (\d+)\.(\d+)")
_ANALYTICDB = re.compile(r"AnalyticDB", re.IGNORECASE)


@dataclass(frozen=True)
class Dialect:
    version: str
    server_version_num: int
    greenplum_major: int | None = None
    analyticdb: str | None = None
    jsonb_concat: bool = True
    pgvector: bool = False
    fastann: bool = False
    # False for an append-optimized items table, where UPDATE ... RETURNING is not relied on.
    items_returning: bool = True
    # True when the id column has a unique index: NULL and duplicate ids cannot exist.
    ids_unique: bool = True

    @property
    def greenplum(self) -> bool:
        return self.greenplum_major is not None

    @property
    def concurrent_index(self) -> bool:
        """CREATE INDEX CONCURRENTLY exists (not on Greenplum 6 or 7)."""
        return not self.greenplum

    @property
    def label(self) -> str:
        """One line for the report and the materialization metadata."""
        pg = _pg_version(self.server_version_num)
        if self.analyticdb:
            name = f"AnalyticDB for PostgreSQL {self.analyticdb} (PostgreSQL {pg})"
        elif self.greenplum:
            name = f"Greenplum {self.greenplum_major} (PostgreSQL {pg})"
        else:
            name = f"PostgreSQL {pg}"
        notes = []
        if not self.jsonb_concat:
            notes.append("jsonb without ||")
        search = "FastANN" if self.fastann else "pgvector" if self.pgvector else "plain SQL"
        notes.append(f"{search} search")
        if not self.items_returning:
            notes.append("append-optimized items table")
        return f"{name}; {', '.join(notes)}"


def _pg_version(num: int) -> str:
    major = num // 10000
    if major >= 10:
        return f"{major}.{num % 10000}"
    return f"{major}.{num // 100 % 100}.{num % 100}"


def probe(conn: psycopg.Connection, items: str) -> Dialect:
    """Ask the server (and the items table ``items``, a qualified name) what it supports."""

    def one(query: str, params: tuple = ()) -> object:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None

    version = str(one("SELECT version()"))
    num = int(str(one("SELECT setting FROM pg_settings WHERE name = 'server_version_num'")))
    gp = _GREENPLUM.search(version)
    adb = one("SELECT setting FROM pg_settings WHERE name = 'adbpg_version'")
    if adb is None and _ANALYTICDB.search(version):
        adb = "(version unknown)"
    dialect = Dialect(
        version=version,
        server_version_num=num,
        greenplum_major=int(gp.group(1)) if gp else None,
        analyticdb=str(adb) if adb is not None else None,
        jsonb_concat=one("SELECT to_regprocedure('jsonb_concat(jsonb,jsonb)') IS NOT NULL") is True,
        pgvector=one("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')") is True,
        fastann=one("SELECT EXISTS (SELECT 1 FROM pg_am WHERE amname = 'ann')") is True,
        items_returning=not _append_optimized(conn, items),
        ids_unique=_ids_unique(conn, items),
    )
    conn.commit()
    return dialect


def _append_optimized(conn: psycopg.Connection, items: str) -> bool:
    # Greenplum 6 marks storage in pg_class.relstorage ('a', 'c'); Greenplum 7 and PostgreSQL
    # name the table access method in pg_am ('ao_row', 'ao_column').
    has_relstorage = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = 'pg_catalog.pg_class'::regclass"
        " AND attname = 'relstorage'"
    ).fetchone()
    if has_relstorage:
        row = conn.execute(
            "SELECT relstorage::text FROM pg_class WHERE oid = to_regclass(%s)", (items,)
        ).fetchone()
        return bool(row and row[0] in ("a", "c"))
    row = conn.execute(
        "SELECT a.amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam"
        " WHERE c.oid = to_regclass(%s)",
        (items,),
    ).fetchone()
    return bool(row and str(row[0]).startswith("ao_"))


def _ids_unique(conn: psycopg.Connection, items: str) -> bool:
    """A unique, non-partial index on exactly the id column, which is NOT NULL (a primary key,
    usually): then no two rows share an id and none lacks one."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a"
        " ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]"
        " WHERE x.indrelid = to_regclass(%s) AND x.indisunique AND x.indnatts = 1"
        " AND x.indpred IS NULL AND a.attname = 'id' AND a.attnotnull)",
        (items,),
    ).fetchone()
    return bool(row and row[0])
