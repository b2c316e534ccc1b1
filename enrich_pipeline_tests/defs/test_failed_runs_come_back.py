"""Runs that end without finishing their rows: the pending-rows sensor requests their users
again, after a back-off, and holds every request after a stop that needs a person.

The sensor is evaluated against the real database and a real Dagster instance; the runs it
requests are executed for real (in process, against the stand-in DashScope server), so the
runs it reads back are recorded by Dagster itself. Time is moved with Dagster's own clock
(``freeze_time``), which the sensor ticks by."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    ExecuteInProcessResult,
    RunRequest,
    RunsFilter,
    SensorResult,
    SkipReason,
    build_sensor_context,
)
from dagster._core.test_utils import create_run_for_test, freeze_time
from dagster._core.utils import make_new_run_id

from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.heartbeat import HEARTBEAT_TAG, WORKER_TAG
from enrich_pipeline.defs.reruns import Reruns
from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline.defs.sensors import pending_rows_sensor
from enrich_pipeline_tests.helpers import API_KEY, Items, hues, paint
from enrich_pipeline_tests.standin import StandIn

FOREVER = 1_000_000


def tick(
    instance: DagsterInstance, cursor: str | None, at: float | None = None
) -> tuple[list[RunRequest], str, str]:
    """One evaluation (at Dagster time ``at``, default now): the requests, the new cursor, the
    skip reason ('' when runs were requested)."""

    def evaluate() -> SensorResult | SkipReason:
        with build_sensor_context(
            instance=instance, cursor=cursor, resources={"adbpg": AdbpgResource()}
        ) as context:
            return pending_rows_sensor(context)

    if at is None:
        result = evaluate()
    else:
        with freeze_time(at):
            result = evaluate()
    if isinstance(result, SkipReason):
        return [], cursor or "", result.skip_message or ""
    assert isinstance(result, SensorResult)
    skip = result.skip_reason.skip_message if result.skip_reason else ""
    return list(result.run_requests), result.cursor or "", skip or ""


def execute(instance: DagsterInstance, request: RunRequest) -> ExecuteInProcessResult:
    """The requested run, as the daemon would launch it (its partition, config and tags)."""
    return defs.get_job_def("enrich_job").execute_in_process(
        instance=instance,
        partition_key=request.partition_key,
        run_config=request.run_config,
        tags=request.tags,
        raise_on_error=False,
    )


def ended(instance: DagsterInstance, result: ExecuteInProcessResult) -> float:
    (record,) = instance.get_run_records(filters=RunsFilter(run_ids=[result.run_id]))
    assert record.end_time is not None
    return record.end_time


def captioned(items: Items, ids: list[str]) -> list[str]:
    return [i for i in ids if items.row(i)["metadata"].get("caption")]


def ledger_and_claims(items: Items) -> tuple[int, int]:
    (failures,) = items.execute("SELECT count(*) FROM {ns}.enrich_failures")[0]
    (claims,) = items.execute("SELECT count(*) FROM {ns}.enrich_claims")[0]
    return failures, claims


def seed(items: Items, folder: Path, user: str, n: int, prefix: str) -> list[str]:
    return [items.add(user, str(p)) for p in paint(folder, hues(n), prefix=prefix)]


def started_with_every_row_claimed(
    instance: DagsterInstance, items: Items, request: RunRequest, pid: int
) -> DagsterRun:
    """The run as the daemon launched it for ``request`` (its worker process ``pid``), holding
    every row of the table for an hour."""
    run_id = make_new_run_id()
    run = create_run_for_test(
        instance,
        job_name="enrich_job",
        run_id=run_id,
        status=DagsterRunStatus.STARTED,
        tags={
            **request.tags,
            "dagster/partition": "alice",
            "dagster/run_key": request.run_key or "",
            HEARTBEAT_TAG: str(int(time.time())),
            WORKER_TAG: f"{run_id} {socket.gethostname()}:{pid}",
        },
    )
    items.execute(
        "INSERT INTO {ns}.enrich_claims (source_table, item_id, user_id, worker, expires_at)"
        " SELECT %s, id::text, user_id, %s, now() + interval '1 hour' FROM {items}",
        (f"{items.namespace}.items", run.run_id),
    )
    return run


def test_an_outage_run_comes_back_after_a_doubling_back_off_and_captions_every_row(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    """503 on every call: the run fails and charges no row; the sensor waits one back-off
    (60 s), then two (120 s) after a second failed run, and once the provider is back the rows
    are captioned."""
    ids = seed(items, tmp_path, "alice", 3, "a")
    standin.inject("503", times=FOREVER, endpoint="chat")
    instance = DagsterInstance.ephemeral()

    (first,), cursor, _ = tick(instance, None)
    failed = execute(instance, first)
    assert not failed.success
    assert captioned(items, ids) == [] and ledger_and_claims(items) == (0, 0)
    end = ended(instance, failed)

    # The pending set is as it was: before the back-off nothing is requested, and the skip
    # says why (the due time is kept in whole seconds, rounded up: 30 s, or 31 with the end's
    # fraction of a second).
    requests, cursor, skip = tick(instance, cursor, at=end + 30)
    assert requests == [] and "wait (ENRICH_RERUN_BACKOFF)" in skip
    assert re.search(r"the next is due in 3[01] s", skip), skip
    (again,), cursor, _ = tick(instance, cursor, at=end + 61)
    assert again.partition_key == "alice" and again.run_key != first.run_key
    failed_twice = execute(instance, again)
    assert not failed_twice.success
    end = ended(instance, failed_twice)

    # A second unfinished run in a row: twice the wait.
    assert tick(instance, cursor, at=end + 90)[0] == []
    standin.clear_faults()
    (third,), cursor, _ = tick(instance, cursor, at=end + 121)
    assert len({first.run_key, again.run_key, third.run_key}) == 3
    assert execute(instance, third).success
    assert captioned(items, ids) == ids and ledger_and_claims(items) == (0, 0)
    # Finished: nothing more to request, and the user's streak is gone.
    requests, cursor, skip = tick(instance, cursor, at=end + 10_000)
    assert requests == [] and skip == "no pending rows"
    assert Reruns.parse(cursor).retry == {}


def test_a_rejected_key_holds_requests_until_the_key_changes(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    """401: the run stops and charges no row; no user is requested again, at any later tick
    (new rows of another user included), until the key setting changes."""
    alice = seed(items, tmp_path, "alice", 2, "a")
    env.setenv("DASHSCOPE_API_KEY", "sk-revoked-0000000000")
    instance = DagsterInstance.ephemeral()

    (first,), cursor, _ = tick(instance, None)
    failed = execute(instance, first)
    assert not failed.success
    assert ledger_and_claims(items) == (0, 0)
    end = ended(instance, failed)
    calls = standin.count("chat")

    bob = seed(items, tmp_path, "bob", 2, "b")
    for later in (end + 61, end + 3600, end + 86_400):
        requests, cursor, skip = tick(instance, cursor, at=later)
        assert requests == [], later
        assert "held since run" in skip and "invalid_api_key" in skip, skip
    assert sorted(instance.get_dynamic_partitions("users")) == ["alice", "bob"]
    assert standin.count("chat") == calls
    assert "sk-revoked" not in cursor

    env.setenv("DASHSCOPE_API_KEY", API_KEY)
    requests, cursor, _ = tick(instance, cursor, at=end + 86_401)
    assert sorted(r.partition_key for r in requests) == ["alice", "bob"]
    for request in requests:
        assert execute(instance, request).success
    assert captioned(items, alice + bob) == alice + bob


def test_a_person_materializing_a_user_lifts_the_hold(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    """Arrears are settled in the billing console, not in a setting: a run a person starts
    after the stop that succeeds lifts the hold for everyone."""
    seed(items, tmp_path, "alice", 1, "a")
    bob = seed(items, tmp_path, "bob", 1, "b")
    standin.inject("arrearage", times=1, endpoint="chat")
    instance = DagsterInstance.ephemeral()
    (first, second), cursor, _ = tick(instance, None)
    failed = execute(instance, first)
    assert not failed.success
    end = ended(instance, failed)
    requests, cursor, skip = tick(instance, cursor, at=end + 1)
    assert requests == [] and "account_in_arrears" in skip

    # The account topped up; a person materializes one user.
    assert execute(instance, RunRequest(partition_key=second.partition_key)).success
    requests, cursor, _ = tick(instance, cursor, at=end + 61)
    assert [r.partition_key for r in requests] == [first.partition_key]
    assert captioned(items, bob) == bob


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_run_gives_its_claims_back_and_new_rows_in_its_lease_strand_nothing(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    """A run killed with its rows claimed for a long lease (``kill -9``, the OOM killer), then
    failed by run monitoring, while new rows arrive for its user: its claims are given back at
    once, and after the back-off one run captions the old rows and the new ones."""
    old = seed(items, tmp_path, "alice", 3, "old")
    instance = DagsterInstance.ephemeral()
    (request,), cursor, _ = tick(instance, None)
    # The run as the daemon launched it, its process then killed mid-run with every row claimed.
    run = started_with_every_row_claimed(instance, items, request, _dead_pid())
    new = seed(items, tmp_path, "alice", 2, "new")
    # Still running as far as Dagster knows: the user is held, nothing is requested.
    assert tick(instance, cursor)[0] == []

    instance.report_run_failed(run)
    requests, cursor, skip = tick(instance, cursor)
    assert requests == [] and "wait (ENRICH_RERUN_BACKOFF)" in skip
    assert ledger_and_claims(items) == (0, 0), "the dead run's claims are given back"
    (record,) = instance.get_run_records(filters=RunsFilter(run_ids=[run.run_id]))
    assert record.end_time is not None
    (retry,), cursor, _ = tick(instance, cursor, at=record.end_time + 61)
    assert retry.partition_key == "alice" and retry.run_key != request.run_key
    assert execute(instance, retry).success
    assert captioned(items, old + new) == old + new


def test_rows_a_dead_run_held_come_back_under_a_run_key_never_used(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    """A failed run whose process may still live keeps its claims until the lease ends. A run
    of the user's newer rows meanwhile takes only those; when the lease ends, the older rows
    are pending exactly as when they were first requested. Dagster drops a request whose run
    key any run ever had: the new request's key must be new."""
    old = seed(items, tmp_path, "alice", 3, "old")
    instance = DagsterInstance.ephemeral()
    (first,), cursor, _ = tick(instance, None)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = started_with_every_row_claimed(instance, items, first, alive.pid)
        instance.report_run_failed(run)
        new = seed(items, tmp_path, "alice", 2, "new")
        requests, cursor, _ = tick(instance, cursor)
        assert requests == []
        assert ledger_and_claims(items) == (0, 3), "a process that may live keeps its claims"
        (record,) = instance.get_run_records(filters=RunsFilter(run_ids=[run.run_id]))
        (second,), cursor, _ = tick(instance, cursor, at=record.end_time + 61)
        assert execute(instance, second).success
        assert captioned(items, new) == new and captioned(items, old) == []
    finally:
        alive.kill()
        alive.wait()
    # The lease ends: the older rows are pending again, with the fingerprint of the first run.
    items.execute("UPDATE {ns}.enrich_claims SET expires_at = now() - interval '1 second'")
    (third,), cursor, _ = tick(instance, cursor, at=record.end_time + 62)
    assert third.run_key.split("|")[1] == first.run_key.split("|")[1]
    used = {r.tags.get("dagster/run_key") for r in instance.get_runs()}
    assert third.run_key not in used
    assert execute(instance, third).success
    assert captioned(items, old + new) == old + new
