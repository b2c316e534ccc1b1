"""The search statements: ranking both vector tables (``search_rank``), their indexes
(``search_index``), and keeping the caption vectors comparable with the queries (re-embedding
what another model or an older version stored)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.search_index import VectorIndexes
from enrich_pipeline.db.search_rank import VectorRanking, non_finite


class SearchRows:
    """Search's statements on ``enrich_embeddings`` and ``enrich_image_embeddings``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.ranking = VectorRanking(db)
        self.indexes = VectorIndexes(db)

    def has_pgvector(self) -> bool:
        return self.db.dialect.pgvector

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
