"""Which rows of the items table are pending or stale, and the queries that list and count them.

A row is pending when it is active, has an image and no caption yet (or, re-captioning, a
caption by another model or prompt version). It is **stale** when the pipeline captioned it
(``caption_image_digest`` recorded), its caption is still the pipeline's (``md5(caption)``
matches ``caption_text_digest``, or no text digest was recorded) and its ``image`` has changed
since: ``md5(image)`` no longer matches the image digest (``enrichment.records.image_digest``).
Captions without the image digest (people's, and the pipeline's from before digests until
adopted, :mod:`.stale`) and captions a person edited are never stale, nor re-captioned.

What is done with stale rows is ``ENRICH_ON_IMAGE_CHANGE`` (``RunSettings.on_image_change``):
``recaption`` takes them like pending rows; ``flag`` marks them ``caption_stale`` (no call), so
only the not yet flagged ones are work for the sensor; ``ignore`` leaves them. Every mode still
counts them (``count_stale``, ``summary``).

A row is left alone while a live claim holds it or once the failure ledger gives it up. The
predicates here are shared by these queries, the claims (:mod:`.claims`), the index
(:mod:`.pending_index`, whose predicate is "pending or stale" so that every mode's queries can
use it) and the asset-check figures (:mod:`.checks`). Portable SQL: ``md5(text)`` and
``jsonb ?`` exist on PostgreSQL 9.4, Greenplum 6 included.
"""

from __future__ import annotations

from typing import Literal

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db

OnImageChange = Literal["recaption", "flag", "ignore"]
RECAPTION, FLAG, IGNORE = "recaption", "flag", "ignore"

# What every row the pipeline works on is; ``{a}`` is the items table's alias ("i." or "").
_ELIGIBLE = "{a}status = 'active' AND {a}image IS NOT NULL AND {a}image <> ''"
_UNCAPTIONED = "COALESCE({a}metadata->>'caption', '') = ''"
# The caption is still the text the pipeline wrote: a person's edit changes the caption, not
# the digest recorded with it, and makes the caption theirs. Captions written before text
# digests carry none and count as the pipeline's (``--adopt`` records one, :mod:`.stale`): a
# plain OR of the row's own columns, so the partial index keeps it and the tick stays an
# index-only scan.
_PIPELINES = (
    "(NOT {a}metadata ? 'caption_text_digest'"
    " OR md5({a}metadata->>'caption') = {a}metadata->>'caption_text_digest')"
)
# Disjoint from pending (a caption is there), so that counts add up.
_CHANGED = (
    "COALESCE({a}metadata->>'caption', '') <> '' AND {a}metadata ? 'caption_image_digest'"
    " AND md5({a}image) <> {a}metadata->>'caption_image_digest' AND " + _PIPELINES
)
_FLAGGED = "{a}metadata->>'caption_stale' = 'true'"


def _text(template: str, alias: str = "i.") -> str:
    return template.format(a=alias)


def index_predicate() -> str:
    """The partial index's predicate, "pending or stale", spelled as the queries spell it (the
    planner proves a query's WHERE implies it: pending-only queries match its first arm)."""
    return f"{_text(_ELIGIBLE, '')} AND ({_text(_UNCAPTIONED, '')} OR ({_text(_CHANGED, '')}))"


def pending_index_predicate() -> str:
    """The pending-only index's predicate, spelled as ``pending_rows`` spells it."""
    return f"{_text(_ELIGIBLE, '')} AND {_text(_UNCAPTIONED, '')}"


_PENDING = sql.SQL(f"{_text(_ELIGIBLE)} AND {_text(_UNCAPTIONED)}")
# Pending or stale, the index's predicate: what a recaption-mode run takes.
_PENDING_OR_STALE = sql.SQL(
    f"{_text(_ELIGIBLE)} AND ({_text(_UNCAPTIONED)} OR ({_text(_CHANGED)}))"
)
# Pending, or stale and not yet flagged: what the sensor counts as work in flag mode.
_PENDING_OR_UNFLAGGED = sql.SQL(
    f"{_text(_ELIGIBLE)} AND ({_text(_UNCAPTIONED)} OR ({_text(_CHANGED)}"
    f" AND COALESCE({_text(_FLAGGED)}, false) = false))"
)
STALE = sql.SQL(f"{_text(_ELIGIBLE)} AND {_text(_CHANGED)}")
FLAGGED = sql.SQL(_text(_FLAGGED))
# The row's caption is the pipeline's (``caption_text_digest`` absent or matching): only such a
# caption is ever replaced (stale rows, re-captioning, the conditional write in :mod:`.writes`).
PIPELINES_CAPTION = sql.SQL(_text(_PIPELINES))

_RECAPTION = sql.SQL(
    f"{_text(_ELIGIBLE)}"
    " AND COALESCE(i.metadata->>'caption', '') <> '' AND i.metadata ? 'caption_model'"
    " AND (i.metadata->>'caption_model' IS DISTINCT FROM %(rc_model)s"
    " OR i.metadata->>'caption_prompt_version' IS DISTINCT FROM %(rc_prompt)s)"
    f" AND {_text(_PIPELINES)}"
)


def pending_rows(db: Database) -> sql.Composable:
    """Pending rows the pipeline can address: without a unique index on id, rows with a
    NULL id or an id shared with another row are left out (preflight reports them)."""
    return _addressable_only(db, _PENDING)


def stale_rows(db: Database) -> sql.Composable:
    """Stale rows the pipeline can address (see the module's docstring)."""
    return _addressable_only(db, STALE)


def work_rows(db: Database, stale: OnImageChange) -> sql.Composable:
    """The rows that are work for ``ENRICH_ON_IMAGE_CHANGE=stale``: pending ones, and stale
    ones with ``recaption`` (those not flagged yet with ``flag``: the run that flags them is
    work, although it calls no model)."""
    rows = {RECAPTION: _PENDING_OR_STALE, FLAG: _PENDING_OR_UNFLAGGED}.get(stale, _PENDING)
    return _addressable_only(db, rows)


def _addressable_only(db: Database, rows: sql.Composable) -> sql.Composable:
    if db.dialect.ids_unique:
        return rows
    return rows + _addressable(db)


def _addressable(db: Database) -> sql.Composable:
    return sql.SQL(
        " AND i.id IS NOT NULL AND (SELECT count(*) FROM {items} d WHERE d.id = i.id) = 1"
    ).format(items=db.items)


def selected_rows(
    db: Database, recaption: tuple[str, str] | None, stale: OnImageChange = IGNORE
) -> tuple[sql.Composable, dict]:
    """The rows a run claims: pending ones (and stale ones with ``stale="recaption"``), or
    those due for re-captioning on a model or prompt change. In flag mode stale rows are not
    claimed: the run flags them in one statement (``StaleRows.flag_stale``)."""
    if recaption is None:
        return work_rows(db, RECAPTION if stale == RECAPTION else IGNORE), {}
    return _addressable_only(db, _RECAPTION), {
        "rc_model": recaption[0],
        "rc_prompt": recaption[1],
    }


def plan_with_index(conn: psycopg.Connection, stale: OnImageChange) -> None:
    """Before a statement over pending and stale rows: no sequential scan in this transaction.

    The planner cannot know that ``md5(image) <> metadata->>'caption_image_digest'`` holds for
    few rows: it estimates nearly every captioned row stale, finds an index scan fetching most
    of the table dearer than a sequential scan, and reads the whole table (a million rows: about
    0.7 s a sensor tick, ``benchmarks.stale_tick``), while the partial index holds only the few
    rows it needs. ``SET LOCAL`` ends with the transaction; without the index the table is
    still scanned, as before. Pending-only statements are estimated well and left alone.
    """
    if stale != IGNORE:
        conn.execute("SET LOCAL enable_seqscan = off")


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
    def users_with_pending(
        self, max_attempts: int, *, stale: OnImageChange = IGNORE
    ) -> list[tuple[str, int]]:
        """Users with work, and how many rows (stale ones as ``work_rows`` says)."""
        query = sql.SQL(
            "SELECT i.user_id, count(*) FROM {items} i WHERE {pending} AND i.user_id IS NOT NULL"
            " AND {alive} GROUP BY i.user_id ORDER BY i.user_id"
        ).format(
            items=self.db.items, pending=work_rows(self.db, stale), alive=not_given_up(self.db)
        )
        with self.db.connection() as conn:
            plan_with_index(conn, stale)
            rows = conn.execute(query, {"src": self.db.source_table, "max_attempts": max_attempts})
            return [(str(u), int(n)) for u, n in rows]

    def pending_fingerprints(
        self, max_attempts: int, *, stale: OnImageChange = IGNORE
    ) -> dict[str, str]:
        """Per user with work (pending rows, and stale ones as ``work_rows`` says), a short
        value that changes when that set does.

        New rows (count, newest ``updated_at``) and new failed attempts change it; a run that
        leaves the set as it was does not, so the sensor does not loop on rows it cannot do.
        """
        # "<count>-<newest updated_at in microseconds>" made by the server: at 100,000 users,
        # reading each newest updated_at as a datetime and formatting it took the sensor's tick
        # about a third of a second (benchmarks/scale.py).
        rows_sql = sql.SQL(
            "SELECT i.user_id, count(*)::text || '-' ||"
            " coalesce(round(extract(epoch FROM max(i.updated_at)) * 1000000), 0)::bigint::text"
            " FROM {items} i WHERE {pending}"
            " AND i.user_id IS NOT NULL AND {alive} AND {unclaimed} GROUP BY i.user_id"
        ).format(
            items=self.db.items,
            pending=work_rows(self.db, stale),
            alive=not_given_up(self.db),
            unclaimed=unclaimed(self.db),
        )
        attempts_sql = sql.SQL(
            "SELECT user_id, sum(attempts) FROM {f} WHERE source_table = %(src)s"
            " AND NOT permanent AND attempts < %(max_attempts)s GROUP BY user_id"
        ).format(f=self.db.t("enrich_failures"))
        params = {"src": self.db.source_table, "max_attempts": max_attempts}
        with self.db.connection() as conn:
            plan_with_index(conn, stale)
            rows = conn.execute(rows_sql, params).fetchall()
            attempts = dict(conn.execute(attempts_sql, params).fetchall())
        if not attempts:
            return {str(user): f"{head}-0" for user, head in rows}
        return {str(user): f"{head}-{attempts.get(user, 0)}" for user, head in rows}

    @retry_db
    def pending_ids(
        self,
        user_id: str,
        *,
        limit: int | None,
        max_attempts: int,
        recaption: tuple[str, str] | None = None,
        stale: OnImageChange = IGNORE,
    ) -> list[str]:
        """Ids of the user's pending rows not claimed by a live run, oldest id first; with
        ``stale="recaption"`` its stale rows too.

        With ``recaption=(model, prompt_version)``: the user's rows captioned by the pipeline
        with another model or prompt version instead.
        """
        selection, extra = selected_rows(self.db, recaption, stale)
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
            plan_with_index(conn, stale if recaption is None else IGNORE)
            return [r[0] for r in conn.execute(query, params)]

    @retry_db
    def count_pending(
        self,
        user_id: str,
        *,
        max_attempts: int,
        recaption: tuple[str, str] | None = None,
        stale: OnImageChange = IGNORE,
    ) -> int:
        """The rows ``pending_ids`` would list, claimed ones included."""
        selection, extra = selected_rows(self.db, recaption, stale)
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
            plan_with_index(conn, stale if recaption is None else IGNORE)
            row = conn.execute(query, params).fetchone()
            return int(row[0]) if row else 0
