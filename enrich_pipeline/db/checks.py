"""Figures for the asset checks of users' partitions (``defs/checks.py`` judges them)."""

from __future__ import annotations

from collections.abc import Iterable

from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.pending import (
    RECAPTION,
    pending_rows,
    plan_with_index,
    unclaimed,
    work_rows,
)
from enrich_pipeline.db.search_rank import non_finite


class PartitionFigures:
    """The asset-check figures (part of ``ItemRows``)."""

    db: Database

    def check_partition(self, user_id: str, dimensions: int) -> dict[str, int]:
        """Figures for the asset checks of one user's partition."""
        return self.check_partitions([user_id], dimensions)[user_id]

    def check_partitions(self, users: Iterable[str], dimensions: int) -> dict[str, dict[str, int]]:
        """Figures for the asset checks of many users' partitions (a shared run's) in three
        grouped statements: pending and stale rows neither claimed nor in the failure ledger,
        embeddings, those of other dimensions or with non-finite values, failures recorded."""
        wanted = sorted(set(users))
        if not wanted:
            return {}
        # Pending and stale rows apart, in one pass: the index covers both.
        pending_sql = sql.SQL(
            "SELECT i.user_id, sum(CASE WHEN {pending} THEN 1 ELSE 0 END),"
            " sum(CASE WHEN {pending} THEN 0 ELSE 1 END) FROM {items} i"
            " WHERE i.user_id = ANY(%(users)s::text[]) AND {work}"
            " AND NOT EXISTS (SELECT 1 FROM {f} f WHERE f.source_table = %(src)s"
            " AND f.item_id = i.id::text) AND {unclaimed} GROUP BY i.user_id"
        ).format(
            items=self.db.items,
            pending=pending_rows(self.db),
            work=work_rows(self.db, RECAPTION),
            f=self.db.t("enrich_failures"),
            unclaimed=unclaimed(self.db),
        )
        # real[] holds NaN and infinities, which rank first in plain SQL and break pgvector.
        embed_sql = sql.SQL(
            "SELECT user_id, count(*), count(*) FILTER (WHERE array_length(embedding, 1)"
            " IS DISTINCT FROM %(dims)s OR dimensions <> %(dims)s),"
            " count(*) FILTER (WHERE {non_finite}) FROM {e}"
            " WHERE source_table = %(src)s AND user_id = ANY(%(users)s::text[]) GROUP BY user_id"
        ).format(e=self.db.t("enrich_embeddings"), non_finite=non_finite("embedding"))
        failed_sql = sql.SQL(
            "SELECT user_id, count(*) FROM {f} WHERE source_table = %(src)s"
            " AND user_id = ANY(%(users)s::text[]) GROUP BY user_id"
        ).format(f=self.db.t("enrich_failures"))
        params = {"src": self.db.source_table, "users": wanted, "dims": dimensions}
        with self.db.connection() as conn:
            embeddings = {
                str(r[0]): tuple(map(int, r[1:])) for r in conn.execute(embed_sql, params)
            }
            failed = {str(r[0]): int(r[1]) for r in conn.execute(failed_sql, params)}
            plan_with_index(conn, RECAPTION)  # last: it holds to the end of the transaction
            left = {str(r[0]): (int(r[1]), int(r[2])) for r in conn.execute(pending_sql, params)}
        out: dict[str, dict[str, int]] = {}
        for u in wanted:
            count, wrong, not_finite = embeddings.get(u, (0, 0, 0))
            pending, stale = left.get(u, (0, 0))
            out[u] = {
                "pending_unrecorded": pending,
                "stale_unrecorded": stale,
                "embeddings": count,
                "embeddings_wrong_dimensions": wrong,
                "embeddings_not_finite": not_finite,
                "failures_recorded": failed.get(u, 0),
            }
        return out
