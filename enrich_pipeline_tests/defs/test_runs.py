"""Runs of the enrichment job beyond one plain partition: a run over a range of user
partitions (the sensor's shared runs), the lookahead that keeps caption calls in flight across
chunk steps, a provider that stops a run while the lookahead is ahead, and the offline demo."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.checks import (
    embedding_dimensions,
    failure_share,
    no_unrecorded_pending_rows,
)
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.runs import RANGE_END_TAG, RANGE_START_TAG
from enrich_pipeline_tests.helpers import Items, hues, log_writes, mean_of, paint, writes
from enrich_pipeline_tests.standin import StandIn

ASSETS = [enriched_items, no_unrecorded_pending_rows, embedding_dimensions, failure_share]


def resources() -> dict:
    return {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }


def pending_config(**config: object) -> dict:
    return {"ops": {"enriched_items": {"ops": {"pending_rows": {"config": config}}}}}


def metadata_by_partition(result) -> dict[str, dict]:  # noqa: ANN001 - ExecuteInProcessResult
    return {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("enriched_items")
    }


def test_a_run_over_a_range_of_users_records_each_users_own_materialization(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path, standin: StandIn
) -> None:
    images = paint(tmp_path, hues(8))
    ids = {
        "ann": [items.add("ann", str(p)) for p in images[:3]],
        "ben": [items.add("ben", str(images[3]))],
        "cid": [],  # a partition in the range with nothing pending
        "dot": [items.add("dot", str(p)) for p in images[4:7]],
    }
    broken = items.add("dot", str(tmp_path / "missing.png"))
    outside = items.add("eve", str(images[7]))
    log_writes(items)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["ann", "ben", "cid", "dot", "eve"])

    result = materialize(
        ASSETS,
        instance=instance,
        resources=resources(),
        tags={RANGE_START_TAG: "ann", RANGE_END_TAG: "dot"},
        # Chunks of 3 rows: chunks hold rows of several users, claimed and written per user.
        run_config=pending_config(batch_size=3),
    )

    assert result.success
    md = metadata_by_partition(result)
    assert set(md) == {"ann", "ben", "cid", "dot"}  # one each, with its own figures
    assert (md["ann"]["succeeded"], md["ann"]["failed"], md["ann"]["items_captioned"]) == (
        3,
        0,
        3,
    )
    assert (md["ben"]["succeeded"], md["ben"]["items_captioned"]) == (1, 1)
    assert "total" not in md["cid"] and md["cid"]["items"] == 0 and "this_run" in md["cid"]
    assert (md["dot"]["succeeded"], md["dot"]["failed"], md["dot"]["items_given_up"]) == (3, 1, 1)
    assert str(broken) in md["dot"]["failure_ledger"]
    for user in ("ann", "ben", "cid", "dot"):
        assert md[user]["user_id"] == user and md[user]["run_users"] == 4
    # Tokens are apportioned: the users' shares add up to the run's usage.
    assert md["ann"]["tokens_used"] > md["ben"]["tokens_used"] > 0
    assert "tokens_used" not in md["cid"] or md["cid"]["tokens_used"] == 0
    # Every row of the range's users written once; the user outside the range untouched.
    for user, user_ids in ids.items():
        for item in user_ids:
            assert items.row(item)["metadata"]["caption"], (user, item)
    assert set(writes(items).values()) == {1}
    assert items.row(outside)["metadata"] == {}
    assert standin.count("chat") == 7
    # The checks record one evaluation per partition.
    evaluations = {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}
    for user in ("ann", "ben", "cid", "dot"):
        assert evaluations[("embedding_dimensions", user)].passed
        assert evaluations[("no_unrecorded_pending_rows", user)].passed
    assert not evaluations[("failure_share", "dot")].passed  # 1 of 4 failed
    assert evaluations[("failure_share", "ann")].passed
    # The writes are per user: the run log says so for chunks that span users.
    lines = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("written for 2 users" in m for m in lines), lines


@pytest.mark.parametrize("overlap", ["captions", "none"])
def test_lookahead_keeps_caption_calls_in_flight_while_a_chunk_is_written(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path, standin: StandIn, overlap: str
) -> None:
    """With the lookahead, the next chunk's caption calls start while the current chunk is
    embedded and written; strictly step by step, none do. Each chunk is still written by its
    own step, in order, as soon as its captions are done."""
    for p in paint(tmp_path, hues(12)):
        items.add("alice", str(p))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    standin.latency = 0.3
    result = materialize(
        [enriched_items],
        partition_key="alice",
        instance=instance,
        resources=resources(),
        run_config=pending_config(batch_size=4, concurrent=4, overlap=overlap),
    )
    assert result.success
    done = {
        e.step_key: e.timestamp
        for e in instance.all_logs(result.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS"
    }
    first_write = done["enriched_items.write_results[chunk_0]"]
    chat_before = sum(
        1 for r in list(standin.requests) if r["endpoint"] == "chat" and r["time"] < first_write
    )
    if overlap == "captions":
        assert chat_before > 4, chat_before  # chunk 1's calls went out before chunk 0 was written
    else:
        assert chat_before == 4
    writes_in_order = sorted(
        (t, k) for k, t in done.items() if k.startswith("enriched_items.write_results")
    )
    assert [k for _, k in writes_in_order] == [
        f"enriched_items.write_results[chunk_{n}]" for n in range(3)
    ]
    assert standin.count("chat") == 12


def test_key_rejected_while_the_lookahead_is_ahead_stops_the_run_and_releases_every_claim(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path, standin: StandIn
) -> None:
    images = paint(tmp_path, hues(12))
    ids = [items.add("alice", str(p)) for p in images]
    # The key is "revoked" at the first image of the third chunk (chunks of 4).
    standin.add_rule("unauthorized", color=mean_of(images[8]), tolerance=3)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    result = materialize(
        [enriched_items],
        partition_key="alice",
        instance=instance,
        resources=resources(),
        run_config=pending_config(batch_size=4, concurrent=2),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "DASHSCOPE_API_KEY" in failure.step_failure_data.error.message
    captioned = [i for i in ids if items.row(i)["metadata"].get("caption")]
    assert set(captioned) <= set(ids[:8])  # what was written before the stop is kept
    assert set(ids[:4]) <= set(captioned)
    # Nothing marked failed, no claim left behind (the lookahead's included).
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures") == [(0,)]
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]


def test_offline_demo_metadata_says_no_model_was_called(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path
) -> None:
    from enrich_pipeline.enrichment.synthetic import draw_sample

    path = tmp_path / "chair.jpg"
    draw_sample("chair", (40, 80, 200), (245, 245, 245)).save(path, "JPEG", quality=90)
    item = items.add("alice", str(path))
    env.setenv("ENRICH_OFFLINE", "true")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    result = materialize(
        [enriched_items], partition_key="alice", instance=instance, resources=resources()
    )
    assert result.success
    md = metadata_by_partition(result)["alice"]
    assert md["provider"].startswith("offline (no model was called")
    assert md["model"] == "offline-synthetic"
    for absent in ("tokens_used", "image_tokens", "estimated_cost_usd", "prompt_tokens"):
        assert absent not in md, absent
    row = items.row(item)["metadata"]
    assert row["caption_source"] == "offline"
    assert row["caption"] == "A blue chair drawn as a flat silhouette on a white background."
    assert "chair" in row["object_tags"] and "laptop" not in row["object_tags"]
    assert row["style_tags"] == [] and "blue" in row["dominant_colors"]


def test_call_pool_keeps_no_more_calls_in_flight_than_its_rate_can_use() -> None:
    """A run given 10 calls a second, of 0.2 s each, needs 2 in flight (Little's law), not its
    16 workers: sending 16 at once is what a provider counting each second answers with 429.
    Each worker's clock moves 0.2 s a call (the calls also overlap for real), so the pool
    measures exactly 0.2 s however busy the machine."""
    import threading
    import time

    from enrich_pipeline.pipeline.lookahead import CallPool

    lock = threading.Lock()
    state = {"now": 0, "most": 0}
    worker_time = threading.local()

    def clock() -> float:
        return getattr(worker_time, "now", 0.0)

    def call() -> bool:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)  # long enough for the calls let in to overlap
        worker_time.now = clock() + 0.2
        with lock:
            state["now"] -= 1
        return True

    pool = CallPool(16, rate=10.0, clock=clock)
    try:
        first = [pool.submit(0, call) for _ in range(4)]
        for f in first:
            f.result()
        state["most"] = 0  # after the first guess (1 s a call), the measured 0.2 s
        rest = [pool.submit(0, call) for _ in range(20)]
        for f in rest:
            f.result()
    finally:
        pool.close()
    # 10 a second x 0.2 s: two in flight, so the calls go at the rate, not 16 at once.
    assert pool.limit == 2 and state["most"] <= 2
    unlimited = CallPool(16)
    try:
        assert unlimited.limit == 16
    finally:
        unlimited.close()
