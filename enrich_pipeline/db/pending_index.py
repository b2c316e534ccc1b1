"""The one change the pipeline makes to the items table: a partial index on pending rows."""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database

log = logging.getLogger(__name__)

_INDEX_LOCK = 0x656E7270  # "enrp": one builder of the pending-rows index at a time


class PendingIndex:
    """Finding and building the pending-rows index (part of ``ItemRows``)."""

    db: Database

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
