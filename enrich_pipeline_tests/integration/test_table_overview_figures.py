"""The whole-table figures and the spend ledger, read from a real server (every profile)."""

from __future__ import annotations

import hashlib

import pytest

from enrich_pipeline.db.spend import CAPTIONS, DAGSTER, SpendRow
from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.helpers import Items


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - the pipeline's digest


def _captioned(image: str, caption: str, model: str, languages: dict[str, str]) -> dict:
    return {
        "caption": caption,
        "caption_model": model,
        "caption_i18n": languages,
        "caption_image_digest": _md5(image),
        "caption_text_digest": _md5(caption),
    }


def test_figures_count_every_user_of_the_table(items: Items, store: Store) -> None:
    a1 = items.add("ann", "a1.jpg", metadata=_captioned("a1.jpg", "a cat", "m1", {"en": "a cat"}))
    items.add("ann", "a2.jpg", metadata=_captioned("a2.jpg", "a dog", "m1", {"en": "a dog"}))
    items.add("bob", "b1.jpg", metadata=_captioned("b1.jpg", "a cup", "m2", {"en": "x", "zh": "y"}))
    # Someone's own caption: captioned, not by the pipeline.
    items.add("bob", "b2.jpg", metadata={"caption": "typed by a person"})
    pending = items.add("bob", "b3.jpg")
    retried = items.add("cyd", "c1.jpg")
    gone = items.add("cyd", "c2.jpg")
    # Not the pipeline's business: inactive, or without an image.
    items.add("dan", "d1.jpg", status="deleted")
    items.add("dan", None)
    # A captioned row whose image changed since: stale.
    items.execute("UPDATE {items} SET image = 'a1-new.jpg' WHERE id::text = %s", (a1,))
    items.execute(
        "INSERT INTO {ns}.enrich_failures (source_table, item_id, user_id, attempts, permanent,"
        " error_code, last_error) VALUES (%s, %s, 'cyd', 1, false, 'timeout', 'slow'),"
        " (%s, %s, 'cyd', 1, true, 'InvalidParameter', 'bad image')",
        (store.source_table, retried, store.source_table, gone),
    )
    items.execute(
        "INSERT INTO {ns}.enrich_embeddings (source_table, item_id, user_id, model, dimensions,"
        " embedding) VALUES (%s, %s, 'ann', 'e', 2, ARRAY[0.1, 0.2]::real[])",
        (store.source_table, a1),
    )

    f = store.overview.figures(max_attempts=3)

    assert (f.rows, f.items, f.captioned, f.captioned_by_pipeline) == (9, 7, 4, 3)
    # The retried row is still pending; the given-up one is not.
    assert (f.pending, f.failing_retried, f.given_up) == (2, 1, 1)
    assert (f.embedded, f.stale) == (1, 1)
    assert (f.users, f.users_with_pending) == (3, 2)
    assert f.coverage == pytest.approx(4 / 7)
    # By model and language: bob's row in two languages counts under each.
    groups = {(g.model, g.language): g.rows for g in f.by_model_language}
    assert groups == {("m1", "en"): 2, ("m2", "en"): 1, ("m2", "zh"): 1}
    assert pending and retried


def test_empty_table_has_no_coverage(items: Items, store: Store) -> None:
    f = store.overview.figures(max_attempts=3)
    assert (f.rows, f.items, f.users) == (0, 0, 0)
    assert f.coverage is None and f.by_model_language == ()


def test_spend_is_summed_by_currency_and_recorded_once(items: Items, store: Store) -> None:
    rows = [
        SpendRow("run-1", "ann", DAGSTER, "qwen3-vl-plus", 100, 20, 5, 0.25, "USD"),
        SpendRow("run-1", "bob", DAGSTER, "qwen3-vl-plus", 50, 10, 0, 0.5, "USD"),
        SpendRow("cli-1", "", CAPTIONS, "qwen3-vl-plus", 10, 1, 0, 2.0, "CNY"),
        # A model without a price: tokens counted, no cost.
        SpendRow("run-2", "ann", DAGSTER, "my-local-vl", 7, 3, 0, None, "USD"),
    ]
    assert store.spend.record(rows) == 4
    # A step re-executed records nothing twice.
    assert store.spend.record(rows[:1]) == 0

    spend = store.spend.to_date()

    by = {s.currency: s for s in spend.by_currency}
    assert set(by) == {"CNY", "USD"}
    assert by["USD"].cost == pytest.approx(0.75) and by["USD"].unpriced_runs == 1
    assert by["CNY"].cost == pytest.approx(2.0) and by["CNY"].runs == 1
    assert by["USD"].tokens == 125 + 60 + 10
    models = {(m.models, m.currency): m for m in spend.by_model}
    assert models[("my-local-vl", "USD")].cost is None
    assert models[("qwen3-vl-plus", "USD")].runs == 2
    assert spend.since is not None
    stored = items.execute("SELECT count(*) FROM {ns}.enrich_spend")
    assert stored == [(4,)]
