"""Read-only figures about users' items: what a materialization states about a partition (its
items as they now are), which user ids exist, and the server the items live on.

Portable SQL only (no ``FILTER``, LATERAL, ``jsonb_build_object``, ``jsonb ||``, SKIP LOCKED):
AnalyticDB 6.0 (Greenplum 6, PostgreSQL 9.4) runs these as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.pending import FLAGGED, STALE


@dataclass(frozen=True)
class UserItems:
    """One user's items with an image, as they are now."""

    user_id: str
    # Active rows with an image: the rows the pipeline is for.
    items: int = 0
    # Of those: with a caption (whoever wrote it), and of these written by the pipeline.
    captioned: int = 0
    captioned_by_pipeline: int = 0
    # Without a caption and not given up: what a run would take (claimed ones included).
    pending: int = 0
    # Without a caption, in the failure ledger but still to be retried.
    failed_retrying: int = 0
    # Without a caption and left out after failures (permanent, or attempts used up).
    given_up: int = 0
    # Of the captioned rows: a caption embedding stored.
    embedded: int = 0
    # Of the rows captioned by the pipeline: those whose image changed since (stale), in every
    # ENRICH_ON_IMAGE_CHANGE mode (with ``ignore`` they are counted, never worked on), and of
    # these the ones flagged ``caption_stale`` (``flag``).
    stale: int = 0
    stale_flagged: int = 0

    @property
    def failure_share(self) -> float | None:
        """Share of the rows the pipeline has attempted that it could not caption, or None when
        it has attempted none. Attempted: captioned by it, or recorded in the failure ledger."""
        attempted = self.captioned_by_pipeline + self.failed_retrying + self.given_up
        if attempted == 0:
            return None
        return (self.failed_retrying + self.given_up) / attempted


class SummaryRows:
    """Aggregates over the items table, the failure ledger and the embeddings, by user."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def user_items(self, users: Iterable[str], *, max_attempts: int) -> dict[str, UserItems]:
        """Each listed user's items as they are now (users without items get zeros)."""
        wanted = sorted(set(users))
        if not wanted:
            return {}
        empty = "COALESCE(i.metadata->>'caption', '') = ''"
        query = sql.SQL(
            "SELECT i.user_id, count(*),"
            " sum(CASE WHEN {empty} THEN 0 ELSE 1 END),"
            " sum(CASE WHEN NOT {empty} AND i.metadata->>'caption_model' IS NOT NULL"
            " THEN 1 ELSE 0 END),"
            " sum(CASE WHEN {empty} AND f.item_id IS NULL THEN 1 ELSE 0 END),"
            " sum(CASE WHEN {empty} AND f.item_id IS NOT NULL AND NOT f.permanent"
            " AND f.attempts < %(max_attempts)s THEN 1 ELSE 0 END),"
            " sum(CASE WHEN {empty} AND f.item_id IS NOT NULL AND (f.permanent"
            " OR f.attempts >= %(max_attempts)s) THEN 1 ELSE 0 END),"
            " sum(CASE WHEN NOT {empty} AND e.item_id IS NOT NULL THEN 1 ELSE 0 END),"
            " sum(CASE WHEN {stale} THEN 1 ELSE 0 END),"
            " sum(CASE WHEN {stale} AND {flagged} THEN 1 ELSE 0 END)"
            " FROM {items} i"
            " LEFT JOIN {failures} f ON f.source_table = %(src)s AND f.item_id = i.id::text"
            " LEFT JOIN {embeddings} e ON e.source_table = %(src)s AND e.item_id = i.id::text"
            " WHERE i.user_id = ANY(%(users)s::text[]) AND i.status = 'active'"
            " AND i.image IS NOT NULL AND i.image <> ''"
            " GROUP BY i.user_id"
        ).format(
            empty=sql.SQL(empty),
            stale=STALE,
            flagged=FLAGGED,
            items=self.db.items,
            failures=self.db.t("enrich_failures"),
            embeddings=self.db.t("enrich_embeddings"),
        )
        params = {"src": self.db.source_table, "users": wanted, "max_attempts": max_attempts}
        with self.db.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        found = {str(r[0]): UserItems(str(r[0]), *(int(v or 0) for v in r[1:])) for r in rows}
        return {u: found.get(u, UserItems(u)) for u in wanted}

    def existing_users(self, users: Iterable[str]) -> set[str]:
        """The listed user ids that have at least one row in the items table."""
        wanted = sorted(set(users))
        if not wanted:
            return set()
        query = sql.SQL(
            "SELECT DISTINCT user_id FROM {items} WHERE user_id = ANY(%(users)s::text[])"
        ).format(items=self.db.items)
        with self.db.connection() as conn:
            return {str(r[0]) for r in conn.execute(query, {"users": wanted})}

    def server_version(self) -> str:
        """The server as it names itself, short: "PostgreSQL 18.4", "Greenplum 6.26.0
        (PostgreSQL 9.4.26)", "AnalyticDB ... (PostgreSQL 12.12)"."""
        with self.db.connection() as conn:
            row = conn.execute("SELECT version()").fetchone()
        return short_version(str(row[0]) if row else "")


def short_version(text: str) -> str:
    """``version()``'s first words: the product and its version, with PostgreSQL's beside."""
    words = text.replace(",", " ").split()
    base = " ".join(words[:2]) if len(words) >= 2 else text
    for product in ("Greenplum", "AnalyticDB", "Cloudberry"):
        if product in text:
            start = text.index(product)
            tail = text[start:].replace("(", " ").replace(")", " ").replace(",", " ").split()
            name = " ".join(tail[:3] if len(tail) > 2 and tail[1] == "Database" else tail[:2])
            return f"{name} ({base})"
    return base
