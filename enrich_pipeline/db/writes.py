"""Writing a chunk's results back in one transaction: captions merged into the items' metadata,
embeddings stored, the failure ledger updated, the chunk's claims released.

Writes are conditional in SQL so that a caption written by anyone while a run was in flight is
never overwritten, and every statement a user partition runs is scoped to that user.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db
from enrich_pipeline.db.image_vectors import ImageVectorRow, ImageVectorRows
from enrich_pipeline.db.leases import LeaseKeeper
from enrich_pipeline.db.pending import PIPELINES_CAPTION
from enrich_pipeline.enrichment.records import ItemError, image_digest
from enrich_pipeline.redaction import one_line, scrub_secrets

log = logging.getLogger(__name__)

# What one row's values can cause: a value a column or an encoding refuses, a constraint, a
# trigger's RAISE EXCEPTION. Statement and connection errors are not among them.
_ROW_DATA_ERRORS = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    psycopg.errors.RaiseException,
)


def _first_line(exc: BaseException) -> str:
    """The database's own words, first line, without a secret the settings know (a trigger
    may quote anything, a connection string included)."""
    text = str(exc).strip()
    return one_line(scrub_secrets(text.splitlines()[0] if text else type(exc).__name__))


# The row still holds what the write expects: no caption (a pending row), or the caption being
# replaced and the image digest recorded with it (a stale row: were either changed, someone
# else's newer caption is there, and it wins), that caption still the pipeline's (one a person
# edited before the row was read no longer matches its text digest: it is never replaced).
_STILL_THERE = sql.SQL(
    "(CASE WHEN v.replaces IS NULL THEN COALESCE(i.metadata->>'caption', '') = ''"
    " ELSE i.metadata->>'caption' = v.replaces"
    " AND (i.metadata->>'caption_image_digest') IS NOT DISTINCT FROM v.digest AND {own} END)"
).format(own=PIPELINES_CAPTION)

_KEPT_BACK = ItemError(
    "write_failed",
    "the database kept the row unchanged: a trigger or a rule on the items table skipped the "
    "update",
    True,
    "write",
)


@dataclass(frozen=True)
class SuccessRow:
    item_id: str
    image: str
    patch: dict[str, Any]
    embedding: Sequence[float] | None = None
    # Re-captioning (a stale row, or a model change): the caption this one replaces and the
    # image digest it recorded, as read when the row was claimed; the write only happens if
    # both are still there (someone else's newer caption wins).
    replaces: str | None = None
    replaces_digest: str | None = None
    # The image's vector (ENRICH_IMAGE_EMBEDDING_MODEL), written with the caption, for the
    # image value ``image`` (its md5 is the vector's ``image_digest``), and the bytes' sha256.
    image_vector: Sequence[float] | None = None
    content_sha256: str | None = None


def replacing(metadata: Any) -> dict[str, str | None]:
    """``SuccessRow``'s ``replaces`` and ``replaces_digest`` for a row whose metadata was read as
    ``metadata``: its caption, if it had one (a stale or re-captioned row), and its digest."""
    if not isinstance(metadata, dict) or not metadata.get("caption"):
        return {"replaces": None, "replaces_digest": None}
    digest = metadata.get("caption_image_digest")
    return {
        "replaces": str(metadata["caption"]),
        "replaces_digest": None if digest is None else str(digest),
    }


@dataclass(frozen=True)
class FailureRow:
    item_id: str
    error: ItemError


@dataclass(frozen=True)
class WriteOutcome:
    written: list[str]
    skipped: list[str]
    failed: list[str]
    # Rows whose caption the database refused (a trigger, a constraint): each row's own error,
    # recorded in the ledger with the chunk's other failures.
    refused: dict[str, ItemError] = field(default_factory=dict)


class ChunkWrites(ImageVectorRows):
    """The chunk write (part of ``ItemRows``); image vectors go in its transaction."""

    db: Database
    leases: LeaseKeeper

    # Keys a person may have filled in by hand: the merge keeps their non-empty values (as
    # the caption itself is kept) unless the pipeline is re-captioning its own earlier output.
    KEPT_KEYS = ("dominant_colors", "style_tags", "object_tags")
    # Keys that describe the caption being replaced and that a new caption may not carry: a
    # re-caption drops them (the patch sets them again where they apply).
    REPLACED_KEYS = ("caption_stale", "caption_truncated", "caption_source")

    def _merge_sql(self) -> sql.Composed:
        """The conditional merge, in SQL every target has: no jsonb ``||`` or ``jsonb_set``
        (AnalyticDB 6.0 lacks them), only 9.4's ``jsonb_each`` and ``json_object_agg``, one
        level of correlation (Greenplum plans no skip-level correlated subqueries).

        Each key comes from the patch, except that an existing non-empty value of a kept key
        wins; every other existing key stays (but those of ``REPLACED_KEYS`` when a caption is
        replaced). Only rows of this user that are still active, still caption-less (or still
        carry the caption being replaced, with the image digest it recorded, unedited), still
        point at the captioned image, and whose metadata is an object (or null) are written.
        """
        return sql.SQL(
            "UPDATE {items} AS i SET metadata = ("
            " SELECT COALESCE(json_object_agg(m.key, m.value), '{{}}'::json)::jsonb FROM ("
            " SELECT DISTINCT ON (kv.key) kv.key, kv.value FROM ("
            " SELECT o.key, o.value, CASE WHEN v.replaces IS NULL AND o.key = ANY(%(kept)s)"
            " AND o.value NOT IN ('null'::jsonb, '\"\"'::jsonb, '[]'::jsonb, '{{}}'::jsonb)"
            " THEN 0 ELSE 2 END AS rank"
            " FROM jsonb_each(CASE WHEN jsonb_typeof(i.metadata) = 'object' THEN i.metadata"
            " ELSE '{{}}'::jsonb END) AS o"
            " WHERE v.replaces IS NULL OR o.key <> ALL(%(replaced_keys)s::text[])"
            " UNION ALL SELECT p.key, p.value, 1 FROM jsonb_each(v.patch::jsonb) AS p"
            " ) AS kv ORDER BY kv.key, kv.rank) AS m),"
            " updated_at = now()"
            " FROM unnest(%(ids)s::{idt}[], %(images)s::text[], %(patches)s::text[],"
            " %(replaces)s::text[], %(digests)s::text[])"
            " AS v(id, image, patch, replaces, digest)"
            " WHERE {i_id} = v.id AND i.user_id = %(user)s AND i.image = v.image"
            " AND i.status = 'active' AND {still}"
            " AND (i.metadata IS NULL OR jsonb_typeof(i.metadata) IN ('object', 'null'))"
            "{returning}"
        ).format(
            items=self.db.items,
            idt=self.db.id_cast,
            i_id=self.db.i_id,
            still=_STILL_THERE,
            returning=sql.SQL(" RETURNING i.id::text" if self.db.dialect.items_returning else ""),
        )

    def _written_sql(self) -> sql.Composed:
        """Rows the merge just wrote, read back where UPDATE ... RETURNING is not relied on (an
        append-optimized items table): they carry this chunk's caption and timestamp."""
        return sql.SQL(
            "SELECT i.id::text FROM {items} i, unnest(%(ids)s::{idt}[], %(captions)s::text[])"
            " AS v(id, caption) WHERE {i_id} = v.id AND i.user_id = %(user)s"
            " AND i.metadata->>'caption' = v.caption"
            " AND i.metadata->>'caption_generated_at' = %(generated_at)s"
        ).format(items=self.db.items, idt=self.db.id_cast, i_id=self.db.i_id)

    def _kept_back_sql(self) -> sql.Composed:
        """Rows the merge left alone although they still met its conditions: the database kept
        them unchanged itself (a BEFORE trigger returning NULL, a rule). Read in the merge's
        transaction, so a caption someone else wrote meanwhile is not mistaken for it."""
        return sql.SQL(
            "SELECT i.id::text FROM {items} i, unnest(%(ids)s::{idt}[], %(images)s::text[],"
            " %(replaces)s::text[], %(digests)s::text[]) AS v(id, image, replaces, digest)"
            " WHERE {i_id} = v.id AND i.user_id = %(user)s AND i.image = v.image"
            " AND i.status = 'active' AND {still}"
            " AND (i.metadata IS NULL OR jsonb_typeof(i.metadata) IN ('object', 'null'))"
        ).format(items=self.db.items, idt=self.db.id_cast, i_id=self.db.i_id, still=_STILL_THERE)

    def write_chunk(
        self,
        user_id: str,
        *,
        worker: str,
        successes: Sequence[SuccessRow],
        failures: Sequence[FailureRow],
        embedding_model: str | None = None,
        run_id: str | None = None,
        image_embedding_model: str | None = None,
    ) -> WriteOutcome:
        """Write one chunk in one transaction: captions, embeddings (of the captions and, with
        ``image_embedding_model``, of the images), ledger, claims released.

        A row whose write raises for its own data (a value the column refuses, a trigger that
        raises) is that row's error: the chunk is then written row by row, and the rows that
        still fail are recorded with ``write_failed`` while the others are written. An error of
        the statement or the connection stays the chunk's (it is retried, or stops the run).
        """
        try:
            return self._write(
                user_id, worker, successes, failures, embedding_model, run_id, image_embedding_model
            )
        except _ROW_DATA_ERRORS as exc:
            if not successes:
                raise
            log.warning("chunk write refused (%s); writing its rows one by one", _first_line(exc))
        written: list[str] = []
        skipped: list[str] = []
        refused: list[FailureRow] = []
        for row in successes:
            try:
                one = self._write(
                    user_id, worker, [row], [], embedding_model, run_id, image_embedding_model
                )
            except _ROW_DATA_ERRORS as exc:
                refused.append(
                    FailureRow(
                        row.item_id,
                        ItemError(
                            "write_failed",
                            f"the database refused the write: {_first_line(exc)}",
                            True,
                            "write",
                        ),
                    )
                )
                continue
            written += one.written
            skipped += one.skipped
            refused += [FailureRow(i, e) for i, e in one.refused.items()]
        rest = self._write(user_id, worker, [], [*failures, *refused], embedding_model, run_id)
        return WriteOutcome(
            written=written,
            skipped=[i for i in skipped if i not in rest.failed],
            failed=rest.failed,
            refused={f.item_id: f.error for f in refused},
        )

    @retry_db
    def _write(
        self,
        user_id: str,
        worker: str,
        successes: Sequence[SuccessRow],
        failures: Sequence[FailureRow],
        embedding_model: str | None,
        run_id: str | None,
        image_embedding_model: str | None = None,
    ) -> WriteOutcome:
        embed_sql = sql.SQL(
            "INSERT INTO {e} (source_table, item_id, user_id, model, dimensions, embedding)"
            " VALUES (%s, %s, %s, %s, %s, %s::real[])"
            " ON CONFLICT (source_table, item_id) DO UPDATE SET user_id = EXCLUDED.user_id,"
            " model = EXCLUDED.model, dimensions = EXCLUDED.dimensions,"
            " embedding = EXCLUDED.embedding, created_at = now()"
        ).format(e=self.db.t("enrich_embeddings"))
        cleared_sql = sql.SQL(
            "DELETE FROM {f} WHERE source_table = %(src)s AND user_id = %(user)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(f=self.db.t("enrich_failures"))
        ledger_sql = sql.SQL(
            "INSERT INTO {f} AS f (source_table, item_id, user_id, attempts, permanent,"
            " error_code, last_error, run_id)"
            " SELECT %(src)s, x.id, %(user)s, 1, x.permanent, x.code, x.message, %(run)s"
            " FROM unnest(%(ids)s::text[], %(permanent)s::boolean[], %(codes)s::text[],"
            " %(messages)s::text[]) AS x(id, permanent, code, message)"
            " ON CONFLICT (source_table, item_id) DO UPDATE SET attempts = f.attempts + 1,"
            " permanent = EXCLUDED.permanent, error_code = EXCLUDED.error_code,"
            " last_error = EXCLUDED.last_error, run_id = EXCLUDED.run_id,"
            " user_id = EXCLUDED.user_id, last_failed_at = now()"
        ).format(f=self.db.t("enrich_failures"))
        release_sql = sql.SQL(
            "DELETE FROM {c} WHERE source_table = %(src)s AND worker = %(worker)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(c=self.db.t("enrich_claims"))

        base = {"src": self.db.source_table, "user": user_id, "worker": worker, "run": run_id}
        with self.db.connection() as conn, conn.transaction():
            written: list[str] = []
            if successes:
                params = {
                    **base,
                    "kept": list(self.KEPT_KEYS),
                    "ids": [s.item_id for s in successes],
                    "images": [s.image for s in successes],
                    "patches": [json.dumps(s.patch, ensure_ascii=False) for s in successes],
                    "replaces": [s.replaces for s in successes],
                    "digests": [s.replaces_digest for s in successes],
                    "replaced_keys": list(self.REPLACED_KEYS),
                }
                cur = conn.execute(self._merge_sql(), params)
                if self.db.dialect.items_returning:
                    written = [r[0] for r in cur]
                else:
                    params["captions"] = [s.patch.get("caption") for s in successes]
                    params["generated_at"] = successes[0].patch.get("caption_generated_at")
                    written = [r[0] for r in conn.execute(self._written_sql(), params)]
            done = set(written)
            kept_back: list[FailureRow] = []
            if len(done) < len(successes):
                left = [s for s in successes if s.item_id not in done]
                kept = conn.execute(
                    self._kept_back_sql(),
                    {
                        **base,
                        "ids": [s.item_id for s in left],
                        "images": [s.image for s in left],
                        "replaces": [s.replaces for s in left],
                        "digests": [s.replaces_digest for s in left],
                    },
                )
                kept_back = [FailureRow(r[0], _KEPT_BACK) for r in kept]
                failures = [*failures, *kept_back]
            vectors = [
                (
                    self.db.source_table,
                    s.item_id,
                    user_id,
                    embedding_model,
                    len(s.embedding),
                    list(s.embedding),
                )
                for s in successes
                if s.item_id in done and s.embedding is not None
            ]
            if vectors:
                with conn.cursor() as cur:
                    cur.executemany(embed_sql, vectors)
            if image_embedding_model is not None:
                image_vectors = [
                    ImageVectorRow(
                        s.item_id,
                        user_id,
                        s.image_vector,
                        image_digest(s.image),
                        s.content_sha256,
                    )
                    for s in successes
                    if s.item_id in done and s.image_vector is not None
                ]
                self.insert_image_vectors(conn, image_embedding_model, image_vectors)
            if written:
                conn.execute(cleared_sql, {**base, "ids": written})
            if failures:
                conn.execute(
                    ledger_sql,
                    {
                        **base,
                        "ids": [f.item_id for f in failures],
                        "permanent": [f.error.permanent for f in failures],
                        "codes": [f.error.code for f in failures],
                        # Errors are kept short: the ledger is for people, not for dumps. A
                        # table is read by more people than a log: scrubbed once more here.
                        "messages": [scrub_secrets(f.error.message)[:2000] for f in failures],
                    },
                )
            every = [s.item_id for s in successes] + [f.item_id for f in failures]
            if every:
                conn.execute(release_sql, {**base, "ids": every})
        self.leases.drop(worker, every)
        refused = {f.item_id for f in kept_back}
        return WriteOutcome(
            written=written,
            skipped=[s.item_id for s in successes if s.item_id not in done | refused],
            failed=[f.item_id for f in failures],
            refused={f.item_id: f.error for f in kept_back},
        )
