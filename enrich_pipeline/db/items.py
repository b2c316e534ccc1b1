"""The items table, the claims on its rows and the failure ledger: what a run reads, claims,
writes back and records.

Writes are conditional in SQL so that a caption written by anyone while a run was in flight is
never overwritten, and every statement a user partition runs is scoped to that user.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db
from enrich_pipeline.db.leases import LeaseKeeper
from enrich_pipeline.enrichment.records import ItemError, PendingItem

log = logging.getLogger(__name__)

# What one row's values can cause: a value a column or an encoding refuses, a constraint, a
# trigger's RAISE EXCEPTION. Statement and connection errors are not among them.
_ROW_DATA_ERRORS = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    psycopg.errors.RaiseException,
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_INDEX_LOCK = 0x656E7270  # "enrp": one builder of the pending-rows index at a time


@dataclass(frozen=True)
class SuccessRow:
    item_id: str
    image: str
    patch: dict[str, Any]
    embedding: Sequence[float] | None = None
    # Re-captioning: the caption this one replaces; the write only happens if it is still there.
    replaces: str | None = None


@dataclass(frozen=True)
class FailureRow:
    item_id: str
    error: ItemError


@dataclass(frozen=True)
class WriteOutcome:
    written: list[str]
    skipped: list[str]
    failed: list[str]


@dataclass(frozen=True)
class LedgerEntry:
    item_id: str
    attempts: int
    permanent: bool
    error_code: str
    last_error: str


class ItemRows:
    """Statements on the items table, ``enrich_claims`` and ``enrich_failures``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.leases = LeaseKeeper(self._renew_claims)

    def close(self) -> None:
        self.leases.close()

    @property
    def pending_index(self) -> sql.Identifier:
        return sql.Identifier(
            self.db.namespace, f"{self.db.settings.table}_enrich_pending_idx"[:63]
        )

    def has_pending_index(self, conn: psycopg.Connection) -> bool:
        """The index exists and is valid (a cancelled CONCURRENTLY build leaves an invalid one)."""
        row = conn.execute(
            "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = to_regclass(%s)",
            (self.pending_index.as_string(conn),),
        ).fetchone()
        return bool(row and row[0])

    def ensure_pending_index(self, *, wait_seconds: float = 30.0) -> bool:
        """The one change the pipeline makes to the items table: a partial index on pending rows.

        It makes the sensor's tick and the pending query cheap on large tables. Built
        concurrently where the server can (not on Greenplum/AnalyticDB, where it falls back to
        a plain CREATE INDEX), by one process at a time: concurrent builds of the same index
        wait on each other's snapshots and deadlock. Returns whether the index is there.
        """
        name = sql.Identifier(f"{self.db.settings.table}_enrich_pending_idx"[:63])
        body = sql.SQL(
            "{name} ON {items} (user_id)"
            " WHERE status = 'active' AND COALESCE(metadata->>'caption', '') = ''"
            " AND image IS NOT NULL AND image <> ''"
        ).format(name=name, items=self.db.items)
        with self.db.connection() as conn:
            conn.autocommit = True
            if self.has_pending_index(conn):
                return True
            # A lock taken with try-and-sleep, not a blocking pg_advisory_lock: a session
            # waiting inside a statement holds a snapshot that CONCURRENTLY waits for.
            deadline = time.monotonic() + wait_seconds
            while not conn.execute("SELECT pg_try_advisory_lock(%s)", (_INDEX_LOCK,)).fetchone()[0]:  # type: ignore[index]
                if time.monotonic() > deadline:
                    log.warning("pending-rows index: another process is building it")
                    return False
                time.sleep(0.25)
            try:
                if self.has_pending_index(conn):
                    return True
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(self.pending_index))
                # Building waits for open transactions on the table; on a busy table the run
                # goes on without the index (it only makes queries faster) and a later run
                # builds it.
                conn.execute("SET lock_timeout = '5s'")
                concurrently = self.db.dialect.concurrent_index
                try:
                    conn.execute(
                        sql.SQL("CREATE INDEX CONCURRENTLY " if concurrently else "CREATE INDEX ")
                        + body
                    )
                except psycopg.errors.FeatureNotSupported:
                    conn.execute(sql.SQL("CREATE INDEX ") + body)
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                log.warning("pending-rows index not built now (%s); queries work without it", exc)
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(self.pending_index))
                return False
            finally:
                conn.execute("RESET lock_timeout")
                conn.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK,))
                conn.autocommit = False
        return True

    _PENDING = sql.SQL(
        "i.status = 'active' AND COALESCE(i.metadata->>'caption', '') = ''"
        " AND i.image IS NOT NULL AND i.image <> ''"
    )

    _RECAPTION = sql.SQL(
        "i.status = 'active' AND i.image IS NOT NULL AND i.image <> ''"
        " AND COALESCE(i.metadata->>'caption', '') <> '' AND i.metadata ? 'caption_model'"
        " AND (i.metadata->>'caption_model' IS DISTINCT FROM %(rc_model)s"
        " OR i.metadata->>'caption_prompt_version' IS DISTINCT FROM %(rc_prompt)s)"
    )

    @property
    def _pending(self) -> sql.Composable:
        """Pending rows the pipeline can address: without a unique index on id, rows with a
        NULL id or an id shared with another row are left out (preflight reports them)."""
        if self.db.dialect.ids_unique:
            return self._PENDING
        return self._PENDING + self._addressable()

    def _addressable(self) -> sql.Composable:
        return sql.SQL(
            " AND i.id IS NOT NULL AND (SELECT count(*) FROM {items} d WHERE d.id = i.id) = 1"
        ).format(items=self.db.items)

    def _selection(self, recaption: tuple[str, str] | None) -> tuple[sql.Composable, dict]:
        """The rows a run works on: pending ones, or those due for re-captioning."""
        if recaption is None:
            return self._pending, {}
        rows = self._RECAPTION
        if not self.db.dialect.ids_unique:
            rows = rows + self._addressable()
        return rows, {"rc_model": recaption[0], "rc_prompt": recaption[1]}

    def _unclaimed(self) -> sql.Composable:
        """Not held by a live claim (a running run, an open batch)."""
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {claims} c WHERE c.source_table = %(src)s"
            " AND c.item_id = i.id::text AND c.expires_at > now())"
        ).format(claims=self.db.t("enrich_claims"))

    def _not_given_up(self) -> sql.Composable:
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {failures} f WHERE f.source_table = %(src)s"
            " AND f.item_id = i.id::text AND (f.permanent OR f.attempts >= %(max_attempts)s))"
        ).format(failures=self.db.t("enrich_failures"))

    @retry_db
    def users_with_pending(self, max_attempts: int) -> list[tuple[str, int]]:
        query = sql.SQL(
            "SELECT i.user_id, count(*) FROM {items} i WHERE {pending} AND i.user_id IS NOT NULL"
            " AND {alive} GROUP BY i.user_id ORDER BY i.user_id"
        ).format(items=self.db.items, pending=self._pending, alive=self._not_given_up())
        with self.db.connection() as conn:
            rows = conn.execute(query, {"src": self.db.source_table, "max_attempts": max_attempts})
            return [(str(u), int(n)) for u, n in rows]

    def pending_fingerprints(self, max_attempts: int) -> dict[str, str]:
        """Per user with pending rows, a short value that changes when their pending set does.

        New rows (count, newest ``updated_at``) and new failed attempts change it; a run that
        leaves the set as it was does not, so the sensor does not loop on rows it cannot do.
        """
        rows_sql = sql.SQL(
            "SELECT i.user_id, count(*), max(i.updated_at) FROM {items} i WHERE {pending}"
            " AND i.user_id IS NOT NULL AND {alive} AND {unclaimed} GROUP BY i.user_id"
        ).format(
            items=self.db.items,
            pending=self._pending,
            alive=self._not_given_up(),
            unclaimed=self._unclaimed(),
        )
        attempts_sql = sql.SQL(
            "SELECT user_id, sum(attempts) FROM {f} WHERE source_table = %(src)s"
            " AND NOT permanent AND attempts < %(max_attempts)s GROUP BY user_id"
        ).format(f=self.db.t("enrich_failures"))
        params = {"src": self.db.source_table, "max_attempts": max_attempts}
        with self.db.connection() as conn:
            rows = conn.execute(rows_sql, params).fetchall()
            attempts = dict(conn.execute(attempts_sql, params).fetchall())
        return {
            str(user): f"{count}-{newest.timestamp() if newest else 0:.6f}-{attempts.get(user, 0)}"
            for user, count, newest in rows
        }

    @retry_db
    def pending_ids(
        self,
        user_id: str,
        *,
        limit: int | None,
        max_attempts: int,
        recaption: tuple[str, str] | None = None,
    ) -> list[str]:
        """Ids of the user's pending rows not claimed by a live run, oldest id first.

        With ``recaption=(model, prompt_version)``: the user's rows captioned by the pipeline
        with another model or prompt version instead.
        """
        selection, extra = self._selection(recaption)
        query = sql.SQL(
            "SELECT i.id::text FROM {items} i WHERE i.user_id = %(user)s AND {pending} AND {alive}"
            " AND {unclaimed} ORDER BY i.id LIMIT %(limit)s"
        ).format(
            items=self.db.items,
            pending=selection,
            alive=self._not_given_up(),
            unclaimed=self._unclaimed(),
        )
        params = {
            "user": user_id,
            "src": self.db.source_table,
            "max_attempts": max_attempts,
            "limit": limit,
            **extra,
        }
        with self.db.connection() as conn:
            return [r[0] for r in conn.execute(query, params)]

    @retry_db
    def count_pending(
        self, user_id: str, *, max_attempts: int, recaption: tuple[str, str] | None = None
    ) -> int:
        selection, extra = self._selection(recaption)
        query = sql.SQL(
            "SELECT count(*) FROM {items} i WHERE i.user_id = %(user)s AND {pending} AND {alive}"
        ).format(items=self.db.items, pending=selection, alive=self._not_given_up())
        params = {
            "user": user_id,
            "src": self.db.source_table,
            "max_attempts": max_attempts,
            **extra,
        }
        with self.db.connection() as conn:
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row else 0

    def check_partition(self, user_id: str, dimensions: int) -> dict[str, int]:
        """Figures for the asset checks of one user's partition."""
        return self.check_partitions([user_id], dimensions)[user_id]

    def check_partitions(self, users: Iterable[str], dimensions: int) -> dict[str, dict[str, int]]:
        """Figures for the asset checks of many users' partitions (a shared run's) in three
        grouped statements: pending rows neither claimed nor in the failure ledger, embeddings,
        those of other dimensions or with non-finite values, failures recorded."""
        wanted = sorted(set(users))
        if not wanted:
            return {}
        pending_sql = sql.SQL(
            "SELECT i.user_id, count(*) FROM {items} i"
            " WHERE i.user_id = ANY(%(users)s::text[]) AND {pending}"
            " AND NOT EXISTS (SELECT 1 FROM {f} f WHERE f.source_table = %(src)s"
            " AND f.item_id = i.id::text) AND {unclaimed} GROUP BY i.user_id"
        ).format(
            items=self.db.items,
            pending=self._pending,
            f=self.db.t("enrich_failures"),
            unclaimed=self._unclaimed(),
        )
        # real[] holds NaN and infinities, which rank first in plain SQL and break pgvector.
        embed_sql = sql.SQL(
            "SELECT user_id, count(*), count(*) FILTER (WHERE array_length(embedding, 1)"
            " IS DISTINCT FROM %(dims)s OR dimensions <> %(dims)s),"
            " count(*) FILTER (WHERE EXISTS (SELECT 1 FROM unnest(embedding) AS x"
            " WHERE x IN ('NaN'::real, 'Infinity'::real, '-Infinity'::real))) FROM {e}"
            " WHERE source_table = %(src)s AND user_id = ANY(%(users)s::text[]) GROUP BY user_id"
        ).format(e=self.db.t("enrich_embeddings"))
        failed_sql = sql.SQL(
            "SELECT user_id, count(*) FROM {f} WHERE source_table = %(src)s"
            " AND user_id = ANY(%(users)s::text[]) GROUP BY user_id"
        ).format(f=self.db.t("enrich_failures"))
        params = {"src": self.db.source_table, "users": wanted, "dims": dimensions}
        with self.db.connection() as conn:
            pending = {str(r[0]): int(r[1]) for r in conn.execute(pending_sql, params)}
            embeddings = {
                str(r[0]): tuple(map(int, r[1:])) for r in conn.execute(embed_sql, params)
            }
            failed = {str(r[0]): int(r[1]) for r in conn.execute(failed_sql, params)}
        out: dict[str, dict[str, int]] = {}
        for u in wanted:
            count, wrong, not_finite = embeddings.get(u, (0, 0, 0))
            out[u] = {
                "pending_unrecorded": pending.get(u, 0),
                "embeddings": count,
                "embeddings_wrong_dimensions": wrong,
                "embeddings_not_finite": not_finite,
                "failures_recorded": failed.get(u, 0),
            }
        return out

    @retry_db
    def claim(
        self,
        user_id: str,
        ids: Sequence[str],
        *,
        worker: str,
        lease_seconds: int,
        max_attempts: int,
        recaption: tuple[str, str] | None = None,
    ) -> tuple[list[PendingItem], list[str]]:
        """Claim rows for ``worker`` and read those still pending.

        Returns the claimed pending items and the ids skipped (claimed by another live run, or
        no longer pending). A claim held by someone else is only taken over once its lease has
        expired, so concurrent runs never work on the same row.
        """
        claims = self.db.t("enrich_claims")
        claim_sql = sql.SQL(
            "INSERT INTO {claims} AS c (source_table, item_id, user_id, worker, expires_at)"
            " SELECT %(src)s, x, %(user)s, %(worker)s, now() + make_interval(secs => %(lease)s)"
            " FROM unnest(%(ids)s::text[]) AS x"
            " ON CONFLICT (source_table, item_id) DO UPDATE"
            " SET worker = EXCLUDED.worker, expires_at = EXCLUDED.expires_at,"
            " user_id = EXCLUDED.user_id"
            " WHERE c.expires_at <= now() OR c.worker = EXCLUDED.worker"
            " RETURNING c.item_id"
        ).format(claims=claims)
        read_sql = sql.SQL(
            "SELECT i.id::text, i.user_id, i.image, i.metadata FROM {items} i"
            " WHERE i.user_id = %(user)s AND {match} AND {pending} AND {alive} ORDER BY i.id"
        ).format(
            items=self.db.items,
            match=self.db.id_match("claimed"),
            pending=self._selection(recaption)[0],
            alive=self._not_given_up(),
        )
        release_sql = sql.SQL(
            "DELETE FROM {claims} WHERE source_table = %(src)s AND worker = %(worker)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(claims=claims)
        params: dict[str, Any] = {
            "src": self.db.source_table,
            "user": user_id,
            "worker": worker,
            "lease": lease_seconds,
            "ids": list(ids),
            "max_attempts": max_attempts,
            **self._selection(recaption)[1],
        }
        with self.db.connection() as conn, conn.transaction():
            claimed = [r[0] for r in conn.execute(claim_sql, params)]
            rows = conn.execute(read_sql, {**params, "claimed": claimed}).fetchall()
            items = [PendingItem(r[0], r[1], r[2], r[3]) for r in rows]
            live = {item.id for item in items}
            gone = [i for i in claimed if i not in live]
            if gone:
                conn.execute(release_sql, {**params, "ids": gone})
        self.leases.hold(worker, live, lease_seconds)
        return items, [i for i in ids if i not in live]

    def _renew_claims(self, worker: str, ids: list[str], lease_seconds: int) -> None:
        query = sql.SQL(
            "UPDATE {c} SET expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE source_table = %(src)s AND worker = %(worker)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(c=self.db.t("enrich_claims"))
        with self.db.connection() as conn:
            conn.execute(
                query,
                {"lease": lease_seconds, "src": self.db.source_table, "worker": worker, "ids": ids},
            )

    def failures(self, user_id: str | None = None) -> list[LedgerEntry]:
        query = sql.SQL(
            "SELECT item_id, attempts, permanent, error_code, last_error FROM {f}"
            " WHERE source_table = %(src)s AND (%(user)s::text IS NULL OR user_id = %(user)s)"
            " ORDER BY last_failed_at DESC, item_id"
        ).format(f=self.db.t("enrich_failures"))
        with self.db.connection() as conn:
            rows = conn.execute(query, {"src": self.db.source_table, "user": user_id})
            return [LedgerEntry(*r) for r in rows]

    # Keys a person may have filled in by hand: the merge keeps their non-empty values (as
    # the caption itself is kept) unless the pipeline is re-captioning its own earlier output.
    KEPT_KEYS = ("dominant_colors", "style_tags", "object_tags")

    def _merge_sql(self) -> sql.Composed:
        """The conditional merge, in SQL every target has: no jsonb ``||`` or ``jsonb_set``
        (AnalyticDB 6.0 lacks them), only 9.4's ``jsonb_each`` and ``json_object_agg``, one
        level of correlation (Greenplum plans no skip-level correlated subqueries).

        Each key comes from the patch, except that an existing non-empty value of a kept key
        wins; every other existing key stays. Only rows of this user that are still active,
        still caption-less (or still carry the caption being replaced), still point at the
        captioned image, and whose metadata is an object (or null) are written.
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
            " UNION ALL SELECT p.key, p.value, 1 FROM jsonb_each(v.patch::jsonb) AS p"
            " ) AS kv ORDER BY kv.key, kv.rank) AS m),"
            " updated_at = now()"
            " FROM unnest(%(ids)s::{idt}[], %(images)s::text[], %(patches)s::text[],"
            " %(replaces)s::text[]) AS v(id, image, patch, replaces)"
            " WHERE {i_id} = v.id AND i.user_id = %(user)s AND i.image = v.image"
            " AND i.status = 'active' AND (CASE WHEN v.replaces IS NULL"
            " THEN COALESCE(i.metadata->>'caption', '') = ''"
            " ELSE i.metadata->>'caption' = v.replaces END)"
            " AND (i.metadata IS NULL OR jsonb_typeof(i.metadata) IN ('object', 'null'))"
            "{returning}"
        ).format(
            items=self.db.items,
            idt=self.db.id_cast,
            i_id=self.db.i_id,
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

    def write_chunk(
        self,
        user_id: str,
        *,
        worker: str,
        successes: Sequence[SuccessRow],
        failures: Sequence[FailureRow],
        embedding_model: str | None = None,
        run_id: str | None = None,
    ) -> WriteOutcome:
        """Write one chunk in one transaction: captions, embeddings, ledger, claims released.

        A row whose write raises for its own data (a value the column refuses, a trigger that
        raises) is that row's error: the chunk is then written row by row, and the rows that
        still fail are recorded with ``write_failed`` while the others are written. An error of
        the statement or the connection stays the chunk's (it is retried, or stops the run).
        """
        try:
            return self._write(user_id, worker, successes, failures, embedding_model, run_id)
        except _ROW_DATA_ERRORS as exc:
            if not successes:
                raise
            log.warning("chunk write refused (%s); writing its rows one by one", _first_line(exc))
        written: list[str] = []
        skipped: list[str] = []
        refused: list[FailureRow] = []
        for row in successes:
            try:
                one = self._write(user_id, worker, [row], [], embedding_model, run_id)
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
        rest = self._write(user_id, worker, [], [*failures, *refused], embedding_model, run_id)
        return WriteOutcome(written=written, skipped=skipped, failed=rest.failed)

    @retry_db
    def _write(
        self,
        user_id: str,
        worker: str,
        successes: Sequence[SuccessRow],
        failures: Sequence[FailureRow],
        embedding_model: str | None,
        run_id: str | None,
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
                }
                cur = conn.execute(self._merge_sql(), params)
                if self.db.dialect.items_returning:
                    written = [r[0] for r in cur]
                else:
                    params["captions"] = [s.patch.get("caption") for s in successes]
                    params["generated_at"] = successes[0].patch.get("caption_generated_at")
                    written = [r[0] for r in conn.execute(self._written_sql(), params)]
            done = set(written)
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
                        # Errors are kept short: the ledger is for people, not for dumps.
                        "messages": [f.error.message[:2000] for f in failures],
                    },
                )
            every = [s.item_id for s in successes] + [f.item_id for f in failures]
            if every:
                conn.execute(release_sql, {**base, "ids": every})
        self.leases.drop(worker, every)
        return WriteOutcome(
            written=written,
            skipped=[s.item_id for s in successes if s.item_id not in done],
            failed=[f.item_id for f in failures],
        )

    @retry_db
    def release(self, user_id: str, ids: Iterable[str], *, worker: str) -> None:
        ids = list(ids)
        self.leases.drop(worker, ids)
        query = sql.SQL(
            "DELETE FROM {c} WHERE source_table = %(src)s AND user_id = %(user)s"
            " AND worker = %(worker)s AND item_id = ANY(%(ids)s::text[])"
        ).format(c=self.db.t("enrich_claims"))
        with self.db.connection() as conn:
            conn.execute(
                query,
                {"src": self.db.source_table, "user": user_id, "worker": worker, "ids": list(ids)},
            )

    def reset_failures(self, user_id: str | None = None) -> int:
        """Forget recorded failures so those rows are pending again (the "retry failed" action)."""
        query = sql.SQL(
            "DELETE FROM {f} WHERE source_table = %(src)s"
            " AND (%(user)s::text IS NULL OR user_id = %(user)s)"
        ).format(f=self.db.t("enrich_failures"))
        with self.db.connection() as conn:
            return conn.execute(query, {"src": self.db.source_table, "user": user_id}).rowcount

    def forget_leases(self, worker: str, ids: Iterable[str]) -> None:
        """Stop renewing these claims from this process: a batch's claims are renewed by polling
        (``BatchRows.renew_claims``), not by the process that happened to submit it."""
        self.leases.drop(worker, ids)
