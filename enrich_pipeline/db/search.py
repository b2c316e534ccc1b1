"""Caption search over the embeddings table: pgvector where present, plain SQL on ``real[]``
elsewhere, with the same ranking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.settings import ConfigError


class SearchRows:
    """Ranking queries on ``enrich_embeddings`` joined with the items table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def has_pgvector(self) -> bool:
        return self.db.dialect.pgvector

    def rank(
        self,
        user_id: str,
        vector: Sequence[float],
        *,
        top_k: int,
        colors: Sequence[str] = (),
        tags: Sequence[str] = (),
        method: Method = "sql",
    ) -> list[tuple[str, float, dict[str, Any]]]:
        """The user's items ranked by cosine similarity of their caption embedding to ``vector``.

        ``colors`` and ``tags`` must all be present (tags match style or object tags). The
        similarity is AnalyticDB FastANN's cosine distance on ``real[]`` (``<=>``), pgvector's
        on ``embedding::vector``, or plain SQL over ``real[]``; ties are broken by item id, so
        every method ranks alike. A stored vector holding NaN or an infinity is skipped.
        """
        score = _SCORES[method]
        query = sql.SQL(
            "SELECT e.item_id, {score} AS score, i.metadata FROM {e} e"
            " JOIN {items} i ON i.id::text = e.item_id AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s AND e.user_id = %(user)s AND e.dimensions = %(dims)s"
            " AND NOT {non_finite}"
            " AND (%(colors)s::jsonb IS NULL OR i.metadata->'dominant_colors' @> %(colors)s::jsonb)"
            # Each tag in either list; jsonb's ? is 9.4's, unlike || (not on AnalyticDB 6.0).
            " AND (%(tags)s::text[] IS NULL OR NOT EXISTS (SELECT 1 FROM unnest(%(tags)s::text[])"
            " AS t(tag) WHERE NOT (COALESCE(i.metadata->'style_tags', '[]'::jsonb) ? t.tag"
            " OR COALESCE(i.metadata->'object_tags', '[]'::jsonb) ? t.tag)))"
            " ORDER BY score DESC NULLS LAST, e.item_id LIMIT %(k)s"
        ).format(
            score=score,
            e=self.db.t("enrich_embeddings"),
            items=self.db.items,
            non_finite=non_finite("e.embedding"),
        )
        params = {
            "q": list(vector),
            "qnorm": sum(v * v for v in vector) ** 0.5,
            "src": self.db.source_table,
            "user": user_id,
            "dims": len(vector),
            "colors": json.dumps(list(colors)) if colors else None,
            "tags": list(tags) if tags else None,
            "k": top_k,
        }
        with self.db.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [(r[0], float(r[1]) if r[1] is not None else 0.0, r[2]) for r in rows]

    def non_finite_vectors(
        self, user_id: str | None, *, after: str, limit: int
    ) -> list[tuple[str, str, str | None]]:
        """(item id, user id, caption) of stored vectors holding NaN or an infinity, of one user
        or all, by item id after ``after`` (a page at a time)."""
        query = sql.SQL(
            "SELECT e.item_id, e.user_id, i.metadata->>'caption' FROM {e} e"
            " LEFT JOIN {items} i ON i.id::text = e.item_id AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s AND (%(user)s::text IS NULL OR e.user_id = %(user)s)"
            " AND {non_finite} AND e.item_id > %(after)s ORDER BY e.item_id LIMIT %(k)s"
        ).format(
            e=self.db.t("enrich_embeddings"),
            items=self.db.items,
            non_finite=non_finite("e.embedding"),
        )
        params = {"src": self.db.source_table, "user": user_id, "after": after, "k": limit}
        with self.db.connection() as conn:
            return [(str(r[0]), str(r[1]), r[2]) for r in conn.execute(query, params)]

    def replace_non_finite(self, vectors: Sequence[tuple[str, Sequence[float]]], model: str) -> int:
        """Store these vectors over the non-finite ones of their items; one a run wrote
        meanwhile is kept. Returns how many were replaced."""
        query = sql.SQL(
            "UPDATE {e} SET embedding = %(v)s::real[], dimensions = %(dims)s, model = %(model)s,"
            " created_at = now() WHERE source_table = %(src)s AND item_id = %(id)s"
            " AND {non_finite}"
        ).format(e=self.db.t("enrich_embeddings"), non_finite=non_finite("embedding"))
        replaced = 0
        with self.db.connection() as conn:
            for item_id, vector in vectors:
                params = {
                    "v": list(vector),
                    "dims": len(vector),
                    "model": model,
                    "src": self.db.source_table,
                    "id": item_id,
                }
                replaced += conn.execute(query, params).rowcount
        return replaced

    def create_ann_index(self, dimensions: int) -> str:
        """AnalyticDB's FastANN index on the embeddings (an explicit command, never implicit).

        ``CREATE INDEX ... USING ann(embedding) WITH (dim=N, distancemeasure=cosine)``; cosine
        needs AnalyticDB 6.3.10.18 or later (AnalyticDB's vector-search documentation).
        """
        if not self.db.dialect.fastann:
            raise ConfigError(
                "this server has no FastANN index method (pg_am 'ann'): enable AnalyticDB's "
                "vector search engine optimization first; search works without the index"
            )
        name = f"enrich_embeddings_ann_{dimensions}"
        statement = sql.SQL(
            "CREATE INDEX {name} ON {e} USING ann (embedding)"
            " WITH (dim = {dim}, distancemeasure = cosine)"
        ).format(
            name=sql.Identifier(name),
            e=self.db.t("enrich_embeddings"),
            dim=sql.Literal(int(dimensions)),
        )
        with self.db.connection() as conn:
            conn.execute(statement)
        return name


Method = Literal["fastann", "pgvector", "sql"]


def non_finite(column: str) -> sql.Composable:
    """Whether the ``real[]`` in ``column`` holds NaN or an infinity: what an older version could
    store, which would rank first in plain SQL (NaN sorts above every number) and make pgvector
    refuse the whole query ("NaN not allowed in vector"). Array overlap compares elements with
    ``real``'s equality, under which NaN equals NaN (unlike IEEE), on every server."""
    return sql.SQL("({} && '{{NaN,Infinity,-Infinity}}'::real[])").format(
        sql.SQL(".").join(sql.Identifier(part) for part in column.split("."))
    )


_SCORES: dict[str, sql.Composable] = {
    "fastann": sql.SQL("1 - (e.embedding <=> %(q)s::real[])"),
    "pgvector": sql.SQL("1 - (e.embedding::vector <=> %(q)s::real[]::vector)"),
    "sql": sql.SQL(
        "(SELECT sum(a::float8 * b::float8) FROM unnest(e.embedding, %(q)s::real[])"
        " AS t(a, b)) / NULLIF(sqrt((SELECT sum(a::float8 * a::float8)"
        " FROM unnest(e.embedding) AS a)) * %(qnorm)s, 0)"
    ),
}
