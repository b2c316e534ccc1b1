"""The embedded demo's own sample table. Only the demo creates an items table; against a user's
database the pipeline never does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql


def create_pgvector_extension(conn: psycopg.Connection) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def create_sample_table(conn: psycopg.Connection, namespace: str, table: str) -> None:
    items = sql.Identifier(namespace, table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(namespace)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id bigserial PRIMARY KEY, user_id text NOT NULL, image text,"
            " status text NOT NULL DEFAULT 'active', metadata jsonb DEFAULT '{{}}'::jsonb,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(items)
    )


def insert_sample_items(
    conn: psycopg.Connection,
    namespace: str,
    table: str,
    rows: Sequence[tuple[str, str | None, str, Any]],
) -> list[str]:
    """Insert (user_id, image, status, metadata) rows; returns their ids."""
    query = sql.SQL(
        "INSERT INTO {} (user_id, image, status, metadata) VALUES (%s, %s, %s, %s::jsonb)"
        " RETURNING id::text"
    ).format(sql.Identifier(namespace, table))
    ids: list[str] = []
    with conn.cursor() as cur:
        cur.executemany(
            query,
            [(u, img, st, None if md is None else json.dumps(md)) for u, img, st, md in rows],
            returning=True,
        )
        while True:
            ids.extend(r[0] for r in cur.fetchall())
            if not cur.nextset():
                break
    return ids


def table_is_empty(conn: psycopg.Connection, namespace: str, table: str) -> bool:
    query = sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(namespace, table))
    row = conn.execute(query).fetchone()
    return bool(row and row[0])


def titled_rows(
    conn: psycopg.Connection, namespace: str, table: str, user_id: str
) -> dict[str, str]:
    """The user's rows by ``metadata.title`` (title -> id), as the relevance set names them."""
    query = sql.SQL(
        "SELECT metadata->>'title', id::text FROM {} WHERE user_id = %s"
        " AND metadata->>'title' IS NOT NULL ORDER BY id"
    ).format(sql.Identifier(namespace, table))
    return {str(title): str(item_id) for title, item_id in conn.execute(query, (user_id,))}
