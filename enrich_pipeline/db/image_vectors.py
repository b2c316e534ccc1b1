"""Image vectors (``enrich_image_embeddings``, migration 0009): which rows already have a current
one, and writing new ones.

A vector is current for a row when it was made by the run's model at the run's length from the
image value the row holds now (``image_digest`` = ``md5(image)``, as captions record it). Such a
row is never embedded again (paid once); nor is an image whose bytes (``content_sha256``) another
row of the same user already has a current vector for: that vector is copied. A vector whose
digest no longer matches its row's image is stale: search leaves it out, and the next run that
captions the changed image replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db
from enrich_pipeline.enrichment.records import PendingItem


@dataclass(frozen=True)
class ImageVectorRow:
    item_id: str
    user_id: str
    embedding: Sequence[float]
    image_digest: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class KnownImageVectors:
    """What a chunk need not pay for: rows with a current vector, and vectors by image bytes."""

    current: frozenset[tuple[str, str]]  # (user_id, item_id)
    by_content: dict[tuple[str, str], list[float]]  # (user_id, content_sha256) -> vector


class ImageVectorRows:
    """Statements on ``enrich_image_embeddings`` (part of ``ItemRows``)."""

    db: Database

    def _upsert_sql(self) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {e} (source_table, item_id, user_id, model, dimensions, embedding,"
            " image_digest, content_sha256) VALUES (%s, %s, %s, %s, %s, %s::real[], %s, %s)"
            " ON CONFLICT (source_table, item_id) DO UPDATE SET user_id = EXCLUDED.user_id,"
            " model = EXCLUDED.model, dimensions = EXCLUDED.dimensions,"
            " embedding = EXCLUDED.embedding, image_digest = EXCLUDED.image_digest,"
            " content_sha256 = EXCLUDED.content_sha256, created_at = now()"
        ).format(e=self.db.t("enrich_image_embeddings"))

    def insert_image_vectors(
        self, conn: psycopg.Connection, model: str, rows: Sequence[ImageVectorRow]
    ) -> None:
        """Store ``rows`` in ``conn``'s transaction (the chunk write's)."""
        if not rows:
            return
        values = [
            (
                self.db.source_table,
                r.item_id,
                r.user_id,
                model,
                len(r.embedding),
                list(r.embedding),
                r.image_digest,
                r.content_sha256,
            )
            for r in rows
        ]
        with conn.cursor() as cur:
            cur.executemany(self._upsert_sql(), values)

    @retry_db
    def write_image_vectors(self, model: str, rows: Sequence[ImageVectorRow]) -> int:
        """Store vectors outside a chunk write (``enrich-captions --embed-images``): only for
        rows whose image is still the one embedded. Returns how many were stored."""
        if not rows:
            return 0
        still = sql.SQL(
            "SELECT i.id::text FROM {items} i, unnest(%(ids)s::{idt}[], %(digests)s::text[])"
            " AS v(id, digest) WHERE {i_id} = v.id AND i.user_id = %(user)s"
            " AND md5(i.image) = v.digest"
        ).format(items=self.db.items, idt=self.db.id_cast, i_id=self.db.i_id)
        stored = 0
        with self.db.connection() as conn, conn.transaction():
            for user in sorted({r.user_id for r in rows}):
                mine = [r for r in rows if r.user_id == user]
                params = {
                    "user": user,
                    "ids": [r.item_id for r in mine],
                    "digests": [r.image_digest for r in mine],
                }
                current = {row[0] for row in conn.execute(still, params)}
                keep = [r for r in mine if r.item_id in current]
                self.insert_image_vectors(conn, model, keep)
                stored += len(keep)
        return stored

    @retry_db
    def known_image_vectors(
        self,
        model: str,
        dimensions: int,
        rows: Sequence[tuple[str, str, str, str | None]],
    ) -> KnownImageVectors:
        """For ``rows`` of ``(user_id, item_id, image_digest, content_sha256)``: those whose
        stored vector is current (this model and length, this image value), and the vectors of
        the same model and length already made for their image bytes (by any row of the user)."""
        if not rows:
            return KnownImageVectors(frozenset(), {})
        table = self.db.t("enrich_image_embeddings")
        current_sql = sql.SQL(
            "SELECT e.user_id, e.item_id FROM {e} e, unnest(%(users)s::text[], %(ids)s::text[],"
            " %(digests)s::text[]) AS v(user_id, item_id, digest)"
            " WHERE e.source_table = %(src)s AND e.user_id = v.user_id AND e.item_id = v.item_id"
            " AND e.image_digest = v.digest AND e.model = %(model)s AND e.dimensions = %(dims)s"
        ).format(e=table)
        content_sql = sql.SQL(
            "SELECT DISTINCT ON (e.user_id, e.content_sha256) e.user_id, e.content_sha256,"
            " e.embedding FROM {e} e, unnest(%(users)s::text[], %(shas)s::text[])"
            " AS v(user_id, sha) WHERE e.source_table = %(src)s AND e.user_id = v.user_id"
            " AND e.content_sha256 = v.sha AND e.model = %(model)s AND e.dimensions = %(dims)s"
            " ORDER BY e.user_id, e.content_sha256, e.created_at DESC"
        ).format(e=table)
        base = {"src": self.db.source_table, "model": model, "dims": dimensions}
        with self.db.connection() as conn:
            current = conn.execute(
                current_sql,
                {
                    **base,
                    "users": [r[0] for r in rows],
                    "ids": [r[1] for r in rows],
                    "digests": [r[2] for r in rows],
                },
            ).fetchall()
            with_sha = [r for r in rows if r[3]]
            found = conn.execute(
                content_sql,
                {**base, "users": [r[0] for r in with_sha], "shas": [r[3] for r in with_sha]},
            ).fetchall()
        return KnownImageVectors(
            frozenset((u, i) for u, i in current),
            {(u, sha): list(vector) for u, sha, vector in found},
        )

    @retry_db
    def without_image_vector(
        self,
        user_id: str | None,
        model: str,
        dimensions: int,
        *,
        limit: int,
        after: str | None = None,
    ) -> list[PendingItem]:
        """Captioned active rows (of ``user_id``, or every user) with no current vector of
        this model and length, in id order after ``after``: what ``--embed-images`` fills in."""
        query = sql.SQL(
            "SELECT i.id::text, i.user_id, i.image, i.metadata FROM {items} i"
            " WHERE i.status = 'active' AND i.image IS NOT NULL"
            " AND (%(user)s::text IS NULL OR i.user_id = %(user)s)"
            " AND (%(after)s::text IS NULL OR i.id > %(after)s::{idt})"
            " AND jsonb_typeof(i.metadata) = 'object'"
            " AND COALESCE(i.metadata->>'caption', '') <> ''"
            " AND NOT EXISTS (SELECT 1 FROM {e} e WHERE e.source_table = %(src)s"
            " AND e.item_id = i.id::text AND e.model = %(model)s AND e.dimensions = %(dims)s"
            " AND e.image_digest = md5(i.image))"
            " ORDER BY i.id LIMIT %(limit)s"
        ).format(items=self.db.items, idt=self.db.id_cast, e=self.db.t("enrich_image_embeddings"))
        params = {
            "user": user_id,
            "after": after,
            "src": self.db.source_table,
            "model": model,
            "dims": dimensions,
            "limit": limit,
        }
        with self.db.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [PendingItem(r[0], r[1], r[2], r[3]) for r in rows]
