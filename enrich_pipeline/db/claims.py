"""Claims on item rows (table ``enrich_claims``): taking them, renewing their leases, giving
them back.

A claim is a lease: a row claimed by a process that died comes back to the pending set when the
lease runs out, and a live process renews its leases (``LeaseKeeper``) so its slow chunks are
never taken over.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db
from enrich_pipeline.db.leases import LeaseKeeper
from enrich_pipeline.db.pending import IGNORE, OnImageChange, not_given_up, selected_rows
from enrich_pipeline.enrichment.records import PendingItem


class ClaimRows:
    """The claim statements (part of ``ItemRows``)."""

    db: Database
    leases: LeaseKeeper

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
        stale: OnImageChange = IGNORE,
    ) -> tuple[list[PendingItem], list[str]]:
        """Claim rows for ``worker`` and read those still pending (or stale, with
        ``stale="recaption"``: their current caption is then the one a write replaces).

        Returns the claimed pending items and the ids skipped (claimed by another live run, or
        no longer pending). A claim held by someone else is only taken over once its lease has
        expired, so concurrent runs never work on the same row.
        """
        claims = self.db.t("enrich_claims")
        selection, extra = selected_rows(self.db, recaption, stale)
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
            pending=selection,
            alive=not_given_up(self.db),
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
            **extra,
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

    @retry_db
    def release_workers(self, workers: Sequence[str]) -> int:
        """Give back every claim of these workers, whose processes are known to be dead (a
        Dagster run failed with its process gone): their rows need not wait for the lease.
        Returns the claims given back."""
        if not workers:
            return 0
        query = sql.SQL(
            "DELETE FROM {c} WHERE source_table = %(src)s AND worker = ANY(%(workers)s::text[])"
        ).format(c=self.db.t("enrich_claims"))
        with self.db.connection() as conn:
            cur = conn.execute(query, {"src": self.db.source_table, "workers": list(workers)})
            return max(cur.rowcount, 0)

    def forget_leases(self, worker: str, ids: Iterable[str]) -> None:
        """Stop renewing these claims from this process: a batch's claims are renewed by polling
        (``BatchRows.renew_claims``), not by the process that happened to submit it."""
        self.leases.drop(worker, ids)
