"""The pending-rows sensor, evaluated against the real database and a real Dagster instance."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRunStatus,
    SensorResult,
    SkipReason,
    build_sensor_context,
)
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.test_utils import create_run_for_test

from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline.defs.runs import RANGE_END_TAG, RANGE_START_TAG, users_in_flight
from enrich_pipeline.defs.sensors import Seen, pending_rows_sensor, plan_runs
from enrich_pipeline_tests.helpers import Items


def tick(instance: DagsterInstance, cursor: str | None = None) -> SensorResult | SkipReason:
    with build_sensor_context(
        instance=instance, cursor=cursor, resources={"adbpg": AdbpgResource()}
    ) as context:
        result = pending_rows_sensor(context)
    if isinstance(result, SensorResult) and not result.run_requests and result.skip_reason:
        return result.skip_reason
    return result


def partitions(instance: DagsterInstance) -> list[str]:
    """The user partitions, in order (the sensor adds new users' itself, in one statement)."""
    return list(instance.get_dynamic_partitions("users"))


def covered(result: SensorResult) -> list[list[str]]:
    """The partitions of each requested run: one key, or a range's two ends."""
    out = []
    for r in result.run_requests:
        if r.partition_key:
            out.append([r.partition_key])
        else:
            out.append([r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]])
    return out


def seed_users(items: Items, users: int, rows: int, prefix: str = "u") -> None:
    items.execute(
        "INSERT INTO {items} (user_id, image, status, metadata)"
        " SELECT %s || lpad((g / %s)::text, 5, '0'), '/img/' || g || '.jpg', 'active', '{{}}'"
        " FROM generate_series(0, %s - 1) AS g",
        (prefix, rows, users * rows),
    )


def test_new_users_get_partitions_and_one_run_each(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    for user in ("alice", "alice", "bob"):
        items.add(user, str(image_dir / "blue.jpg"))
    items.add("carol", str(image_dir / "blue.jpg"), metadata={"caption": "done"})
    instance = DagsterInstance.ephemeral()

    result = tick(instance)

    assert isinstance(result, SensorResult)
    assert partitions(instance) == ["alice", "bob"]
    assert not result.dynamic_partitions_requests
    assert sorted(r.partition_key for r in result.run_requests) == ["alice", "bob"]
    assert len({r.run_key for r in result.run_requests}) == 2
    assert len(Seen.parse(result.cursor).digests) == 2
    # Each run calls the model with the sensor's concurrency. With the shared budget in the
    # database (on with a configured database) the runs pace together at the account's quota;
    # without it, the two runs split the quota between them.
    config = result.run_requests[0].run_config
    assert config["ops"]["enriched_items"]["ops"]["pending_rows"]["config"]["concurrent"] == 16
    assert "resources" not in config
    env.setenv("ENRICH_SHARED_QUOTA", "false")
    split = tick(DagsterInstance.ephemeral())
    assert isinstance(split, SensorResult)
    config = split.run_requests[0].run_config
    assert config["resources"]["dashscope"]["config"]["requests_per_minute"] == 600


def test_unchanged_rows_request_nothing_and_new_rows_run_again(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    first = tick(instance)
    assert isinstance(first, SensorResult)
    (req,) = first.run_requests
    assert "resources" not in req.run_config  # one run alone has the whole quota

    again = tick(instance, first.cursor)
    assert isinstance(again, SkipReason) and "unchanged" in again.skip_message

    time.sleep(0.01)
    items.add("alice", str(image_dir / "red.jpg"))
    newer = tick(instance, first.cursor)
    assert isinstance(newer, SensorResult)
    assert partitions(instance) == ["alice"]  # partition already known
    (req2,) = newer.run_requests
    assert req2.partition_key == "alice" and req2.run_key != req.run_key


def test_the_first_cursor_format_is_still_read(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    first = tick(instance)
    assert isinstance(first, SensorResult)
    # The run key: partition, fingerprint, the tick's generation.
    (fp,) = [r.run_key.split("|")[1] for r in first.run_requests]
    legacy = json.dumps({"alice": fp})
    assert isinstance(tick(instance, legacy), SkipReason)


@pytest.mark.parametrize(
    "how",
    [
        "sensor run (dagster/partition)",
        "UI materialization of the asset job",
        "UI backfill run (partition range tags, __ASSET_JOB)",
        "batch_submit_job run",
    ],
)
def test_a_user_held_by_any_run_is_not_requested_again(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, how: str
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    items.add("bob", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice", "bob"])
    job, tags = {
        "sensor run (dagster/partition)": ("enrich_job", {"dagster/partition": "alice"}),
        "UI materialization of the asset job": ("__ASSET_JOB", {"dagster/partition": "alice"}),
        "UI backfill run (partition range tags, __ASSET_JOB)": (
            "__ASSET_JOB",
            {RANGE_START_TAG: "alice", RANGE_END_TAG: "alice", "dagster/backfill": "abc"},
        ),
        "batch_submit_job run": ("batch_submit_job", {"dagster/partition": "alice"}),
    }[how]
    for status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTED):
        create_run_for_test(instance, job_name=job, status=status, tags=tags)
    result = tick(instance)
    assert isinstance(result, SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["bob"]
    # alice stays out of the cursor, so she is requested once her run is over.
    assert len(Seen.parse(result.cursor).digests) == 1


def test_a_range_run_holds_every_partition_between_its_ends(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    for user in ("a", "b", "c", "d"):
        items.add(user, str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["a", "b", "c", "d"])
    create_run_for_test(
        instance,
        job_name="enrich_job",
        status=DagsterRunStatus.STARTED,
        tags={RANGE_START_TAG: "a", RANGE_END_TAG: "c"},
    )
    assert set(users_in_flight(instance)) == {"a", "b", "c"}
    result = tick(instance)
    assert isinstance(result, SensorResult)
    assert covered(result) == [["d"]]


@pytest.mark.parametrize("kind", ["asset backfill (UI)", "job backfill (command line)"])
def test_a_backfill_still_launching_holds_its_users(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, kind: str
) -> None:
    for user in ("alice", "bob", "carol"):
        items.add(user, str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice", "bob", "carol"])
    if kind.startswith("asset"):
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id="bf1",
            asset_graph=defs.resolve_asset_graph(),
            partition_names=["alice", "bob"],
            asset_selection=[AssetKey("enriched_items")],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=None,
        )
    else:
        from dagster._core.execution.backfill import BulkActionStatus

        backfill = PartitionBackfill(
            backfill_id="bf1",
            status=BulkActionStatus.REQUESTED,
            from_failure=False,
            tags={},
            backfill_timestamp=time.time(),
            partition_names=["alice", "bob"],
        )
    instance.add_backfill(backfill)
    result = tick(instance)
    assert isinstance(result, SensorResult)
    assert covered(result) == [["carol"]]


def test_more_users_than_the_queue_takes_share_bounded_runs(
    env: pytest.MonkeyPatch, items: Items
) -> None:
    seed_users(items, 40, 3)  # u00000 .. u00039, 3 rows each
    seed_users(items, 1, 12, prefix="big")  # one larger user
    env.setenv("ENRICH_BUNDLE_ROWS", "10")  # at most 10 rows (3 users) a shared run
    env.setenv("ENRICH_MAX_CONCURRENT_RUNS", "2")  # budget: 4 runs a tick
    env.setenv("ENRICH_SHARED_QUOTA", "false")  # each run then carries its share of the quota
    instance = DagsterInstance.ephemeral()
    create_run_for_test(
        instance,
        job_name="enrich_job",
        status=DagsterRunStatus.STARTED,
        tags={"dagster/partition": "u00004"},
    )
    instance.add_dynamic_partitions("users", ["u00004"])

    result = tick(instance)

    assert isinstance(result, SensorResult)
    assert len(result.run_requests) == 3  # 2 x 2 runs, less the one in flight
    ranges = covered(result)
    # Partition order: the known u00004 first, then the new keys sorted. The big user runs
    # alone; small users share ranges of three (9 rows), which never include the held u00004.
    assert ranges == [["big00000"], ["u00000", "u00002"], ["u00003", "u00006"]]
    order = partitions(instance)
    for r in ranges:
        if len(r) == 2:
            span = order[order.index(r[0]) : order.index(r[1]) + 1]
            assert "u00004" not in span and len(span) <= 3
    # The others are left for later ticks: not in the cursor.
    requested = sum(1 if len(r) == 1 else order.index(r[1]) - order.index(r[0]) + 1 for r in ranges)
    assert len(Seen.parse(result.cursor).digests) == requested
    # Shared runs share the quota too.
    shared = [r for r in result.run_requests if not r.partition_key]
    assert shared and all(
        r.run_config["resources"]["dashscope"]["config"]["requests_per_minute"] == 600
        for r in shared
    )


def test_ten_thousand_users_one_tick_requests_a_bounded_number_of_runs(
    env: pytest.MonkeyPatch, items: Items
) -> None:
    """The scale a sensor tick must hold: 10,000 users with 3 pending rows each. Timing is the
    benchmark's business (``benchmarks``); here: the tick requests a bounded number of shared
    runs, adds every partition in one statement, and keeps a small cursor."""
    seed_users(items, 10_000, 3)
    instance = DagsterInstance.ephemeral()
    result = tick(instance)
    assert isinstance(result, SensorResult)
    assert len(result.run_requests) == 8  # twice the default 4 runs at once
    assert len(partitions(instance)) == 10_000
    assert all(not r.partition_key for r in result.run_requests)
    order = partitions(instance)
    spans = [
        order.index(r.tags[RANGE_END_TAG]) - order.index(r.tags[RANGE_START_TAG]) + 1
        for r in result.run_requests
    ]
    # 1,998 rows a run, under ENRICH_BUNDLE_ROWS (2,000); on this cold start the first three
    # of the four that start together are staggered (1/4, 2/4, 3/4 of their rows).
    assert spans == [167, 333, 500] + [666] * 5
    assert len(result.cursor) < 50_000
    # Once the cursor holds every user (after many ticks) it stays small.
    full = Seen()
    for n in range(10_000):
        full.add(f"u{n:05d}", "3-1700000000.000000-0")
    assert len(full.dumps()) < 100_000


def test_plan_runs_keeps_large_users_alone_and_skips_blocked_keys() -> None:
    order = ["a", "b", "c", "big", "d", "held", "e", "idle", "f"]
    wanted = {"a": 2, "b": 2, "c": 2, "big": 50, "d": 2, "e": 2, "f": 2}
    runs = plan_runs(order, wanted, {"held"}, budget=5, bundle_rows=5, bundle_users=10)
    assert [r.keys for r in runs] == [("a", "b"), ("c",), ("big",), ("d",), ("e", "idle", "f")]
    # Everything fits the budget: one run each.
    runs = plan_runs(order, wanted, {"held"}, budget=7, bundle_rows=5, bundle_users=10)
    assert [r.keys for r in runs] == [(k,) for k in order if k in wanted]


def test_plan_runs_staggers_the_shared_runs_that_start_together() -> None:
    order = [f"u{n:02d}" for n in range(40)]
    wanted = dict.fromkeys(order, 3)
    plain = plan_runs(order, wanted, set(), budget=8, bundle_rows=30, bundle_users=100)
    assert [r.rows for r in plain] == [30, 30, 30, 30]
    staggered = plan_runs(
        order, wanted, set(), budget=8, bundle_rows=30, bundle_users=100, stagger=4
    )
    # The runs that start together end one after another; the rest waits for later ticks.
    assert [r.rows for r in staggered] == [9, 15, 24, 30]
    assert [r.keys[0] for r in staggered] == [r.keys[0] for r in plain]
    for run in staggered:
        assert run.keys[-1] in wanted


def test_nothing_pending_is_a_skip(env: pytest.MonkeyPatch, items: Items) -> None:
    items.add("alice", None)
    result = tick(DagsterInstance.ephemeral())
    assert isinstance(result, SkipReason) and result.skip_message == "no pending rows"


def test_database_down_is_a_clear_skip_not_a_crash(env: pytest.MonkeyPatch, items: Items) -> None:
    env.setenv("ADBPG_URL", "postgresql://nobody:secret-pw@127.0.0.1:9/none?connect_timeout=2")
    started = time.monotonic()
    result = tick(DagsterInstance.ephemeral())
    assert isinstance(result, SkipReason)
    assert "database unreachable" in result.skip_message
    assert "secret-pw" not in result.skip_message
    assert time.monotonic() - started < 15
