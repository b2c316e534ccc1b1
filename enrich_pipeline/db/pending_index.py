"""The one change the pipeline makes to the items table: partial indexes on the rows it works on.

- ``<table>_enrich_pending_idx`` on ``(user_id)``, rows without a caption: the pending-only
  queries (``ENRICH_ON_IMAGE_CHANGE=ignore``, batch mode, counts) read it and nothing more, so
  stale rows that are ignored for good never slow them down;
- ``<table>_enrich_pending_stale_idx`` on ``(user_id, updated_at, id)``, rows pending or
  stale (``pending.index_predicate``): the sensor's tick in recaption mode is answered from it
  alone (an index-only scan: the predicate's columns need not be in it, those of the query are).

Both are small (the rows still to do), built once by the table's owner. An index is found by its
name: one whose definition changes must get a new name (and the old one dropped once its
successor is built), or deployments would keep the old definition.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.pending import index_predicate, pending_index_predicate

log = logging.getLogger(__name__)

_INDEX_LOCK = 0x656E7270  # "enrp": one builder of the pending-rows indexes at a time
PENDING_SUFFIX = "_enrich_pending_idx"
INDEX_SUFFIX = "_enrich_pending_stale_idx"
# suffix -> (key columns, predicate)
_INDEXES = {
    PENDING_SUFFIX: ("user_id", pending_index_predicate()),
    INDEX_SUFFIX: ("user_id, updated_at, id", index_predicate()),
}


class PendingIndex:
    """Finding and building the pending-rows indexes (part of ``ItemRows``)."""

    db: Database

    @property
    def pending_index(self) -> sql.Identifier:
        """The pending-and-stale index (the one the sensor's tick reads)."""
        return self._qualified(INDEX_SUFFIX)

    def _qualified(self, suffix: str) -> sql.Identifier:
        return sql.Identifier(self.db.namespace, self._index_name(suffix))

    def _index_name(self, suffix: str) -> str:
        return f"{self.db.settings.table}{suffix}"[:63]

    def _missing(self, conn: psycopg.Connection) -> list[str]:
        """The indexes not there, or not valid (a cancelled CONCURRENTLY build leaves an
        invalid one)."""
        missing = []
        for suffix in _INDEXES:
            row = conn.execute(
                "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = to_regclass(%s)",
                (self._qualified(suffix).as_string(conn),),
            ).fetchone()
            if not (row and row[0]):
                missing.append(suffix)
        return missing

    def has_pending_index(self, conn: psycopg.Connection) -> bool:
        """Both indexes exist and are valid."""
        return not self._missing(conn)

    def ensure_pending_index(self, *, wait_seconds: float = 30.0) -> bool:
        """Build the indexes that are missing (see the module's docstring).

        They make the sensor's tick and the pending query cheap on large tables. Built
        concurrently where the server can (not on Greenplum/AnalyticDB, where it falls back to
        a plain CREATE INDEX), by one process at a time: concurrent builds of the same index
        wait on each other's snapshots and deadlock. Returns whether both are there.
        """
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
            building: str | None = None
            try:
                # Building waits for open transactions on the table; on a busy table the run
                # goes on without the index (it only makes queries faster) and a later run
                # builds it.
                conn.execute("SET lock_timeout = '5s'")
                for suffix in self._missing(conn):
                    building = suffix
                    self._build(conn, suffix)
                building = None
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                log.warning("pending-rows index not built now (%s); queries work without it", exc)
                if building is not None:
                    conn.execute(
                        sql.SQL("DROP INDEX IF EXISTS {}").format(self._qualified(building))
                    )
                return False
            finally:
                conn.execute("RESET lock_timeout")
                conn.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK,))
                conn.autocommit = False
        return True

    def _build(self, conn: psycopg.Connection, suffix: str) -> None:
        columns, predicate = _INDEXES[suffix]
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(self._qualified(suffix)))
        body = sql.SQL("{name} ON {items} (" + columns + ") WHERE " + predicate).format(
            name=sql.Identifier(self._index_name(suffix)), items=self.db.items
        )
        try:
            concurrently = self.db.dialect.concurrent_index
            conn.execute(
                sql.SQL("CREATE INDEX CONCURRENTLY " if concurrently else "CREATE INDEX ") + body
            )
        except psycopg.errors.FeatureNotSupported:
            conn.execute(sql.SQL("CREATE INDEX ") + body)
