"""Every SQL statement of the project, behind one class.

Identifiers from configuration (namespace, table) are only ever composed with
``psycopg.sql.Identifier``; values are always parameters. Writes are conditional in SQL so that
a caption written by anyone while a run was in flight is never overwritten, and every statement
a user partition runs is scoped to that user.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import tenacity
from psycopg import sql
from psycopg_pool import ConnectionPool

from enrich_pipeline.db.migrate import migrate
from enrich_pipeline.enrichment.records import ItemError, PendingItem
from enrich_pipeline.settings import ConfigError, DbSettings

log = logging.getLogger(__name__)

# Column types we can compare ids in natively (so the primary key index is used); anything
# else is compared as text.
_NATIVE_ID_TYPES = {"bigint", "integer", "smallint", "text", "uuid"}

# Transient database failures (dropped connection, server restart, statement timeout): a chunk
# write is idempotent, so it is simply tried again on a fresh connection.
_retry_db = tenacity.retry(
    retry=tenacity.retry_if_exception_type(
        (psycopg.OperationalError, psycopg.errors.QueryCanceled)
    ),
    stop=tenacity.stop_after_attempt(4),
    wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=8),
    reraise=True,
)


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


class _LeaseKeeper:
    """Renews the leases of the claims a live process holds, every third of a lease.

    Leases can then be short: rows claimed by a process that was killed come back to the
    pending set within one lease, while a slow chunk of a live process is never taken over.
    """

    def __init__(self, renew: Callable[[str, list[str], int], None]) -> None:
        self._renew = renew
        self._held: dict[tuple[str, int], set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = 30.0

    def hold(self, worker: str, ids: Iterable[str], lease_seconds: int) -> None:
        with self._lock:
            self._held.setdefault((worker, lease_seconds), set()).update(ids)
            self._interval = min(self._interval, max(0.2, lease_seconds / 3))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="enrich-lease-keeper", daemon=True
                )
                self._thread.start()

    def drop(self, worker: str, ids: Iterable[str]) -> None:
        gone = set(ids)
        with self._lock:
            for key in [k for k in self._held if k[0] == worker]:
                self._held[key] -= gone
                if not self._held[key]:
                    del self._held[key]

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                batches = [(w, sorted(ids), lease) for (w, lease), ids in self._held.items()]
            for worker, ids, lease in batches:
                try:
                    self._renew(worker, ids, lease)
                except psycopg.Error:
                    # The database is away; the write retries, and an expired lease only
                    # lets another run take rows this one will then find already written.
                    continue

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class ItemStore:
    """A psycopg 3 pool over the items table and the pipeline's own tables."""

    def __init__(
        self,
        settings: DbSettings,
        *,
        max_connections: int = 4,
        statement_timeout_ms: int = 120_000,
        create_pending_index: bool = True,
        connect_timeout: int = 5,
    ) -> None:
        if not settings.conninfo:
            raise ConfigError(
                "no database configured: set ADBPG_HOST/ADBPG_URL or use the embedded one"
            )
        self.settings = settings
        self.source_table = f"{settings.namespace}.{settings.table}"
        self._ns = settings.namespace
        self._items = sql.Identifier(settings.namespace, settings.table)
        self._create_pending_index = create_pending_index
        self.pool = ConnectionPool(
            settings.conninfo,
            min_size=1,
            max_size=max_connections,
            kwargs={
                "application_name": "enrich-pipeline",
                "connect_timeout": connect_timeout,
                "options": f"-c statement_timeout={int(statement_timeout_ms)}",
            },
            # A connection the server dropped (restart, terminated backend) is replaced on
            # checkout instead of failing the next statement.
            check=ConnectionPool.check_connection,
            open=True,
            name="enrich-pipeline",
            # Fail within seconds, not the pool's default 30 s, when the server is down.
            timeout=connect_timeout,
        )
        self._id_type: str | None = None
        self._leases = _LeaseKeeper(self._renew_claims)

    def close(self) -> None:
        self._leases.close()
        self.pool.close()

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self._ns, name)

    # --- setup -------------------------------------------------------------------------------

    # Setup done once per process and target: sensor ticks and runs build a store often.
    _prepared: dict[tuple[str, str, str], str] = {}

    def setup(self) -> list[int]:
        """Migrate the pipeline's tables, check the items table, add the pending-rows index."""
        key = (self.settings.conninfo, self._ns, self.settings.table)
        if key in self._prepared:
            self._id_type = self._prepared[key]
            return []
        with self.pool.connection() as conn:
            applied = migrate(conn, self._ns)
            id_type = self._introspect_id_type(conn)
        self._id_type = id_type if id_type in _NATIVE_ID_TYPES else "text"
        if not self._create_pending_index or self.ensure_pending_index():
            # Not remembered when the index could not be built, so the next run tries again.
            self._prepared[key] = self._id_type
        return applied

    def _introspect_id_type(self, conn: psycopg.Connection) -> str:
        qualified = self._items.as_string(conn)
        row = conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " WHERE a.attrelid = to_regclass(%s) AND a.attname = 'id' AND NOT a.attisdropped",
            (qualified,),
        ).fetchone()
        conn.commit()
        if row is None:
            raise ConfigError(f"items table {qualified} does not exist (or has no id column)")
        return str(row[0])

    @property
    def _id(self) -> sql.Composable:
        """The id column's type for casting parameters; ids travel as text otherwise."""
        if self._id_type is None:
            raise RuntimeError("ItemStore.setup() must run before queries")
        return sql.SQL(self._id_type)

    @property
    def _i_id(self) -> sql.Composable:
        """``i.id`` as compared with parameters: natively (so the key index is used) or as text."""
        return sql.SQL("i.id" if self._id_type != "text" else "i.id::text")

    def _id_match(self, param: str) -> sql.Composable:
        return sql.SQL("{} = ANY({}::{}[])").format(self._i_id, sql.Placeholder(param), self._id)

    def ensure_pending_index(self) -> bool:
        """The one change the pipeline makes to the items table: a partial index on pending rows.

        It makes the sensor's tick and the pending query cheap on large tables. Created
        concurrently so that a live table is not locked; where the server cannot do that
        (AnalyticDB), it falls back to a plain CREATE INDEX.
        """
        name = sql.Identifier(f"{self.settings.table}_enrich_pending_idx"[:63])
        body = sql.SQL(
            "IF NOT EXISTS {name} ON {items} (user_id)"
            " WHERE status = 'active' AND COALESCE(metadata->>'caption', '') = ''"
            " AND image IS NOT NULL AND image <> ''"
        ).format(name=name, items=self._items)
        with self.pool.connection() as conn:
            conn.autocommit = True
            try:
                # Building waits for open transactions on the table; on a busy table the run
                # goes on without the index (it only makes queries faster) and a later run
                # builds it.
                conn.execute("SET lock_timeout = '5s'")
                try:
                    conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY ") + body)
                except psycopg.errors.FeatureNotSupported:
                    conn.execute(sql.SQL("CREATE INDEX ") + body)
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                log.warning("pending-rows index not built now (%s); queries work without it", exc)
                # A cancelled CONCURRENTLY build leaves an invalid index behind: drop it so
                # that IF NOT EXISTS does not keep a useless one forever.
                conn.execute(
                    sql.SQL("DROP INDEX IF EXISTS {}").format(
                        sql.Identifier(
                            self.settings.namespace,
                            f"{self.settings.table}_enrich_pending_idx"[:63],
                        )
                    )
                )
                return False
            finally:
                conn.execute("RESET lock_timeout")
                conn.autocommit = False
        return True

    # --- reading -----------------------------------------------------------------------------

    _PENDING = sql.SQL(
        "i.status = 'active' AND COALESCE(i.metadata->>'caption', '') = ''"
        " AND i.image IS NOT NULL AND i.image <> ''"
    )

    # Re-captioning selects rows the pipeline captioned with another model or prompt version;
    # captions written by people (no caption_model) are never selected.
    _RECAPTION = sql.SQL(
        "i.status = 'active' AND i.image IS NOT NULL AND i.image <> ''"
        " AND COALESCE(i.metadata->>'caption', '') <> '' AND i.metadata ? 'caption_model'"
        " AND (i.metadata->>'caption_model' IS DISTINCT FROM %(rc_model)s"
        " OR i.metadata->>'caption_prompt_version' IS DISTINCT FROM %(rc_prompt)s)"
    )

    def _selection(self, recaption: tuple[str, str] | None) -> tuple[sql.Composable, dict]:
        """The rows a run works on: pending ones, or those due for re-captioning."""
        if recaption is None:
            return self._PENDING, {}
        return self._RECAPTION, {"rc_model": recaption[0], "rc_prompt": recaption[1]}

    def _unclaimed(self) -> sql.Composable:
        """Not held by a live claim (a running run, an open batch)."""
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {claims} c WHERE c.source_table = %(src)s"
            " AND c.item_id = i.id::text AND c.expires_at > now())"
        ).format(claims=self._t("enrich_claims"))

    def _not_given_up(self) -> sql.Composable:
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {failures} f WHERE f.source_table = %(src)s"
            " AND f.item_id = i.id::text AND (f.permanent OR f.attempts >= %(max_attempts)s))"
        ).format(failures=self._t("enrich_failures"))

    def users_with_pending(self, max_attempts: int) -> list[tuple[str, int]]:
        query = sql.SQL(
            "SELECT i.user_id, count(*) FROM {items} i WHERE {pending} AND i.user_id IS NOT NULL"
            " AND {alive} GROUP BY i.user_id ORDER BY i.user_id"
        ).format(items=self._items, pending=self._PENDING, alive=self._not_given_up())
        with self.pool.connection() as conn:
            rows = conn.execute(query, {"src": self.source_table, "max_attempts": max_attempts})
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
            items=self._items,
            pending=self._PENDING,
            alive=self._not_given_up(),
            unclaimed=self._unclaimed(),
        )
        attempts_sql = sql.SQL(
            "SELECT user_id, sum(attempts) FROM {f} WHERE source_table = %(src)s"
            " AND NOT permanent AND attempts < %(max_attempts)s GROUP BY user_id"
        ).format(f=self._t("enrich_failures"))
        params = {"src": self.source_table, "max_attempts": max_attempts}
        with self.pool.connection() as conn:
            rows = conn.execute(rows_sql, params).fetchall()
            attempts = dict(conn.execute(attempts_sql, params).fetchall())
        return {
            str(user): f"{count}-{newest.timestamp() if newest else 0:.6f}-{attempts.get(user, 0)}"
            for user, count, newest in rows
        }

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
            items=self._items,
            pending=selection,
            alive=self._not_given_up(),
            unclaimed=self._unclaimed(),
        )
        params = {
            "user": user_id,
            "src": self.source_table,
            "max_attempts": max_attempts,
            "limit": limit,
            **extra,
        }
        with self.pool.connection() as conn:
            return [r[0] for r in conn.execute(query, params)]

    def count_pending(
        self, user_id: str, *, max_attempts: int, recaption: tuple[str, str] | None = None
    ) -> int:
        selection, extra = self._selection(recaption)
        query = sql.SQL(
            "SELECT count(*) FROM {items} i WHERE i.user_id = %(user)s AND {pending} AND {alive}"
        ).format(items=self._items, pending=selection, alive=self._not_given_up())
        params = {"user": user_id, "src": self.source_table, "max_attempts": max_attempts, **extra}
        with self.pool.connection() as conn:
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row else 0

    def check_partition(self, user_id: str, dimensions: int) -> dict[str, int]:
        """Figures for the asset checks of one user's partition."""
        pending_sql = sql.SQL(
            "SELECT count(*) FROM {items} i WHERE i.user_id = %(user)s AND {pending}"
            " AND NOT EXISTS (SELECT 1 FROM {f} f WHERE f.source_table = %(src)s"
            " AND f.item_id = i.id::text) AND {unclaimed}"
        ).format(
            items=self._items,
            pending=self._PENDING,
            f=self._t("enrich_failures"),
            unclaimed=self._unclaimed(),
        )
        embed_sql = sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE array_length(embedding, 1) IS DISTINCT FROM"
            " %(dims)s OR dimensions <> %(dims)s) FROM {e}"
            " WHERE source_table = %(src)s AND user_id = %(user)s"
        ).format(e=self._t("enrich_embeddings"))
        failed_sql = sql.SQL(
            "SELECT count(*) FROM {f} WHERE source_table = %(src)s AND user_id = %(user)s"
        ).format(f=self._t("enrich_failures"))
        params = {"src": self.source_table, "user": user_id, "dims": dimensions}
        with self.pool.connection() as conn:
            unrecorded = conn.execute(pending_sql, params).fetchone()
            embeddings = conn.execute(embed_sql, params).fetchone()
            failed = conn.execute(failed_sql, params).fetchone()
        assert unrecorded and embeddings and failed
        return {
            "pending_unrecorded": int(unrecorded[0]),
            "embeddings": int(embeddings[0]),
            "embeddings_wrong_dimensions": int(embeddings[1]),
            "failures_recorded": int(failed[0]),
        }

    @_retry_db
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
        claims = self._t("enrich_claims")
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
            items=self._items,
            match=self._id_match("claimed"),
            pending=self._selection(recaption)[0],
            alive=self._not_given_up(),
        )
        release_sql = sql.SQL(
            "DELETE FROM {claims} WHERE source_table = %(src)s AND worker = %(worker)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(claims=claims)
        params: dict[str, Any] = {
            "src": self.source_table,
            "user": user_id,
            "worker": worker,
            "lease": lease_seconds,
            "ids": list(ids),
            "max_attempts": max_attempts,
            **self._selection(recaption)[1],
        }
        with self.pool.connection() as conn, conn.transaction():
            claimed = [r[0] for r in conn.execute(claim_sql, params)]
            rows = conn.execute(read_sql, {**params, "claimed": claimed}).fetchall()
            items = [PendingItem(r[0], r[1], r[2], r[3]) for r in rows]
            live = {item.id for item in items}
            gone = [i for i in claimed if i not in live]
            if gone:
                conn.execute(release_sql, {**params, "ids": gone})
        self._leases.hold(worker, live, lease_seconds)
        return items, [i for i in ids if i not in live]

    def _renew_claims(self, worker: str, ids: list[str], lease_seconds: int) -> None:
        query = sql.SQL(
            "UPDATE {c} SET expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE source_table = %(src)s AND worker = %(worker)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(c=self._t("enrich_claims"))
        with self.pool.connection() as conn:
            conn.execute(
                query,
                {"lease": lease_seconds, "src": self.source_table, "worker": worker, "ids": ids},
            )

    def failures(self, user_id: str | None = None) -> list[LedgerEntry]:
        query = sql.SQL(
            "SELECT item_id, attempts, permanent, error_code, last_error FROM {f}"
            " WHERE source_table = %(src)s AND (%(user)s::text IS NULL OR user_id = %(user)s)"
            " ORDER BY last_failed_at DESC, item_id"
        ).format(f=self._t("enrich_failures"))
        with self.pool.connection() as conn:
            rows = conn.execute(query, {"src": self.source_table, "user": user_id})
            return [LedgerEntry(*r) for r in rows]

    # --- caption search ------------------------------------------------------------------------

    def has_pgvector(self) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')"
            )
            return bool(row.fetchone()[0])  # type: ignore[index]

    def search_captions(
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
        ).format(score=score, e=self._t("enrich_embeddings"), items=self._items)
        params = {
            "q": list(vector),
            "qnorm": sum(v * v for v in vector) ** 0.5,
            "src": self.source_table,
            "user": user_id,
            "dims": len(vector),
            "colors": json.dumps(list(colors)) if colors else None,
            "tags": json.dumps(list(tags)) if tags else None,
            "k": top_k,
        }
        with self.pool.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [(r[0], float(r[1]) if r[1] is not None else 0.0, r[2]) for r in rows]

    # --- caption cache -------------------------------------------------------------------------

    def cached_captions(
        self, shas: Iterable[str], *, model: str, prompt_version: str
    ) -> dict[str, str]:
        query = sql.SQL(
            "SELECT content_sha256, caption FROM {c} WHERE model = %(model)s"
            " AND prompt_version = %(pv)s AND content_sha256 = ANY(%(shas)s::text[])"
        ).format(c=self._t("enrich_caption_cache"))
        wanted = sorted(set(shas))
        if not wanted:
            return {}
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(query, {"model": model, "pv": prompt_version, "shas": wanted})
                return dict(rows.fetchall())
        except psycopg.Error as exc:  # PoolTimeout included
            # The cache saves money; it must never cost a row. A failed lookup is a miss.
            log.warning("caption cache lookup failed, treated as a miss: %s", exc)
            return {}

    def cache_caption(self, sha: str, *, model: str, prompt_version: str, caption: str) -> None:
        """Remember a paid caption at once, before the chunk is written, so a crash keeps it."""
        try:
            self.batch_cache_captions([(sha, caption)], model=model, prompt_version=prompt_version)
        except psycopg.Error as exc:
            log.warning("caption not cached (%s); it is still written with its chunk", exc)

    # --- writing -----------------------------------------------------------------------------

    @_retry_db
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

        The UPDATE only touches rows of this user that are still active, still caption-less,
        still point at the image that was captioned, and whose metadata is an object; the
        merge keeps every other key. Rows that no longer qualify are reported as skipped.
        """
        update_sql = sql.SQL(
            "UPDATE {items} AS i"
            # A JSON null is as empty as SQL NULL; anything but an object is refused below.
            " SET metadata = (CASE WHEN jsonb_typeof(i.metadata) = 'object' THEN i.metadata"
            " ELSE '{{}}'::jsonb END) || v.patch::jsonb,"
            " updated_at = now()"
            " FROM unnest(%(ids)s::{idt}[], %(images)s::text[], %(patches)s::text[],"
            " %(replaces)s::text[]) AS v(id, image, patch, replaces)"
            " WHERE {i_id} = v.id AND i.user_id = %(user)s AND i.image = v.image"
            " AND i.status = 'active' AND (CASE WHEN v.replaces IS NULL"
            " THEN COALESCE(i.metadata->>'caption', '') = ''"
            " ELSE i.metadata->>'caption' = v.replaces END)"
            " AND (i.metadata IS NULL OR jsonb_typeof(i.metadata) IN ('object', 'null'))"
            " RETURNING i.id::text"
        ).format(items=self._items, idt=self._id, i_id=self._i_id)
        embed_sql = sql.SQL(
            "INSERT INTO {e} (source_table, item_id, user_id, model, dimensions, embedding)"
            " VALUES (%s, %s, %s, %s, %s, %s::real[])"
            " ON CONFLICT (source_table, item_id) DO UPDATE SET user_id = EXCLUDED.user_id,"
            " model = EXCLUDED.model, dimensions = EXCLUDED.dimensions,"
            " embedding = EXCLUDED.embedding, created_at = now()"
        ).format(e=self._t("enrich_embeddings"))
        cleared_sql = sql.SQL(
            "DELETE FROM {f} WHERE source_table = %(src)s AND user_id = %(user)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(f=self._t("enrich_failures"))
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
        ).format(f=self._t("enrich_failures"))
        release_sql = sql.SQL(
            "DELETE FROM {c} WHERE source_table = %(src)s AND worker = %(worker)s"
            " AND item_id = ANY(%(ids)s::text[])"
        ).format(c=self._t("enrich_claims"))

        base = {"src": self.source_table, "user": user_id, "worker": worker, "run": run_id}
        with self.pool.connection() as conn, conn.transaction():
            written: list[str] = []
            if successes:
                written = [
                    r[0]
                    for r in conn.execute(
                        update_sql,
                        {
                            **base,
                            "ids": [s.item_id for s in successes],
                            "images": [s.image for s in successes],
                            "patches": [json.dumps(s.patch, ensure_ascii=False) for s in successes],
                            "replaces": [s.replaces for s in successes],
                        },
                    )
                ]
            done = set(written)
            vectors = [
                (
                    self.source_table,
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
        self._leases.drop(worker, every)
        return WriteOutcome(
            written=written,
            skipped=[s.item_id for s in successes if s.item_id not in done],
            failed=[f.item_id for f in failures],
        )

    def release(self, user_id: str, ids: Iterable[str], *, worker: str) -> None:
        ids = list(ids)
        self._leases.drop(worker, ids)
        query = sql.SQL(
            "DELETE FROM {c} WHERE source_table = %(src)s AND user_id = %(user)s"
            " AND worker = %(worker)s AND item_id = ANY(%(ids)s::text[])"
        ).format(c=self._t("enrich_claims"))
        with self.pool.connection() as conn:
            conn.execute(
                query,
                {"src": self.source_table, "user": user_id, "worker": worker, "ids": list(ids)},
            )

    def reset_failures(self, user_id: str | None = None) -> int:
        """Forget recorded failures so those rows are pending again (the "retry failed" action)."""
        query = sql.SQL(
            "DELETE FROM {f} WHERE source_table = %(src)s"
            " AND (%(user)s::text IS NULL OR user_id = %(user)s)"
        ).format(f=self._t("enrich_failures"))
        with self.pool.connection() as conn:
            return conn.execute(query, {"src": self.source_table, "user": user_id}).rowcount

    # --- batch mode ----------------------------------------------------------------------------
    # State of DashScope Batch API submissions (``enrich_pipeline.batch``): one row per provider
    # batch in ``enrich_batches``, what collecting needs per item in ``enrich_batch_items``. The
    # rows of a batch are held in ``enrich_claims`` by its worker; a claim still held means "not
    # written back yet", which is what makes collecting idempotent (``write_chunk`` releases the
    # claims in the transaction that writes the rows). Rows come back as plain dicts.

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
        }
    )

    def batch_record(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
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
        )
        batch_sql = sql.SQL(
            "INSERT INTO {b} (source_table, state, {cols}) VALUES (%(src)s, 'submitting', {vals})"
        ).format(
            b=self._t("enrich_batches"),
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            vals=sql.SQL(", ").join(map(sql.Placeholder, columns)),
        )
        items_sql = sql.SQL(
            "INSERT INTO {bi} (local_id, item_id, custom_id, image, content_sha256,"
            " dominant_colors) SELECT %(local_id)s, x.item_id, x.custom_id, x.image, x.sha,"
            " x.colors::jsonb FROM unnest(%(ids)s::text[], %(cids)s::text[], %(images)s::text[],"
            " %(shas)s::text[], %(colors)s::text[]) AS x(item_id, custom_id, image, sha, colors)"
        ).format(bi=self._t("enrich_batch_items"))
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(batch_sql, {"src": self.source_table, **{c: batch[c] for c in columns}})
            conn.execute(
                items_sql,
                {
                    "local_id": batch["local_id"],
                    "ids": [i["item_id"] for i in items],
                    "cids": [i["custom_id"] for i in items],
                    "images": [i["image"] for i in items],
                    "shas": [i["content_sha256"] for i in items],
                    "colors": [json.dumps(list(i["dominant_colors"])) for i in items],
                },
            )

    @_retry_db
    def batch_update(
        self, local_id: str, *, expect_state: str | None = None, **fields: Any
    ) -> dict[str, Any] | None:
        """Set some of a batch's columns; with ``expect_state``, only if it is in that state.

        Returns the updated row, or None when the batch is not there (or not in that state).
        """
        unknown = set(fields) - self._BATCH_MUTABLE
        if unknown:
            raise ValueError(f"not a mutable batch column: {sorted(unknown)}")
        sets = [sql.SQL("updated_at = now()")]
        params: dict[str, Any] = {
            "src": self.source_table,
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
        ).format(b=self._t("enrich_batches"), sets=sql.SQL(", ").join(sets))
        with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(query, params).fetchone()

    def batch_get(self, local_id: str) -> dict[str, Any] | None:
        query = sql.SQL(
            "SELECT * FROM {b} WHERE source_table = %(src)s AND local_id = %(local_id)s"
        ).format(b=self._t("enrich_batches"))
        with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(query, {"src": self.source_table, "local_id": local_id}).fetchone()

    def batch_find(self, ref: str) -> dict[str, Any] | None:
        """A batch by our local id or by the provider's batch id."""
        query = sql.SQL(
            "SELECT * FROM {b} WHERE source_table = %(src)s"
            " AND (local_id = %(ref)s OR batch_id = %(ref)s) ORDER BY created_at LIMIT 1"
        ).format(b=self._t("enrich_batches"))
        with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(query, {"src": self.source_table, "ref": ref}).fetchone()

    def batch_list(
        self,
        *,
        states: Sequence[str] | None = None,
        user_id: str | None = None,
        idle_seconds: float | None = None,
    ) -> list[dict[str, Any]]:
        """Batches of this items table, oldest first; ``idle_seconds``: not updated since."""
        query = sql.SQL(
            "SELECT * FROM {b} WHERE source_table = %(src)s"
            " AND (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))"
            " AND (%(user)s::text IS NULL OR user_id = %(user)s)"
            " AND (%(idle)s::float8 IS NULL"
            " OR updated_at <= now() - make_interval(secs => %(idle)s::float8))"
            " ORDER BY created_at, submission_id, part"
        ).format(b=self._t("enrich_batches"))
        params = {
            "src": self.source_table,
            "states": list(states) if states is not None else None,
            "user": user_id,
            "idle": idle_seconds,
        }
        with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(query, params).fetchall()

    def batch_items(self, local_id: str) -> list[dict[str, Any]]:
        query = sql.SQL(
            "SELECT bi.item_id, bi.custom_id, bi.image, bi.content_sha256, bi.dominant_colors"
            " FROM {bi} bi JOIN {b} b ON b.local_id = bi.local_id"
            " WHERE b.source_table = %(src)s AND bi.local_id = %(local_id)s ORDER BY bi.item_id"
        ).format(bi=self._t("enrich_batch_items"), b=self._t("enrich_batches"))
        with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(query, {"src": self.source_table, "local_id": local_id}).fetchall()

    def batch_held_ids(self, local_id: str) -> list[str]:
        """Items of the batch whose claim its worker still holds: those not written back yet."""
        query = sql.SQL(
            "SELECT bi.item_id FROM {bi} bi JOIN {b} b ON b.local_id = bi.local_id"
            " JOIN {c} c ON c.source_table = b.source_table AND c.item_id = bi.item_id"
            " AND c.worker = b.worker AND c.user_id = b.user_id"
            " WHERE b.source_table = %(src)s AND bi.local_id = %(local_id)s ORDER BY bi.item_id"
        ).format(
            bi=self._t("enrich_batch_items"),
            b=self._t("enrich_batches"),
            c=self._t("enrich_claims"),
        )
        with self.pool.connection() as conn:
            rows = conn.execute(query, {"src": self.source_table, "local_id": local_id})
            return [r[0] for r in rows]

    def batch_renew_claims(self, user_id: str, worker: str, lease_seconds: int) -> int:
        """Extend every claim ``worker`` holds for the user: rows stay held while the provider
        works on them, and come back on their own if nobody polls any more."""
        query = sql.SQL(
            "UPDATE {c} SET expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE source_table = %(src)s AND user_id = %(user)s AND worker = %(worker)s"
        ).format(c=self._t("enrich_claims"))
        params = {
            "src": self.source_table,
            "user": user_id,
            "worker": worker,
            "lease": lease_seconds,
        }
        with self.pool.connection() as conn:
            return conn.execute(query, params).rowcount

    def batch_take_collector(self, local_id: str, collector: str, lease_seconds: int) -> bool:
        """Become (or stay) the one collector of an open batch, for ``lease_seconds``."""
        query = sql.SQL(
            "UPDATE {b} SET collector = %(who)s, updated_at = now(),"
            " collector_expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE source_table = %(src)s AND local_id = %(local_id)s AND state = 'open'"
            " AND (collector IS NULL OR collector = %(who)s OR collector_expires_at <= now())"
            " RETURNING local_id"
        ).format(b=self._t("enrich_batches"))
        params = {
            "src": self.source_table,
            "local_id": local_id,
            "who": collector,
            "lease": lease_seconds,
        }
        with self.pool.connection() as conn:
            return conn.execute(query, params).fetchone() is not None

    def batch_cache_captions(
        self, captions: Sequence[tuple[str, str]], *, model: str, prompt_version: str
    ) -> None:
        """Remember many paid captions, ``(content_sha256, caption)``, in one statement."""
        if not captions:
            return
        query = sql.SQL(
            "INSERT INTO {c} (content_sha256, model, prompt_version, caption)"
            " SELECT DISTINCT ON (x.sha) x.sha, %(model)s, %(pv)s, x.caption"
            " FROM unnest(%(shas)s::text[], %(captions)s::text[]) AS x(sha, caption)"
            " ON CONFLICT DO NOTHING"
        ).format(c=self._t("enrich_caption_cache"))
        params = {
            "model": model,
            "pv": prompt_version,
            "shas": [s for s, _ in captions],
            "captions": [c for _, c in captions],
        }
        with self.pool.connection() as conn:
            conn.execute(query, params)

    def batch_forget_leases(self, worker: str, ids: Iterable[str]) -> None:
        """Stop renewing these claims from this process: a batch's claims are renewed by polling
        (``batch_renew_claims``), not by the process that happened to submit it."""
        self._leases.drop(worker, ids)


# --- the embedded demo's own sample table ---------------------------------------------------
# Only the demo creates an items table; against a user's database the pipeline never does.


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
