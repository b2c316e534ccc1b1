"""A row's image reference, read for the search page's thumbnails (never sent to a browser)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database


@dataclass(frozen=True)
class ItemImage:
    """What the items table holds for one row: its image reference (None when NULL)."""

    image: str | None


class ItemImageRows:
    """Reads of the items table's ``image`` column by row (its id and user)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # Not retried through an outage (retry_db): a page waiting 30 s per picture helps nobody;
    # the thumbnail says the database failed and the next search tries again.
    def image_of(self, user_id: str, item_id: str) -> ItemImage | None:
        """The row's image reference, or None when no row has that id and user (or the id is
        not one the id column's type can hold)."""
        query = sql.SQL(
            "SELECT i.image FROM {items} i WHERE {match} AND i.user_id = %(user)s LIMIT 1"
        ).format(items=self.db.items, match=self.db.id_match("ids"))
        try:
            with self.db.connection() as conn:
                row = conn.execute(query, {"ids": [item_id], "user": user_id}).fetchone()
        except psycopg.errors.DataError:  # "abc" for a bigint id: no such row, not a fault
            return None
        if row is None:
            return None
        return ItemImage(row[0] if isinstance(row[0], str) else None)
