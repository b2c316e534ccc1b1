"""The stages end to end against the real PostgreSQL and the stand-in DashScope server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.base import FatalProviderError
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings, RunSettings
from enrich_pipeline_tests.helpers import Items, mean_of
from enrich_pipeline_tests.standin import StandIn

LOCAL = ImagePolicy(allow_local_files=True)


def engine(store: Store, api: DashScopeSettings, **run: object) -> Engine:
    return Engine(store, DashScopeProvider(api), api, RunSettings(**run), image_policy=LOCAL)


def test_only_pending_active_image_rows_of_the_user_are_touched(
    items: Items, store: Store, api_settings: DashScopeSettings, image_dir: Path
) -> None:
    blue = str(image_dir / "blue.jpg")
    target = items.add("alice", blue, metadata={"title": "chair", "price": 12})
    null_metadata = items.add("alice", str(image_dir / "red.jpg"), metadata=None)
    untouched = [
        items.add("alice", blue, metadata={"caption": "hand written"}),
        items.add("alice", blue, status="deleted"),
        items.add("alice", None),
        items.add("alice", ""),
        items.add("bob", blue),
    ]
    before = {i: items.row(i) for i in untouched}

    stats = engine(store, api_settings).enrich("alice")

    assert (stats.total, stats.succeeded, stats.failed, stats.skipped) == (2, 2, 0, 0)
    assert items.row(null_metadata)["metadata"]["dominant_colors"][0] == "red"
    assert {i: items.row(i) for i in untouched} == before
    md = items.row(target)["metadata"]
    assert md["title"] == "chair" and md["price"] == 12
    assert md["caption"] and "blue" in md["caption"]
    assert md["dominant_colors"][0] == "blue"
    assert md["style_tags"] and md["object_tags"]
    assert md["caption_model"] == api_settings.vision_model
    assert len(md["caption_generated_at"]) == len("2025-11-27T20:00:00.000000")
    emb = items.execute(
        "SELECT user_id, dimensions, array_length(embedding, 1)"
        " FROM {ns}.enrich_embeddings WHERE item_id = %s",
        (target,),
    )
    assert items.row(target)["updated_at"] > before[untouched[0]]["updated_at"]
    assert emb == [("alice", 1024, 1024)]


def test_caption_written_between_read_and_write_is_never_overwritten(
    items: Items, store: Store, api_settings: DashScopeSettings, image_dir: Path
) -> None:
    first = items.add("alice", str(image_dir / "blue.jpg"), metadata={"k": 1})
    second = items.add("alice", str(image_dir / "red.jpg"))
    provider = DashScopeProvider(api_settings)
    chunk = stages.claim_chunk(
        store, "alice", [first, second], worker="w1", lease_seconds=60, max_attempts=3
    )
    stages.visual_attributes(chunk, policy=LOCAL, max_image_side=512)
    stages.caption_chunk(chunk, provider)
    # Someone else captions the first row while our run is in flight.
    items.write_by_hand(first, caption="theirs")
    engine_ = engine(store, api_settings)
    result = stages.write_chunk(store, chunk, provenance=engine_.provenance, embedding_model=None)

    assert items.row(first)["metadata"] == {"k": 1, "caption": "theirs"}
    assert items.row(second)["metadata"]["caption"]
    status = {o.item_id: o.status for o in result.outcomes}
    assert status == {first: "skipped", second: "succeeded"}


def test_failed_rows_are_recorded_counted_and_given_up_after_max_attempts(
    items: Items, store: Store, api_settings: DashScopeSettings, image_dir: Path
) -> None:
    good = items.add("alice", str(image_dir / "green.jpg"))
    missing = items.add("alice", str(image_dir / "nope.jpg"))
    broken = items.add("alice", str(image_dir / "broken.jpg"))
    eng = engine(store, api_settings, max_attempts=2)

    stats = eng.enrich("alice")
    assert (stats.total, stats.succeeded, stats.failed) == (3, 1, 2)
    ledger = {e.item_id: e for e in store.items.failures("alice")}
    assert set(ledger) == {missing, broken}
    assert ledger[missing].attempts == 1 and ledger[missing].error_code
    assert "nope.jpg" in ledger[missing].last_error
    assert items.row(missing)["metadata"] == {} and items.row(broken)["metadata"] == {}
    assert items.row(good)["metadata"]["caption"]

    # Permanent errors (unreadable images) are out of the pending set at once.
    assert store.items.count_pending("alice", max_attempts=2) == 0
    assert eng.enrich("alice").total == 0
    # Until someone asks for them to be retried.
    assert store.items.reset_failures("alice") == 2
    assert store.items.count_pending("alice", max_attempts=2) == 2


def test_transient_failures_are_retried_by_later_runs_until_the_attempt_cap(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    item = items.add("alice", str(image_dir / "yellow.jpg"))
    standin.add_rule("500", color=mean_of(image_dir / "yellow.jpg"), tolerance=12)
    eng = engine(store, api_settings, max_attempts=2)
    assert eng.enrich("alice").failed == 1
    assert eng.enrich("alice").failed == 1
    (entry,) = store.items.failures("alice")
    assert (entry.item_id, entry.attempts, entry.permanent) == (item, 2, False)
    assert eng.enrich("alice").total == 0  # capped
    # Retries inside one run: 1 call + max_retries (3) per run, two runs.
    assert standin.count("chat") == 8


def test_moderation_is_permanent_and_not_retried(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    item = items.add("alice", str(image_dir / "magenta.jpg"))
    standin.add_rule("moderation", color=mean_of(image_dir / "magenta.jpg"), tolerance=12)
    stats = engine(store, api_settings).enrich("alice")
    assert stats.failed == 1 and stats.errors == {"moderation": 1}
    assert standin.count("chat") == 1
    (entry,) = store.items.failures("alice")
    assert entry.item_id == item and entry.permanent and entry.error_code == "moderation"


def test_no_caption_embedding_makes_no_embedding_call(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    stats = engine(store, api_settings, caption_embedding=False).enrich("alice")
    assert stats.succeeded == 1 and stats.embedded == 0 and stats.embedding_failed == 0
    assert standin.count("embeddings") == 0
    assert items.execute("SELECT count(*) FROM {ns}.enrich_embeddings") == [(0,)]


def test_invalid_key_stops_the_run_without_marking_rows(
    items: Items, store: Store, image_dir: Path, standin: StandIn
) -> None:
    ids = [items.add("alice", str(image_dir / "blue.jpg")) for _ in range(4)]
    bad = DashScopeSettings(api_key="sk-wrong", base_url=standin.base_url, timeout=5.0)
    with pytest.raises(FatalProviderError, match="DASHSCOPE_API_KEY"):
        engine(store, bad).enrich("alice")
    assert store.items.failures("alice") == []
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]
    assert all(items.row(i)["metadata"] == {} for i in ids)
    assert store.items.count_pending("alice", max_attempts=3) == 4


def test_metadata_that_is_not_an_object_fails_clearly_and_is_left_alone(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    item = items.add("alice", str(image_dir / "blue.jpg"), metadata=["a", "list"])
    stats = engine(store, api_settings).enrich("alice")
    assert stats.failed == 1 and stats.errors == {"metadata_not_object": 1}
    assert items.row(item)["metadata"] == ["a", "list"]
    assert standin.count("chat") == 0  # nothing paid for a row that cannot be written


def test_concurrent_claims_never_share_a_row(items: Items, store: Store, image_dir: Path) -> None:
    ids = [items.add("alice", str(image_dir / "blue.jpg")) for _ in range(6)]
    a, a_skipped = store.items.claim("alice", ids, worker="a", lease_seconds=60, max_attempts=3)
    b, b_skipped = store.items.claim("alice", ids, worker="b", lease_seconds=60, max_attempts=3)
    assert len(a) == 6 and a_skipped == []
    assert b == [] and b_skipped == ids
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == []
    # Another user's partition cannot claim alice's rows.
    store.items.release("alice", ids, worker="a")
    c, _ = store.items.claim("bob", ids, worker="c", lease_seconds=60, max_attempts=3)
    assert c == []


def test_duplicate_images_across_rows_and_users_cost_one_call(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    blue = str(image_dir / "blue.jpg")
    ids = [items.add("alice", blue), items.add("alice", blue), items.add("bob", blue)]
    eng = engine(store, api_settings)
    first = eng.enrich("alice")
    second = eng.enrich("bob")
    assert standin.count("chat") == 1
    assert (first.succeeded, first.cache_hits, second.cache_hits) == (2, 1, 1)
    captions = {items.row(i)["metadata"]["caption"] for i in ids}
    assert len(captions) == 1


def test_rerun_after_a_crash_between_caption_and_write_hits_the_cache(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    item = items.add("alice", str(image_dir / "green.jpg"))
    provider = DashScopeProvider(api_settings)
    dead = Store(items.settings)  # the process that will die
    dead.setup()
    chunk = stages.claim_chunk(
        dead, "alice", [item], worker="dead", lease_seconds=1, max_attempts=3
    )
    stages.visual_attributes(chunk, policy=LOCAL, max_image_side=512)
    stages.caption_chunk(chunk, provider, cache=dead.cache, prompt_version="v1")
    assert standin.count("chat") == 1
    # It dies here: nothing written, nobody renews its lease, which then runs out.
    dead.close()
    time.sleep(1.2)

    stats = engine(store, api_settings).enrich("alice")
    assert (stats.succeeded, stats.cache_hits) == (1, 1)
    assert standin.count("chat") == 1
    assert items.row(item)["metadata"]["caption"] == chunk.items[0].caption
