"""The whole items table at a glance, every user: what the ``items_table`` asset's observations
state (items, captioned, pending, stale, given up, by caption model and languages).

Two statements, each one pass over the items table: the counts (the failure ledger and the
embeddings joined by key, summed per user, then over users) and the captioned rows counted by
model and language. Portable SQL
(no ``FILTER``, LATERAL, ``jsonb_build_object``, ``jsonb ||``): AnalyticDB 6.0 (Greenplum 6,
PostgreSQL 9.4) runs them as they are; ``benchmarks/overview.py`` times them at a million rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db
from enrich_pipeline.db.pending import STALE

_ELIGIBLE = "i.status = 'active' AND i.image IS NOT NULL AND i.image <> ''"
_EMPTY = "COALESCE(i.metadata->>'caption', '') = ''"
# The caption languages a row was captioned in: the keys of ``caption_i18n``; a caption from
# before languages were recorded counts under ``UNRECORDED``.
UNRECORDED = "(not recorded)"
_LANGUAGES = (
    "CASE WHEN jsonb_typeof(i.metadata->'caption_i18n') = 'object'"
    " THEN i.metadata->'caption_i18n' ELSE '{{\"" + UNRECORDED + "\": null}}'::jsonb END"
)


@dataclass(frozen=True)
class ModelLanguage:
    """Rows captioned by the pipeline with one model in one language (a row captioned in two
    languages counts under each)."""

    model: str
    language: str
    rows: int


@dataclass(frozen=True)
class TableFigures:
    """The items table as it is now, every user."""

    # Every row, whatever its status or image.
    rows: int = 0
    # Active rows with an image: the rows the pipeline is for.
    items: int = 0
    captioned: int = 0
    captioned_by_pipeline: int = 0
    # Without a caption and not given up (claimed ones included): what runs would take.
    pending: int = 0
    failing_retried: int = 0
    given_up: int = 0
    embedded: int = 0
    stale: int = 0
    users: int = 0
    users_with_pending: int = 0
    by_model_language: tuple[ModelLanguage, ...] = ()

    @property
    def coverage(self) -> float | None:
        """Share of the items that have a caption (None for a table without items)."""
        return self.captioned / self.items if self.items else None


class OverviewRows:
    """The whole-table figures (``Store.overview``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @retry_db
    def figures(self, *, max_attempts: int) -> TableFigures:
        """Every figure of :class:`TableFigures`, read in one transaction (one snapshot)."""
        # Each row's facts, summed per user (a hash of users, not a sort of every row), then
        # over users.
        counts = sql.SQL(
            "SELECT sum(n), sum(e), sum(c), sum(cp), sum(p), sum(fr), sum(g), sum(em), sum(s),"
            " sum(CASE WHEN u IS NOT NULL AND e > 0 THEN 1 ELSE 0 END),"
            " sum(CASE WHEN u IS NOT NULL AND p > 0 THEN 1 ELSE 0 END)"
            " FROM (SELECT u, count(*) AS n,"
            " sum(CASE WHEN el THEN 1 ELSE 0 END) AS e,"
            " sum(CASE WHEN el AND NOT bare THEN 1 ELSE 0 END) AS c,"
            " sum(CASE WHEN el AND NOT bare AND modelled THEN 1 ELSE 0 END) AS cp,"
            " sum(CASE WHEN el AND bare AND NOT gone THEN 1 ELSE 0 END) AS p,"
            " sum(CASE WHEN el AND bare AND failed AND NOT gone THEN 1 ELSE 0 END) AS fr,"
            " sum(CASE WHEN el AND bare AND gone THEN 1 ELSE 0 END) AS g,"
            " sum(CASE WHEN el AND NOT bare AND embedded THEN 1 ELSE 0 END) AS em,"
            " sum(CASE WHEN stale THEN 1 ELSE 0 END) AS s"
            " FROM (SELECT i.user_id AS u, COALESCE({eligible}, false) AS el,"
            " {empty} AS bare, i.metadata->>'caption_model' IS NOT NULL AS modelled,"
            " f.item_id IS NOT NULL AS failed,"
            " COALESCE(f.permanent OR f.attempts >= %(max_attempts)s, false) AS gone,"
            " m.item_id IS NOT NULL AS embedded, COALESCE({stale}, false) AS stale"
            " FROM {items} i"
            " LEFT JOIN {failures} f ON f.source_table = %(src)s AND f.item_id = i.id::text"
            " LEFT JOIN {embeddings} m ON m.source_table = %(src)s AND m.item_id = i.id::text"
            ") AS facts GROUP BY u) AS r"
        ).format(
            eligible=sql.SQL(_ELIGIBLE),
            empty=sql.SQL(_EMPTY),
            stale=STALE,
            items=self.db.items,
            failures=self.db.t("enrich_failures"),
            embeddings=self.db.t("enrich_embeddings"),
        )
        # A set-returning function in the select list: one row per (row, language), no
        # correlated subquery per row (four times slower at a million rows).
        by_model = sql.SQL(
            "SELECT model, language, count(*) FROM (SELECT i.metadata->>'caption_model' AS model,"
            f" jsonb_object_keys({_LANGUAGES}) AS language"
            " FROM {items} i WHERE {eligible} AND NOT {empty}"
            " AND i.metadata->>'caption_model' IS NOT NULL) AS r"
            " GROUP BY model, language ORDER BY model, count(*) DESC, language"
        ).format(items=self.db.items, eligible=sql.SQL(_ELIGIBLE), empty=sql.SQL(_EMPTY))
        params = {"src": self.db.source_table, "max_attempts": max_attempts}
        with self.db.connection() as conn:
            # One snapshot for both statements, so their figures agree.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = conn.execute(counts, params).fetchone()
            groups = conn.execute(by_model).fetchall()
        n = [int(v or 0) for v in (row or ())] or [0] * 11
        return TableFigures(
            rows=n[0],
            items=n[1],
            captioned=n[2],
            captioned_by_pipeline=n[3],
            pending=n[4],
            failing_retried=n[5],
            given_up=n[6],
            embedded=n[7],
            stale=n[8],
            users=n[9],
            users_with_pending=n[10],
            by_model_language=tuple(
                ModelLanguage(str(m), str(lang), int(c)) for m, lang, c in groups
            ),
        )

    @retry_db
    def changes(self) -> int | None:
        """Rows inserted, updated or deleted in the items table and in the pipeline's tables
        that the figures read (failure ledger, embeddings, spend ledger), as the server's
        statistics count them (``pg_stat_user_tables``): read at once, where a pass over the
        table takes seconds at a million rows, so a sensor can see that nothing changed without
        the pass. None where the server counts nothing for them (Greenplum counts on its
        segments, not here: the caller then relies on finished runs and age)."""
        query = sql.SQL(
            "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables"
            " WHERE schemaname = %(ns)s AND relname = ANY(%(tables)s::text[])"
        )
        tables = [self.db.settings.table, "enrich_failures", "enrich_embeddings", "enrich_spend"]
        params = {"ns": self.db.namespace, "tables": tables}
        with self.db.connection() as conn:
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row and row[0] else None
