"""The partial indexes on pending and on pending-or-stale rows: the planner can use them for the
queries of every ENRICH_ON_IMAGE_CHANGE mode, on every server."""

from __future__ import annotations

import pytest
from psycopg import sql

from enrich_pipeline.db.pending import (
    OnImageChange,
    not_given_up,
    pending_rows,
    stale_rows,
    work_rows,
)
from enrich_pipeline.db.pending_index import INDEX_SUFFIX
from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.helpers import Items

INDEX = f"items{INDEX_SUFFIX}"
PENDING_INDEX = "items_enrich_pending_idx"


def seed(items: Items, rows: int) -> None:
    """``rows`` rows of 50 users: 1% pending, 1% stale, the rest captioned from their image."""
    items.execute(
        "INSERT INTO {items} (user_id, image, status, metadata)"
        " SELECT 'u' || (g %% 50), '/img/' || g || '.jpg', 'active', CASE"
        " WHEN g %% 100 = 0 THEN '{{}}'::jsonb"
        ' WHEN g %% 100 = 1 THEN (\'{{"caption": "c", "caption_image_digest": "\''
        " || md5('/img/old.jpg') || '\"}}')::jsonb"
        ' ELSE (\'{{"caption": "c", "caption_image_digest": "\''
        " || md5('/img/' || g || '.jpg') || '\"}}')::jsonb END"
        " FROM generate_series(1, %s) AS g",
        (rows,),
    )


def plan(store: Store, where: sql.Composable) -> str:
    query = sql.SQL(
        "EXPLAIN SELECT i.user_id, count(*) FROM {items} i WHERE {where}"
        " AND {alive} GROUP BY i.user_id"
    ).format(items=store.db.items, where=where, alive=not_given_up(store.db))
    with store.db.connection() as conn:
        # Whether the index can serve the query (its predicate implied), not whether it is
        # cheapest today: the benchmark measures that on a million rows.
        conn.execute("SET enable_seqscan = off")
        rows = conn.execute(query, {"src": store.db.source_table, "max_attempts": 3})
        text = "\n".join(r[0] for r in rows)
        conn.execute("RESET enable_seqscan")
    return text


def test_the_indexes_serve_pending_and_stale_queries(items: Items) -> None:
    seed(items, 20_000)
    # A table set up by an earlier version: the pending-only index is there already.
    items.execute(
        f"CREATE INDEX {PENDING_INDEX} ON {{items}} (user_id) WHERE status = 'active'"
        " AND COALESCE(metadata->>'caption', '') = '' AND image IS NOT NULL AND image <> ''"
    )
    with Store(items.settings) as store:
        store.setup()
        assert store.readiness is not None and store.readiness.pending_index
        names = items.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'items'"
            " AND indexname LIKE %s ORDER BY 1",
            (items.namespace, "items_enrich_%"),
        )
        assert names == [(PENDING_INDEX,), (INDEX,)]
        items.execute("ANALYZE {items}")
        # Pending-only queries read the lean pending index; the others the pending-and-stale one.
        assert PENDING_INDEX in plan(store, pending_rows(store.db))
        for name, where in {
            "stale": stale_rows(store.db),
            "recaption": work_rows(store.db, "recaption"),
            "flag": work_rows(store.db, "flag"),
        }.items():
            assert INDEX in plan(store, where), name
        assert store.items.count_stale().stale == 200
        assert sum(n for _, n in store.items.users_with_pending(3)) == 200
        assert sum(n for _, n in store.items.users_with_pending(3, stale="recaption")) == 400


def test_a_predicate_the_index_does_not_cover_is_not_served_by_it(items: Items) -> None:
    """The check above means something: a query outside the predicate gets no index scan."""
    seed(items, 2_000)
    with Store(items.settings) as store:
        store.setup()
        unserved = plan(store, sql.SQL("i.status = 'active'"))
        assert INDEX not in unserved and PENDING_INDEX not in unserved


@pytest.mark.parametrize("mode", ["recaption", "flag", "ignore"])
def test_every_mode_lists_and_counts_its_work(items: Items, mode: OnImageChange) -> None:
    seed(items, 1_000)  # user u0: 10 pending rows; user u1: 10 stale rows
    with Store(items.settings) as store:
        store.setup()
        users = dict(store.items.users_with_pending(3, stale=mode))
        fingerprints = store.items.pending_fingerprints(3, stale=mode)
        claimable = {
            u: store.items.pending_ids(u, limit=None, max_attempts=3, stale=mode)
            for u in ("u0", "u1")
        }
        counts = {u: store.items.count_pending(u, max_attempts=3, stale=mode) for u in claimable}
    # Work for the sensor: stale rows too, except with ignore.
    assert users == ({"u0": 10} if mode == "ignore" else {"u0": 10, "u1": 10})
    assert {u: int(f.split("-")[0]) for u, f in fingerprints.items()} == users
    # Claimed by runs: stale rows only to re-caption them (flag mode flags them in place).
    assert {u: len(ids) for u, ids in claimable.items()} == counts
    assert counts == {"u0": 10, "u1": 10 if mode == "recaption" else 0}
