"""Which rows of the items table are pending, and the queries that list and count them.

A row is pending when it is active, has an image and no caption yet (or, re-captioning, a
caption by another model or prompt version); it is left alone while a live claim holds it or
once the failure ledger gives it up. The predicates here are shared by these queries, the
claims (:mod:`.claims`) and the asset-check figures (:mod:`.checks`).
"""

from __future__ import annotations

from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db

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


def pending_rows(db: Database) -> sql.Composable:
    """Pending rows the pipeline can address: without a unique index on id, rows with a
    NULL id or an id shared with another row are left out (preflight reports them)."""
    if db.dialect.ids_unique:
        return _PENDING
    return _PENDING + _addressable(db)


def _addressable(db: Database) -> sql.Composable:
    return sql.SQL(
        " AND i.id IS NOT NULL AND (SELECT count(*) FROM {items} d WHERE d.id = i.id) = 1"
    ).format(items=db.items)


def selected_rows(db: Database, recaption: tuple[str, str] | None) -> tuple[sql.Composable, dict]:
    """The rows a run works on: pending ones, or those due for re-captioning."""
    if recaption is None:
        return pending_rows(db), {}
    rows = _RECAPTION
    if not db.dialect.ids_unique:
        rows = rows + _addressable(db)
    return rows, {"rc_model": recaption[0], "rc_prompt": recaption[1]}


def unclaimed(db: Database) -> sql.Composable:
    """Not held by a live claim (a running run, an open batch)."""
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM {claims} c WHERE c.source_table = %(src)s"
        " AND c.item_id = i.id::text AND c.expires_at > now())"
    ).format(claims=db.t("enrich_claims"))


def not_given_up(db: Database) -> sql.Composable:
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM {failures} f WHERE f.source_table = %(src)s"
        " AND f.item_id = i.id::text AND (f.permanent OR f.attempts >= %(max_attempts)s))"
    ).format(failures=db.t("enrich_failures"))


class PendingRows:
    """The pending-rows queries (part of ``ItemRows``)."""

    db: Database

    @retry_db
    def users_with_pending(self, max_attempts: int) -> list[tuple[str, int]]:
        query = sql.SQL(
            "SELECT i.user_id, count(*) FROM {items} i WHERE {pending} AND i.user_id IS NOT NULL"
            " AND {alive} GROUP BY i.user_id ORDER BY i.user_id"
        ).format(items=self.db.items, pending=pending_rows(self.db), alive=not_given_up(self.db))
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
            pending=pending_rows(self.db),
            alive=not_given_up(self.db),
            unclaimed=unclaimed(self.db),
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
        selection, extra = selected_rows(self.db, recaption)
        query = sql.SQL(
            "SELECT i.id::text FROM {items} i WHERE i.user_id = %(user)s AND {pending} AND {alive}"
            " AND {unclaimed} ORDER BY i.id LIMIT %(limit)s"
        ).format(
            items=self.db.items,
            pending=selection,
            alive=not_given_up(self.db),
            unclaimed=unclaimed(self.db),
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
        selection, extra = selected_rows(self.db, recaption)
        query = sql.SQL(
            "SELECT count(*) FROM {items} i WHERE i.user_id = %(user)s AND {pending} AND {alive}"
        ).format(items=self.db.items, pending=selection, alive=not_given_up(self.db))
        params = {
            "user": user_id,
            "src": self.db.source_table,
            "max_attempts": max_attempts,
            **extra,
        }
        with self.db.connection() as conn:
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row else 0
