"""The one change the pipeline makes to the items table: a partial index on pending and stale
rows (``<table>_enrich_pending_stale_idx``; it replaces the pending-only
``<table>_enrich_pending_idx`` of earlier versions, dropped once the new one is built)."""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.pending import index_predicate

log = logging.getLogger(__name__)

_INDEX_LOCK = 0x656E7270  # "enrp": one builder of the pending-rows index at a time
INDEX_SUFFIX = "_enrich_pending_stale_idx"
# The pending-only index of versions before stale rows: dropped once the new one is there.
OLD_INDEX_SUFFIX = "_enrich_pending_idx"


class PendingIndex:
    """Finding and building the pending-rows index (part of ``ItemRows``)."""

    db: Database

    @property
    def pending_index(self) -> sql.Identifier:
        return sql.Identifier(self.db.namespace, self._index_name(INDEX_SUFFIX))

    def _index_name(self, suffix: str) -> str:
        return f"{self.db.settings.table}{suffix}"[:63]

    def has_pending_index(self, conn: psycopg.Connection) -> bool:
        """The index exists and is valid (a cancelled CONCURRENTLY build leaves an invalid one)."""
        row = conn.execute(
            "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = to_regclass(%s)",
            (self.pending_index.as_string(conn),),
        ).fetchone()
        return bool(row and row[0])

    def ensure_pending_index(self, *, wait_seconds: float = 30.0) -> bool:
        """The one change the pipeline makes to the items table: a partial index on pending and
        stale rows (``pending.index_predicate``).

        It makes the sensor's tick and the pending query cheap on large tables, in every
        ``ENRICH_ON_IMAGE_CHANGE`` mode (the planner uses it for pending-only queries too). Built
        concurrently where the server can (not on Greenplum/AnalyticDB, where it falls back to
        a plain CREATE INDEX), by one process at a time: concurrent builds of the same index
        wait on each other's snapshots and deadlock. Returns whether the index is there.
        """
        name = sql.Identifier(self._index_name(INDEX_SUFFIX))
        old = sql.Identifier(self.db.namespace, self._index_name(OLD_INDEX_SUFFIX))
        body = sql.SQL("{name} ON {items} (user_id) WHERE " + index_predicate()).format(
            name=name, items=self.db.items
        )
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
                self._drop_old(conn, old)
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                log.warning("pending-rows index not built now (%s); queries work without it", exc)
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(self.pending_index))
                return False
            finally:
                conn.execute("RESET lock_timeout")
                conn.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK,))
                conn.autocommit = False
        return True

    @staticmethod
    def _drop_old(conn: psycopg.Connection, old: sql.Identifier) -> None:
        """The earlier pending-only index, now covered by the new one: dropped (a plain DROP,
        which Greenplum has too, under the 5 s lock timeout); on a busy table it stays for a
        later run to drop, costing only its upkeep."""
        try:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(old))
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            log.warning("old pending-rows index %s not dropped now (%s)", old.as_string(conn), exc)
