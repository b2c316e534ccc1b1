"""Batch mode's state: one row per provider batch in ``enrich_batches``, what collecting needs
per item in ``enrich_batch_items``.

The rows of a batch are held in ``enrich_claims`` by its worker; a claim still held means "not
written back yet", which is what makes collecting idempotent (``ItemRows.write_chunk`` releases
the claims in the transaction that writes the rows).

state (ours):  submitting -> open -> collected
               submitting -> abandoned  (upload failed, or no batch was created after all)
               submitting -> rejected   (the API refused the batch: model or region)
               open       -> rejected   (the batch failed validation: model not supported)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db

SUBMITTING, OPEN, COLLECTED, ABANDONED, REJECTED = (
    "submitting",
    "open",
    "collected",
    "abandoned",
    "rejected",
)


@dataclass(frozen=True)
class BatchRecord:
    """One provider batch as the database knows it."""

    local_id: str
    user_id: str
    submission_id: str
    part: int
    worker: str
    model: str
    prompt_version: str
    base_url: str
    caption_embedding: bool
    lines: int
    bytes: int
    state: str
    batch_id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    status: str | None = None
    request_counts: dict[str, Any] | None = None
    error: str | None = None
    stats: dict[str, Any] | None = None
    created_at: datetime | None = None
    # What the lines asked for (``structured``): collecting reads and caches by it.
    answer_format: str = "text"
    languages: str = "en"
    # What the collected batch showed of its answer format (``formats.batch_verdict``).
    next_format: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any] | None) -> BatchRecord | None:
        if row is None:
            return None
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in row.items() if k in names})

    @property
    def ref(self) -> str:
        """The provider's batch id once known (what people see in the console), else ours."""
        return self.batch_id or self.local_id


@dataclass(frozen=True)
class BatchItem:
    """An item of a batch: the line whose answer captions it (rows of one part that share an
    image share one line) and what writing it back needs."""

    item_id: str
    custom_id: str
    image: str
    content_sha256: str
    dominant_colors: tuple[str, ...]
    # A stale row: the caption being replaced and the image digest recorded with it, as read
    # when the row was claimed (``writes.replacing``); None for a pending row.
    replaces: str | None = None
    replaces_digest: str | None = None


class BatchRows:
    """Statements on ``enrich_batches`` and ``enrich_batch_items`` (and the batch's claims)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    _BATCH_JSON = frozenset({"request_counts", "stats"})

    _BATCH_MUTABLE = frozenset(
        {
            "state",
            "batch_id",
            "input_file_id",
            "output_file_id",
            "error_file_id",
            "status",
            "request_counts",
            "error",
            "stats",
            "collector",
            "collector_expires_at",
            "polled_at",
            "finished_at",
            "next_format",
        }
    )

    def record(self, batch: dict[str, Any], items: Sequence[BatchItem]) -> None:
        """Record a batch part (state ``submitting``) and its items, in one transaction, before
        anything is sent: whatever happens next, the database knows what the rows wait for."""
        columns = (
            "local_id",
            "user_id",
            "submission_id",
            "part",
            "worker",
            "endpoint",
            "model",
            "prompt_version",
            "base_url",
            "caption_embedding",
            "lines",
            "bytes",
            "answer_format",
            "languages",
        )
        batch_sql = sql.SQL(
            "INSERT INTO {b} (source_table, state, {cols}) VALUES (%(src)s, 'submitting', {vals})"
        ).format(
            b=self.db.t("enrich_batches"),
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            vals=sql.SQL(", ").join(map(sql.Placeholder, columns)),
        )
        items_sql = sql.SQL(
            "INSERT INTO {bi} (local_id, item_id, custom_id, image, content_sha256,"
            " dominant_colors, replaces, replaces_digest) SELECT %(local_id)s, x.item_id,"
            " x.custom_id, x.image, x.sha, x.colors::jsonb, x.replaces, x.digest"
            " FROM unnest(%(ids)s::text[], %(cids)s::text[], %(images)s::text[],"
            " %(shas)s::text[], %(colors)s::text[], %(replaces)s::text[], %(digests)s::text[])"
            " AS x(item_id, custom_id, image, sha, colors, replaces, digest)"
        ).format(bi=self.db.t("enrich_batch_items"))
        with self.db.connection() as conn, conn.transaction():
            conn.execute(batch_sql, {"src": self.db.source_table, **{c: batch[c] for c in columns}})
            conn.execute(
                items_sql,
                {
                    "local_id": batch["local_id"],
                    "ids": [i.item_id for i in items],
                    "cids": [i.custom_id for i in items],
                    "images": [i.image for i in items],
                    "shas": [i.content_sha256 for i in items],
                    "colors": [json.dumps(list(i.dominant_colors)) for i in items],
                    "replaces": [i.replaces for i in items],
                    "digests": [i.replaces_digest for i in items],
                },
            )

    @retry_db
    def update(
        self, local_id: str, *, expect_state: str | None = None, **fields: Any
    ) -> BatchRecord | None:
        """Set some of a batch's columns; with ``expect_state``, only if it is in that state.

        Returns the updated row, or None when the batch is not there (or not in that state).
        """
        unknown = set(fields) - self._BATCH_MUTABLE
        if unknown:
            raise ValueError(f"not a mutable batch column: {sorted(unknown)}")
        sets = [sql.SQL("updated_at = now()")]
        params: dict[str, Any] = {
            "src": self.db.source_table,
            "local_id": local_id,
            "expect": expect_state,
        }
        for name, value in fields.items():
            key = f"v_{name}"
            if name in self._BATCH_JSON:
                params[key] = None if value is None else json.dumps(value)
                sets.append(
                    sql.SQL("{} = {}::jsonb").format(sql.Identifier(name), sql.Placeholder(key))
                )
            else:
                params[key] = value
                sets.append(sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(key)))
        query = sql.SQL(
            "UPDATE {b} SET {sets} WHERE source_table = %(src)s AND local_id = %(local_id)s"
            " AND (%(expect)s::text IS NULL OR state = %(expect)s) RETURNING *"
        ).format(b=self.db.t("enrich_batches"), sets=sql.SQL(", ").join(sets))
        with self.db.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return BatchRecord.from_row(cur.execute(query, params).fetchone())

    def get(self, local_id: str) -> BatchRecord | None:
        query = sql.SQL(
            "SELECT * FROM {b} WHERE source_table = %(src)s AND local_id = %(local_id)s"
        ).format(b=self.db.t("enrich_batches"))
        with self.db.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            row = cur.execute(query, {"src": self.db.source_table, "local_id": local_id})
            return BatchRecord.from_row(row.fetchone())

    def find(self, ref: str) -> BatchRecord | None:
        """A batch by our local id or by the provider's batch id."""
        query = sql.SQL(
            "SELECT * FROM {b} WHERE source_table = %(src)s"
            " AND (local_id = %(ref)s OR batch_id = %(ref)s) ORDER BY created_at LIMIT 1"
        ).format(b=self.db.t("enrich_batches"))
        with self.db.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            row = cur.execute(query, {"src": self.db.source_table, "ref": ref})
            return BatchRecord.from_row(row.fetchone())

    def list(
        self,
        *,
        states: Sequence[str] | None = None,
        user_id: str | None = None,
        idle_seconds: float | None = None,
    ) -> list[BatchRecord]:
        """Batches of this items table, oldest first; ``idle_seconds``: not updated since."""
        query = sql.SQL(
            "SELECT * FROM {b} WHERE source_table = %(src)s"
            " AND (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))"
            " AND (%(user)s::text IS NULL OR user_id = %(user)s)"
            " AND (%(idle)s::float8 IS NULL"
            " OR updated_at <= now() - make_interval(secs => %(idle)s::float8))"
            " ORDER BY created_at, submission_id, part"
        ).format(b=self.db.t("enrich_batches"))
        params = {
            "src": self.db.source_table,
            "states": list(states) if states is not None else None,
            "user": user_id,
            "idle": idle_seconds,
        }
        with self.db.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return [BatchRecord.from_row(r) for r in cur.execute(query, params).fetchall()]

    def items(self, local_id: str) -> list[BatchItem]:
        query = sql.SQL(
            "SELECT bi.item_id, bi.custom_id, bi.image, bi.content_sha256, bi.dominant_colors,"
            " bi.replaces, bi.replaces_digest FROM {bi} bi JOIN {b} b ON b.local_id = bi.local_id"
            " WHERE b.source_table = %(src)s AND bi.local_id = %(local_id)s ORDER BY bi.item_id"
        ).format(bi=self.db.t("enrich_batch_items"), b=self.db.t("enrich_batches"))
        with self.db.connection() as conn:
            rows = conn.execute(query, {"src": self.db.source_table, "local_id": local_id})
            return [BatchItem(r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6]) for r in rows]

    @retry_db
    def format_verdicts(self, model: str) -> list[tuple[str, str, str]]:
        """What the collected batches of ``model`` showed of their answer format, oldest first:
        (the format asked, the format the next submission should use, the batch's ref).

        Of every table in the namespace: whether a model takes a response_format is the
        model's, not the table's."""
        query = sql.SQL(
            "SELECT answer_format, next_format, COALESCE(batch_id, local_id) FROM {b}"
            " WHERE model = %(model)s AND state = 'collected' AND next_format IS NOT NULL"
            " ORDER BY finished_at, created_at, local_id"
        ).format(b=self.db.t("enrich_batches"))
        with self.db.connection() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(query, {"model": model})]

    def held_ids(self, local_id: str) -> list[str]:
        """Items of the batch whose claim its worker still holds: those not written back yet."""
        query = sql.SQL(
            "SELECT bi.item_id FROM {bi} bi JOIN {b} b ON b.local_id = bi.local_id"
            " JOIN {c} c ON c.source_table = b.source_table AND c.item_id = bi.item_id"
            " AND c.worker = b.worker AND c.user_id = b.user_id"
            " WHERE b.source_table = %(src)s AND bi.local_id = %(local_id)s ORDER BY bi.item_id"
        ).format(
            bi=self.db.t("enrich_batch_items"),
            b=self.db.t("enrich_batches"),
            c=self.db.t("enrich_claims"),
        )
        with self.db.connection() as conn:
            rows = conn.execute(query, {"src": self.db.source_table, "local_id": local_id})
            return [r[0] for r in rows]

    def renew_claims(self, user_id: str, worker: str, lease_seconds: int) -> int:
        """Extend every claim ``worker`` holds for the user: rows stay held while the provider
        works on them, and come back on their own if nobody polls any more."""
        query = sql.SQL(
            "UPDATE {c} SET expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE source_table = %(src)s AND user_id = %(user)s AND worker = %(worker)s"
        ).format(c=self.db.t("enrich_claims"))
        params = {
            "src": self.db.source_table,
            "user": user_id,
            "worker": worker,
            "lease": lease_seconds,
        }
        with self.db.connection() as conn:
            return conn.execute(query, params).rowcount

    def take_collector(self, local_id: str, collector: str, lease_seconds: int) -> bool:
        """Become (or stay) the one collector of an open batch, for ``lease_seconds``."""
        query = sql.SQL(
            "UPDATE {b} SET collector = %(who)s, updated_at = now(),"
            " collector_expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE source_table = %(src)s AND local_id = %(local_id)s AND state = 'open'"
            " AND (collector IS NULL OR collector = %(who)s OR collector_expires_at <= now())"
            " RETURNING local_id"
        ).format(b=self.db.t("enrich_batches"))
        params = {
            "src": self.db.source_table,
            "local_id": local_id,
            "who": collector,
            "lease": lease_seconds,
        }
        with self.db.connection() as conn:
            return conn.execute(query, params).fetchone() is not None
