"""The users partitions the sensor keeps between ticks (``defs/known_partitions.py``): partitions
added elsewhere are seen at the next tick, and one removed elsewhere while its user still has
pending rows is added again before any run names it."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import SensorResult, SkipReason
from dagster._core.test_utils import instance_for_test

from enrich_pipeline.defs import sensors
from enrich_pipeline.defs.known_partitions import known_order
from enrich_pipeline_tests.defs.test_sensors import partitions, tick
from enrich_pipeline_tests.helpers import Items


def test_a_partition_removed_while_its_user_has_rows_is_added_again_before_a_run(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    items.add("bob", str(image_dir / "blue.jpg"))
    with instance_for_test() as instance:
        first = tick(instance)
        assert isinstance(first, SensorResult)
        assert partitions(instance) == ["alice", "bob"]

        # Added elsewhere (the UI's "add partition"): the next read has it, in Dagster's order.
        instance.add_dynamic_partitions("users", ["carol"])
        assert known_order(instance).keys == ["alice", "bob", "carol"]

        # Removed (`enrich-dagster partitions --remove bob --force`) while bob gets new rows.
        instance.delete_dynamic_partition("users", "bob")
        items.add("bob", str(image_dir / "red.jpg"))
        result = tick(instance, first.cursor)
        assert isinstance(result, SkipReason), result
        assert "1 partition(s) removed elsewhere" in (result.skip_message or "")
        assert "added again" in (result.skip_message or "")
        assert sorted(partitions(instance)) == ["alice", "bob", "carol"]

        # The next tick reads the partitions whole and requests bob's run (alice is unchanged).
        again = tick(instance, first.cursor)
        assert isinstance(again, SensorResult), again
        assert [r.partition_key for r in again.run_requests] == ["bob"]


def test_new_users_past_a_ticks_share_of_partitions_wait_for_the_next_tick(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    monkeypatch = env
    monkeypatch.setattr(sensors, "MAX_NEW_PARTITIONS", 2)
    for user in ("ann", "ben", "cat"):
        items.add(user, str(image_dir / "blue.jpg"))
    with instance_for_test() as instance:
        first = tick(instance)
        assert isinstance(first, SensorResult)
        assert partitions(instance) == ["ann", "ben"]
        assert sorted(r.partition_key for r in first.run_requests) == ["ann", "ben"]

        second = tick(instance, first.cursor)
        assert isinstance(second, SensorResult)
        assert partitions(instance) == ["ann", "ben", "cat"]
        assert [r.partition_key for r in second.run_requests] == ["cat"]
