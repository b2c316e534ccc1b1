"""The pending-rows sensor, evaluated against the real database and a real Dagster instance."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    SensorResult,
    SkipReason,
    build_sensor_context,
)
from dagster._core.test_utils import create_run_for_test

from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline.defs.sensors import pending_rows_sensor
from enrich_pipeline_tests.helpers import Items


def tick(instance: DagsterInstance, cursor: str | None = None) -> SensorResult | SkipReason:
    with build_sensor_context(
        instance=instance, cursor=cursor, resources={"adbpg": AdbpgResource()}
    ) as context:
        result = pending_rows_sensor(context)
    if isinstance(result, SensorResult) and not result.run_requests and result.skip_reason:
        return result.skip_reason
    return result


def added(result: SensorResult) -> list[str]:
    return [k for r in result.dynamic_partitions_requests for k in r.partition_keys]


def test_new_users_get_partitions_and_one_run_each(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    for user in ("alice", "alice", "bob"):
        items.add(user, str(image_dir / "blue.jpg"))
    items.add("carol", str(image_dir / "blue.jpg"), metadata={"caption": "done"})
    instance = DagsterInstance.ephemeral()

    result = tick(instance)

    assert isinstance(result, SensorResult)
    assert added(result) == ["alice", "bob"]
    assert sorted(r.partition_key for r in result.run_requests) == ["alice", "bob"]
    assert len({r.run_key for r in result.run_requests}) == 2
    assert set(json.loads(result.cursor)) == {"alice", "bob"}


def test_unchanged_rows_request_nothing_and_new_rows_run_again(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    first = tick(instance)
    assert isinstance(first, SensorResult)
    instance.add_dynamic_partitions("users", added(first))
    (req,) = first.run_requests

    again = tick(instance, first.cursor)
    assert isinstance(again, SkipReason) and "unchanged" in again.skip_message

    time.sleep(0.01)
    items.add("alice", str(image_dir / "red.jpg"))
    newer = tick(instance, first.cursor)
    assert isinstance(newer, SensorResult)
    assert added(newer) == []  # partition already known
    (req2,) = newer.run_requests
    assert req2.partition_key == "alice" and req2.run_key != req.run_key


def test_user_with_a_run_in_flight_is_not_requested_again(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    items.add("bob", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    for status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTED):
        create_run_for_test(
            instance, job_name="enrich_job", status=status, tags={"dagster/partition": "alice"}
        )
    result = tick(instance)
    assert isinstance(result, SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["bob"]
    # alice stays out of the cursor, so she is requested once her run is over.
    assert set(json.loads(result.cursor)) == {"bob"}


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
