"""Caption search over the embeddings table: pgvector where present, plain SQL on ``real[]``
elsewhere, with the same ranking."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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
        model: str,
        skip_caption_model: str | None = None,
    ) -> list[tuple[str, float, dict[str, Any]]]:
        """The user's items ranked by cosine similarity of their caption embedding to ``vector``.

        Only vectors made by ``model`` with as many dimensions as ``vector`` are compared: two
        models' vectors live in different spaces, and a cosine between them means nothing.
        Rows whose caption ``skip_caption_model`` made are left out whatever their vector's
        label (the offline captions, whose vectors earlier versions labelled with the real
        embedding model). ``colors`` and ``tags`` must all be present (tags match style or
        object tags). The similarity is AnalyticDB FastANN's cosine distance on ``real[]``
        (``<=>``), pgvector's on ``embedding::vector``, or plain SQL over ``real[]``; ties are
        broken by item id, so every method ranks alike. A stored vector holding NaN or an
        infinity is skipped.
        """
        score = _SCORES[method]
        query = sql.SQL(
            "SELECT e.item_id, {score} AS score, i.metadata FROM {e} e"
            " JOIN {items} i ON i.id::text = e.item_id AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s AND e.user_id = %(user)s AND e.dimensions = %(dims)s"
            " AND e.model = %(model)s AND NOT {non_finite}"
            " AND (%(skip)s::text IS NULL"
            " OR COALESCE(i.metadata->>'caption_model', '') <> %(skip)s::text)"
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
            "model": model,
            "skip": skip_caption_model,
            "colors": json.dumps(list(colors)) if colors else None,
            "tags": list(tags) if tags else None,
            "k": top_k,
        }
        with self.db.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [(r[0], float(r[1]) if r[1] is not None else 0.0, r[2]) for r in rows]

    def vector_groups(self, user_id: str, offline_caption_model: str) -> list[VectorGroup]:
        """The user's caption vectors counted by model, dimensions and whether the offline
        provider made their caption, as search would find them (joined with their items)."""
        query = sql.SQL(
            "SELECT e.model, e.dimensions,"
            " COALESCE(i.metadata->>'caption_model', '') = %(offline)s AS offline, count(*)"
            " FROM {e} e JOIN {items} i ON i.id::text = e.item_id AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s AND e.user_id = %(user)s"
            " GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3"
        ).format(e=self.db.t("enrich_embeddings"), items=self.db.items)
        params = {"src": self.db.source_table, "user": user_id, "offline": offline_caption_model}
        with self.db.connection() as conn:
            return [
                VectorGroup(str(m), int(d), bool(o), int(n))
                for m, d, o, n in conn.execute(query, params)
            ]

    def vectors_to_reembed(
        self,
        user_id: str | None,
        *,
        model: str,
        dimensions: int,
        offline_caption_model: str,
        after: str,
        limit: int,
    ) -> list[StaleVector]:
        """Vectors to embed again with ``model``, of one user or all, by item id after
        ``after`` (a page at a time): those holding NaN or an infinity (an older version's) and
        those another model, or another length, made. Vectors of offline captions are not
        among them: their caption needs a model first (``enrich-captions --recaption``)."""
        query = sql.SQL(
            "SELECT e.item_id, e.user_id, {non_finite}, i.metadata->>'caption',"
            " i.metadata->'caption_i18n' FROM {e} e"
            " LEFT JOIN {items} i ON i.id::text = e.item_id AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s AND (%(user)s::text IS NULL OR e.user_id = %(user)s)"
            " AND ({non_finite} OR e.model <> %(model)s OR e.dimensions <> %(dims)s)"
            " AND COALESCE(i.metadata->>'caption_model', '') <> %(offline)s"
            " AND e.item_id > %(after)s ORDER BY e.item_id LIMIT %(k)s"
        ).format(
            e=self.db.t("enrich_embeddings"),
            items=self.db.items,
            non_finite=non_finite("e.embedding"),
        )
        params = {
            "src": self.db.source_table,
            "user": user_id,
            "model": model,
            "dims": dimensions,
            "offline": offline_caption_model,
            "after": after,
            "k": limit,
        }
        with self.db.connection() as conn:
            return [
                StaleVector(str(r[0]), str(r[1]), bool(r[2]), r[3], _languages(r[4]))
                for r in conn.execute(query, params)
            ]

    def replace_vectors(
        self, vectors: Sequence[tuple[str, Sequence[float]]], model: str
    ) -> set[str]:
        """Store these vectors, made by ``model``, over their items' vectors that hold NaN or an
        infinity or that another model or length made; one a run wrote meanwhile with
        ``model`` is kept. Returns the items whose vector was replaced."""
        query = sql.SQL(
            "UPDATE {e} SET embedding = %(v)s::real[], dimensions = %(dims)s, model = %(model)s,"
            " created_at = now() WHERE source_table = %(src)s AND item_id = %(id)s"
            " AND ({non_finite} OR model <> %(model)s OR dimensions <> %(dims)s)"
        ).format(e=self.db.t("enrich_embeddings"), non_finite=non_finite("embedding"))
        replaced: set[str] = set()
        with self.db.connection() as conn:
            for item_id, vector in vectors:
                params = {
                    "v": list(vector),
                    "dims": len(vector),
                    "model": model,
                    "src": self.db.source_table,
                    "id": item_id,
                }
                if conn.execute(query, params).rowcount:
                    replaced.add(item_id)
        return replaced

    def label_offline_vectors(
        self, user_id: str | None, *, offline_caption_model: str, offline_embedding_model: str
    ) -> int:
        """Give the vectors of offline captions the offline embedding model's name, where an
        earlier version stored them under the real embedding model's: they are hashed words
        either way (the same hashing then and now for their English text). No call is made.
        Returns how many were relabelled."""
        # A correlated EXISTS rather than UPDATE ... FROM: the same plan on PostgreSQL 12/18
        # and Greenplum 6, and no row of the items table is locked.
        query = sql.SQL(
            "UPDATE {e} AS e SET model = %(embedding)s"
            " WHERE e.source_table = %(src)s AND (%(user)s::text IS NULL OR e.user_id = %(user)s)"
            " AND e.model <> %(embedding)s AND EXISTS (SELECT 1 FROM {items} i"
            " WHERE i.id::text = e.item_id AND i.user_id = e.user_id"
            " AND i.metadata->>'caption_model' = %(caption)s)"
        ).format(e=self.db.t("enrich_embeddings"), items=self.db.items)
        params = {
            "src": self.db.source_table,
            "user": user_id,
            "embedding": offline_embedding_model,
            "caption": offline_caption_model,
        }
        with self.db.connection() as conn:
            return conn.execute(query, params).rowcount

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


@dataclass(frozen=True)
class VectorGroup:
    """Some of a user's caption vectors: the model and length they were made with, and whether
    their caption is the offline provider's."""

    model: str
    dimensions: int
    offline_captions: bool
    count: int


@dataclass(frozen=True)
class StaleVector:
    """A stored vector to embed again, and what its item's caption is now."""

    item_id: str
    user_id: str
    non_finite: bool
    caption: str | None
    captions: dict[str, str]  # caption_i18n, when the row has it


def _languages(value: object) -> dict[str, str]:
    """``caption_i18n`` as stored, keeping only text values (it is a user's column too)."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str) and v.strip()}


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
