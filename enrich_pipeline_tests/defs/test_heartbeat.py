"""The run heartbeat beats while the run makes progress and stops when it stops: a hung run is
then reported dead by the run launcher's health check, and its claims are no longer renewed."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, materialize
from dagster._core.launcher import WorkerStatus
from dagster._core.test_utils import create_run_for_test, instance_for_test

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.heartbeat import HEARTBEAT_TAG, WORKER_TAG, Heartbeat, Pulse
from enrich_pipeline.defs.instance.run_launcher import HeartbeatRunLauncher, worker_health
from enrich_pipeline_tests.helpers import API_KEY, FakeClock, Items
from enrich_pipeline_tests.standin import StandIn

# Generous: the suite must pass on a loaded machine; a run that hangs hangs far longer.
DEADLINE = 60.0


def beat_of(instance: DagsterInstance, run_id: str) -> str | None:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run.tags.get(HEARTBEAT_TAG)


# --- the pulse and the heartbeat, on a clock the test moves -----------------------------------


def test_a_run_that_never_reports_progress_always_counts_as_progressing() -> None:
    clock = FakeClock()
    pulse = Pulse(stall=5, clock=clock)
    clock.sleep(3600)
    assert pulse.progressing()


def test_the_pulse_stalls_after_the_window_without_progress_and_resumes_with_progress() -> None:
    clock = FakeClock()
    pulse = Pulse(stall=5, clock=clock)
    pulse.progress()
    clock.sleep(5)
    assert pulse.progressing()  # the window itself still counts
    clock.sleep(0.1)
    assert not pulse.progressing()
    pulse.progress()
    assert pulse.progressing()


def test_a_watched_value_that_changes_is_progress() -> None:
    clock = FakeClock()
    calls = [0]
    pulse = Pulse(stall=5, clock=clock)
    pulse.watch("calls", lambda: calls[0])
    for _ in range(10):  # a call ends every 4 s: never 5 s without progress
        clock.sleep(4)
        calls[0] += 1
        assert pulse.progressing()
    clock.sleep(4)
    assert pulse.progressing()
    clock.sleep(4)  # 8 s with the same count
    assert not pulse.progressing()


def test_the_heartbeat_stops_advancing_when_progress_stops_and_the_launcher_fails_the_run() -> None:
    clock, wall = FakeClock(), FakeClock()
    wall.now = time.time()
    instance = DagsterInstance.ephemeral()
    run = create_run_for_test(instance, job_name="enrich_job", status=DagsterRunStatus.STARTED)
    pulse = Pulse(stall=90, clock=clock)
    # Not started: no thread, the test beats by hand.
    heartbeat = Heartbeat(instance, run.run_id, interval=10, pulse=pulse, wall=wall)
    assert heartbeat.beat()
    pulse.progress()

    # Progress every 10 s for ten minutes: every beat is written, the run is alive throughout.
    for _ in range(60):
        clock.sleep(10)
        wall.sleep(10)
        pulse.progress()
        assert heartbeat.beat()
        assert beat_of(instance, run.run_id) == str(int(wall.now))
        current = instance.get_run_by_id(run.run_id)
        assert current is not None
        assert worker_health(current, timeout=90, now=wall.now) is WorkerStatus.RUNNING

    # Then nothing: beats go on for the stall window (90 s), then stop.
    last = wall.now
    for _ in range(9):
        clock.sleep(10)
        wall.sleep(10)
        assert heartbeat.beat()
    stopped_at = beat_of(instance, run.run_id)
    assert stopped_at == str(int(last + 90))
    for _ in range(20):
        clock.sleep(10)
        wall.sleep(10)
        assert not heartbeat.beat()
        assert beat_of(instance, run.run_id) == stopped_at
    current = instance.get_run_by_id(run.run_id)
    assert current is not None
    assert worker_health(current, timeout=90, now=wall.now) is WorkerStatus.FAILED

    # Progress again before run monitoring got to it: the beat resumes.
    pulse.progress()
    assert heartbeat.beat()
    current = instance.get_run_by_id(run.run_id)
    assert current is not None
    assert worker_health(current, timeout=90, now=wall.now) is WorkerStatus.RUNNING


# --- real runs against the stand-in ----------------------------------------------------------


def _resources() -> dict:
    return dict(defs.resources)


def _start(instance: DagsterInstance, **config: object) -> tuple[threading.Thread, list]:
    """Materialize alice's partition in a thread; its result lands in the returned list."""
    done: list = []

    def run() -> None:
        done.append(
            materialize(
                [enriched_items],
                partition_key="alice",
                instance=instance,
                resources=_resources(),
                run_config={
                    "ops": {"enriched_items": {"ops": {"pending_rows": {"config": config}}}}
                },
            )
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _started(instance: DagsterInstance, run_id: str, step: str) -> bool:
    starts = instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
    return any((e.step_key or "").startswith(step) for e in starts)


def _run_id(instance: DagsterInstance) -> str:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if runs and HEARTBEAT_TAG in runs[0].tags:
            return runs[0].run_id
        time.sleep(0.05)
    raise AssertionError("the run did not start beating")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def hanging() -> Iterator[StandIn]:
    """A stand-in of its own whose hung calls last until it stops (the session's is shared)."""
    server = StandIn(api_key=API_KEY, hang_seconds=600.0).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_hung_run_stops_beating_is_reported_dead_and_its_claims_run_out(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, hanging: StandIn, stack: ExitStack
) -> None:
    """The model call never answers (the client's own deadline is a minute away): the
    heartbeat stops within the stall window, the launcher's health check fails the run, and the
    claim's lease is no longer renewed, so the row is pending again for the next run."""
    env.setenv("DASHSCOPE_BASE_URL", hanging.base_url)
    env.setenv("ENRICH_RUN_HEARTBEAT_INTERVAL", "0.2")
    env.setenv("ENRICH_RUN_HEARTBEAT_TIMEOUT", "1")
    row = items.add("alice", str(image_dir / "blue.jpg"))
    hanging.inject("timeout", times=1, endpoint="chat")
    instance = stack.enter_context(instance_for_test())
    instance.add_dynamic_partitions("users", ["alice"])
    thread, done = _start(instance, lease_seconds=2, overlap="none")
    try:
        run_id = _run_id(instance)
        deadline = time.monotonic() + DEADLINE
        # The run is stuck in its captions step, waiting on the call (logged when it ends).
        while not _started(instance, run_id, "enriched_items.captions"):
            assert time.monotonic() < deadline, "the captions step never started"
            time.sleep(0.1)
        launcher = HeartbeatRunLauncher()
        # Reported dead, and silent for good: at one beat each 0.2 s, a live heartbeat would
        # move the tag within a second. (A slow step change on a loaded machine may stall the
        # run for a moment before the call; its next step resumes the beat: look again.)
        while True:
            assert time.monotonic() < deadline, "the hung run never stopped beating for good"
            run = instance.get_run_by_id(run_id)
            assert run is not None and not done, "the run ended: it was not hung"
            if launcher.check_run_worker_health(run).status is WorkerStatus.FAILED:
                stopped_at = run.tags[HEARTBEAT_TAG]
                time.sleep(2.5)
                if beat_of(instance, run_id) == stopped_at:
                    break
            time.sleep(0.1)
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.tags[WORKER_TAG].endswith(f":{os.getpid()}")
        result = launcher.check_run_worker_health(run)
        assert result.status is WorkerStatus.FAILED
        assert "ENRICH_RUN_HEARTBEAT_TIMEOUT" in (result.msg or "")
        # The claim's 2 s lease is no longer renewed: the row is the next run's to take.
        while time.monotonic() < deadline:
            expired = items.execute(
                "SELECT expires_at <= now() FROM {ns}.enrich_claims WHERE item_id = %s", (row,)
            )
            if expired == [(True,)]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the hung run's claim is still renewed")
        assert not done, "the run ended: it was not hung"
    finally:
        hanging.stop()  # the hung call ends, and with it the run
        thread.join(DEADLINE)
    assert done, "the run never ended once the call was cut"


def test_a_run_that_makes_progress_keeps_beating(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, stack: ExitStack
) -> None:
    """Calls that each take a while, one at a time, for several stall windows: every health
    check in between says the run is alive, and the heartbeat keeps advancing."""
    env.setenv("ENRICH_RUN_HEARTBEAT_INTERVAL", "0.2")
    env.setenv("ENRICH_RUN_HEARTBEAT_TIMEOUT", "3")
    colors = ["blue", "red", "green", "yellow", "cyan", "magenta"]
    for color in colors:
        items.add("alice", str(image_dir / f"{color}.jpg"))
    standin.latency = 1.0
    instance = stack.enter_context(instance_for_test())
    instance.add_dynamic_partitions("users", ["alice"])
    thread, done = _start(instance, concurrent=1, batch_size=2)
    run_id = _run_id(instance)
    launcher = HeartbeatRunLauncher()
    beats = set()
    while not done:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        if run.status is DagsterRunStatus.STARTED:
            assert launcher.check_run_worker_health(run).status is WorkerStatus.RUNNING
            beats.add(run.tags[HEARTBEAT_TAG])
        time.sleep(0.2)
    thread.join(DEADLINE)
    assert done[0].success
    # Six captions and three embedding calls at a second each: many distinct beats.
    assert len(beats) >= 5, beats
