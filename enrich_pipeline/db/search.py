"""Caption search over the embeddings table: pgvector where present, plain SQL on ``real[]``
elsewhere, with the same ranking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psycopg import sql

from enrich_pipeline.db.database import Database


class SearchRows:
    """Ranking queries on ``enrich_embeddings`` joined with the items table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def has_pgvector(self) -> bool:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')"
            )
            return bool(row.fetchone()[0])  # type: ignore[index]

    def rank(
        self,
        user_id: str,
        vector: Sequence[float],
        *,
        top_k: int,
        colors: Sequence[str] = (),
        tags: Sequence[str] = (),
        use_pgvector: bool = False,
    ) -> list[tuple[str, float, dict[str, Any]]]:
        """The user's items ranked by cosine similarity of their caption embedding to ``vector``.

        ``colors`` and ``tags`` must all be present (tags match style or object tags). With
        pgvector the ranking is done by its cosine operator on ``embedding::vector``; without it
        by plain SQL over ``real[]``; ties are broken by item id, so both agree.
        """
        if use_pgvector:
            score = sql.SQL("1 - (e.embedding::vector <=> %(q)s::real[]::vector)")
        else:
            score = sql.SQL(
                "(SELECT sum(a::float8 * b::float8) FROM unnest(e.embedding, %(q)s::real[])"
                " AS t(a, b)) / NULLIF(sqrt((SELECT sum(a::float8 * a::float8)"
                " FROM unnest(e.embedding) AS a)) * %(qnorm)s, 0)"
            )
        query = sql.SQL(
            "SELECT e.item_id, {score} AS score, i.metadata FROM {e} e"
            " JOIN {items} i ON i.id::text = e.item_id AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s AND e.user_id = %(user)s AND e.dimensions = %(dims)s"
            " AND (%(colors)s::jsonb IS NULL OR i.metadata->'dominant_colors' @> %(colors)s::jsonb)"
            " AND (%(tags)s::jsonb IS NULL OR (COALESCE(i.metadata->'style_tags', '[]'::jsonb)"
            " || COALESCE(i.metadata->'object_tags', '[]'::jsonb)) @> %(tags)s::jsonb)"
            " ORDER BY score DESC NULLS LAST, e.item_id LIMIT %(k)s"
        ).format(score=score, e=self.db.t("enrich_embeddings"), items=self.db.items)
        params = {
            "q": list(vector),
            "qnorm": sum(v * v for v in vector) ** 0.5,
            "src": self.db.source_table,
            "user": user_id,
            "dims": len(vector),
            "colors": json.dumps(list(colors)) if colors else None,
            "tags": json.dumps(list(tags)) if tags else None,
            "k": top_k,
        }
        with self.db.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [(r[0], float(r[1]) if r[1] is not None else 0.0, r[2]) for r in rows]
