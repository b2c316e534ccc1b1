"""The failure ledger (table ``enrich_failures``): what failed, how often, whether for good.

Rows are recorded and cleared by the chunk write (:mod:`.writes`), in its transaction; here they
are read for reports and forgotten on request.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.redaction import scrub_secrets


@dataclass(frozen=True)
class LedgerEntry:
    item_id: str
    attempts: int
    permanent: bool
    error_code: str
    last_error: str


class FailureLedger:
    """The failure-ledger statements (part of ``ItemRows``)."""

    db: Database

    def failures(self, user_id: str | None = None) -> list[LedgerEntry]:
        query = sql.SQL(
            "SELECT item_id, attempts, permanent, error_code, last_error FROM {f}"
            " WHERE source_table = %(src)s AND (%(user)s::text IS NULL OR user_id = %(user)s)"
            " ORDER BY last_failed_at DESC, item_id"
        ).format(f=self.db.t("enrich_failures"))
        with self.db.connection() as conn:
            rows = conn.execute(query, {"src": self.db.source_table, "user": user_id})
            # Scrubbed as read too: a row written by an older version may quote a secret.
            return [LedgerEntry(*r[:4], scrub_secrets(r[4]) if r[4] else r[4]) for r in rows]

    def reset_failures(self, user_id: str | None = None) -> int:
        """Forget recorded failures so those rows are pending again (the "retry failed" action)."""
        query = sql.SQL(
            "DELETE FROM {f} WHERE source_table = %(src)s"
            " AND (%(user)s::text IS NULL OR user_id = %(user)s)"
        ).format(f=self.db.t("enrich_failures"))
        with self.db.connection() as conn:
            return conn.execute(query, {"src": self.db.source_table, "user": user_id}).rowcount
