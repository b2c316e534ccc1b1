"""An index whose definition changed is replaced on a deployment that has the old one: the
pending-and-stale index now leaves out captions a person edited, under a new name; setup builds
it and drops the one an earlier version built, and the planner serves stale rows from it."""

from __future__ import annotations

import hashlib

from psycopg import sql

from enrich_pipeline.db.pending import not_given_up, work_rows
from enrich_pipeline.db.pending_index import INDEX_SUFFIX
from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.helpers import Items

OLD_INDEX = "items_enrich_pending_stale_idx"
# The earlier version's definition, verbatim: no word of the caption's text digest.
OLD_PREDICATE = (
    "status = 'active' AND image IS NOT NULL AND image <> '' AND"
    " (COALESCE(metadata->>'caption', '') = '' OR (COALESCE(metadata->>'caption', '') <> ''"
    " AND metadata ? 'caption_image_digest'"
    " AND md5(image) <> metadata->>'caption_image_digest'))"
)


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def indexes(items: Items) -> list[str]:
    return [
        r[0]
        for r in items.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'items'"
            " AND indexname LIKE 'items_enrich_%%' ORDER BY 1",
            (items.namespace,),
        )
    ]


def test_an_upgraded_deployment_gets_the_new_index_and_loses_the_old(items: Items) -> None:
    for n in range(40):
        caption = "Edited by hand." if n % 2 else "The pipeline's caption."
        items.add(
            f"u{n % 4}",
            f"https://img.example.test/{n}-new.jpg",
            metadata={
                "caption": caption,
                "caption_image_digest": md5(f"https://img.example.test/{n}.jpg"),
                "caption_text_digest": md5("The pipeline's caption."),
            },
        )
    # The table as an earlier version left it: its two indexes, the stale one without the
    # text digest.
    items.execute(
        "CREATE INDEX items_enrich_pending_idx ON {items} (user_id) WHERE status = 'active'"
        " AND COALESCE(metadata->>'caption', '') = '' AND image IS NOT NULL AND image <> ''"
    )
    items.execute(
        f"CREATE INDEX {OLD_INDEX} ON {{items}} (user_id, updated_at, id) WHERE {OLD_PREDICATE}"
    )
    new_index = f"items{INDEX_SUFFIX}"
    assert new_index not in indexes(items) and OLD_INDEX in indexes(items)

    with Store(items.settings) as store:
        store.setup()
        assert store.readiness is not None and store.readiness.pending_index
        assert indexes(items) == ["items_enrich_pending_idx", new_index]
        predicate = items.execute(
            "SELECT pg_get_expr(x.indpred, x.indrelid) FROM pg_index x"
            " WHERE x.indexrelid = to_regclass(%s)",
            (f"{items.namespace}.{new_index}",),
        )[0][0]
        assert "caption_text_digest" in predicate
        # Served by the new index, which holds only the unedited half.
        query = sql.SQL(
            "SELECT i.user_id, count(*) FROM {items} i WHERE {work} AND {alive} GROUP BY i.user_id"
        ).format(
            items=store.db.items,
            work=work_rows(store.db, "recaption"),
            alive=not_given_up(store.db),
        )
        params = {"src": store.db.source_table, "max_attempts": 3}
        with store.db.connection() as conn:
            conn.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN ") + query, params))
            counted = sum(n for _, n in conn.execute(query, params))
        assert new_index in plan and OLD_INDEX not in plan
        assert counted == 20
        # Set up again: nothing left to build or drop.
        assert store.items.ensure_pending_index()
    assert indexes(items) == ["items_enrich_pending_idx", new_index]
