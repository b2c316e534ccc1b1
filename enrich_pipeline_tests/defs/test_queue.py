"""The run queue's one-run-per-user rule and the run monitoring of dead runs, with Dagster's own
queue arithmetic (``TagConcurrencyLimitsCounter``) and run monitoring entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, SubmitRunContext, materialize
from dagster._core.launcher import WorkerStatus
from dagster._core.remote_origin import (
    InProcessCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.test_utils import create_run_for_test, instance_for_test
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import make_new_run_id
from dagster._utils.tags import TagConcurrencyLimitsCounter

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.heartbeat import HEARTBEAT_TAG, WORKER_TAG
from enrich_pipeline.defs.instance import INSTANCE_YAML
from enrich_pipeline.defs.instance.run_coordinator import AFTER_TAG, UserRunCoordinator
from enrich_pipeline.defs.instance.run_launcher import HeartbeatRunLauncher, worker_health
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.runs import RANGE_END_TAG, RANGE_START_TAG, USER_TAG
from enrich_pipeline_tests.helpers import Items


def shipped_queue_config() -> dict:
    """The run coordinator section of the packaged dagster.yaml, with its variables filled."""
    config = yaml.safe_load(INSTANCE_YAML.read_text())["run_coordinator"]
    config["config"]["max_concurrent_runs"] = 4
    return config


@pytest.fixture
def queue_instance():
    with instance_for_test(overrides={"run_coordinator": shipped_queue_config()}) as instance:
        assert isinstance(instance.run_coordinator, UserRunCoordinator)
        instance.add_dynamic_partitions("users", ["alice", "bob", "carol", "dave"])
        yield instance


def origin(job: str) -> RemoteJobOrigin:
    """Where a queued run comes from (Dagster requires one; nothing is loaded from it here)."""
    location = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="enrich_pipeline.defs.definitions")
    )
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job)


def submit(instance: DagsterInstance, job: str, tags: dict[str, str]):
    run = create_run_for_test(instance, job_name=job, tags=tags, remote_job_origin=origin(job))
    instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))  # type: ignore[arg-type]
    queued = instance.get_run_by_id(run.run_id)
    assert queued is not None and queued.status == DagsterRunStatus.QUEUED
    return queued


def blocked(instance: DagsterInstance, run, in_progress: list) -> bool:  # noqa: ANN001
    limits = instance.run_coordinator.get_run_queue_config().tag_concurrency_limits
    started = [instance.get_run_by_id(r.run_id) for r in in_progress]
    return TagConcurrencyLimitsCounter(limits, started).is_blocked(run)


def test_every_way_of_starting_a_users_run_waits_for_the_one_in_flight(queue_instance) -> None:
    instance = queue_instance
    # The sensor's run of alice (partition tag), now running.
    first = submit(instance, "enrich_job", {"dagster/partition": "alice"})
    assert first.tags[USER_TAG] == "alice"
    # A backfill from the UI: __ASSET_JOB with range tags and no partition tag.
    ui_backfill = submit(
        instance,
        "__ASSET_JOB",
        {RANGE_START_TAG: "alice", RANGE_END_TAG: "alice", "dagster/backfill": "bf"},
    )
    # A materialization from the UI, and the command line's backfill (a job backfill).
    ui_run = submit(instance, "__ASSET_JOB", {"dagster/partition": "alice"})
    cli_backfill = submit(
        instance, "enrich_job", {"dagster/partition": "alice", "dagster/backfill": "x"}
    )
    for run in (ui_backfill, ui_run, cli_backfill):
        assert run.tags[USER_TAG] == "alice"
        assert blocked(instance, run, [first])
    # Another user is not held up.
    other = submit(instance, "__ASSET_JOB", {RANGE_START_TAG: "bob", RANGE_END_TAG: "bob"})
    assert not blocked(instance, other, [first])


def test_a_single_user_run_waits_for_a_shared_run_holding_its_user(queue_instance) -> None:
    instance = queue_instance
    shared = submit(instance, "enrich_job", {RANGE_START_TAG: "alice", RANGE_END_TAG: "carol"})
    assert shared.tags[AFTER_TAG] == shared.run_id
    assert "3 users: alice .. carol" in shared.tags["enrich/users"]
    bob = submit(instance, "__ASSET_JOB", {"dagster/partition": "bob"})
    assert bob.tags[AFTER_TAG] == shared.run_id
    assert blocked(instance, bob, [shared])
    dave = submit(instance, "__ASSET_JOB", {"dagster/partition": "dave"})
    assert AFTER_TAG not in dave.tags and not blocked(instance, dave, [shared])


def test_runs_of_other_jobs_are_queued_untouched(queue_instance) -> None:
    run = submit(queue_instance, "batch_collect_job", {"enrich/batch": "b1"})
    assert USER_TAG not in run.tags and AFTER_TAG not in run.tags


# --- dead runs ------------------------------------------------------------------------------


def test_a_run_beats_while_it_runs(env: pytest.MonkeyPatch, items: Items, image_dir: Path) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    resources = {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }
    started = time.time()
    result = materialize(
        [enriched_items], partition_key="alice", instance=instance, resources=resources
    )
    assert result.success
    run = instance.get_run_by_id(result.run_id)
    assert run is not None
    assert float(run.tags[HEARTBEAT_TAG]) >= int(started)
    assert run.tags[WORKER_TAG].endswith(f":{os.getpid()}")


def test_run_monitoring_fails_a_run_whose_process_is_gone_or_silent() -> None:
    with instance_for_test() as instance:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        import socket

        host = socket.gethostname()
        now = time.time()
        alive_id = make_new_run_id()
        alive = create_run_for_test(
            instance,
            job_name="enrich_job",
            run_id=alive_id,
            status=DagsterRunStatus.STARTED,
            tags={HEARTBEAT_TAG: str(int(now)), WORKER_TAG: f"{alive_id} {host}:{proc.pid}"},
        )
        assert worker_health(alive, timeout=90) is WorkerStatus.RUNNING
        proc.kill()
        proc.wait()
        # Killed: FAILED at once, whatever the heartbeat says.
        assert worker_health(alive, timeout=90) is WorkerStatus.FAILED
        # Silent for longer than the timeout (on another host, so no pid to look at).
        silent_id = make_new_run_id()
        silent = create_run_for_test(
            instance,
            job_name="enrich_job",
            run_id=silent_id,
            status=DagsterRunStatus.STARTED,
            tags={HEARTBEAT_TAG: str(int(now - 120)), WORKER_TAG: f"{silent_id} elsewhere:1"},
        )
        assert worker_health(silent, timeout=90) is WorkerStatus.FAILED
        assert worker_health(silent, timeout=300) is WorkerStatus.RUNNING
        # A run that does not beat (another code location's) is left alone.
        foreign = create_run_for_test(instance, job_name="x", status=DagsterRunStatus.STARTED)
        assert worker_health(foreign, timeout=1) is WorkerStatus.RUNNING
        launcher = HeartbeatRunLauncher()
        assert launcher.supports_check_run_worker_health
        result = launcher.check_run_worker_health(alive)
        assert result.status is WorkerStatus.FAILED and "ENRICH_RUN_HEARTBEAT_TIMEOUT" in result.msg
