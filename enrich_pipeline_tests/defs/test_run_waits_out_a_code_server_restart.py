"""A run that the queue takes while the code server is away (a crash and its restart, a new image
rolling out) goes back to the queue, and is launched once the server answers again, with the
run coordinator of the shipped ``dagster.yaml``: Dagster's own queue daemon over a real
``dagster api grpc`` server, the run started from the UI's launch mutation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.errors import DagsterUserCodeUnreachableError
from dagster._core.test_utils import instance_for_test
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import GrpcServerTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster._grpc.client import DagsterGrpcClient
from dagster_graphql.test.utils import execute_dagster_graphql

from enrich_pipeline.defs.instance import INSTANCE_YAML
from enrich_pipeline.defs.instance.run_coordinator import USER_TAG, UserRunCoordinator
from enrich_pipeline_tests.helpers import Items, free_port

LOCATION = "enrich_pipeline"
# Deadlines, not expectations: a code server loads the definitions in seconds, a run worker
# starts and captions one row in a few more, on a quiet machine; a busy 2-core one is slower.
SERVER_TIMEOUT = 120.0
RUN_TIMEOUT = 120.0
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
  }
}
"""


@contextmanager
def code_server(port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dagster api grpc`` of this code location, as the chart's user code deployment runs it,
    serving once it answers a ping."""
    dagster = Path(sys.executable).with_name("dagster")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(dagster), "api", "grpc", "-m", "enrich_pipeline.defs.definitions"]
            + ["-h", "127.0.0.1", "-p", str(port), "--location-name", LOCATION],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-5000:]
            try:
                client.ping("")
                break
            except DagsterUserCodeUnreachableError:
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-5000:]
                time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def queue_instance(env: pytest.MonkeyPatch) -> Iterator[DagsterInstance]:
    """An instance with the shipped dagster.yaml's run coordinator and run launcher, word for
    word (run storage in a temporary folder)."""
    env.setenv("ENRICH_MAX_CONCURRENT_RUNS", "4")
    shipped = yaml.safe_load(INSTANCE_YAML.read_text())
    overrides = {key: shipped[key] for key in ("run_coordinator", "run_launcher")}
    with instance_for_test(overrides=overrides) as instance:
        assert isinstance(instance.run_coordinator, UserRunCoordinator)
        instance.add_dynamic_partitions("users", ["alice"])
        yield instance


def _events(instance: DagsterInstance, run_id: str) -> list[str]:
    return [
        f"{e.dagster_event.event_type_value}: {e.message}" if e.dagster_event else e.message
        for e in instance.all_logs(run_id)
    ]


def test_a_run_taken_while_the_code_server_restarts_waits_in_the_queue_and_then_runs(
    queue_instance: DagsterInstance, items: Items, image_dir: Path, tmp_path: Path
) -> None:
    instance = queue_instance
    config = instance.run_coordinator.get_run_queue_config()
    assert (config.max_user_code_failure_retries, config.user_code_failure_retry_delay) == (5, 15)
    item = items.add("alice", str(image_dir / "blue.jpg"))
    port = free_port()
    log = tmp_path / "code-server.log"
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=2)
    target = GrpcServerTarget(host="127.0.0.1", port=port, socket=None, location_name=LOCATION)

    with code_server(port, log) as server:
        with WorkspaceProcessContext(instance, target) as process:
            # Alice's partition materialized from the UI: the run waits in the queue.
            result = execute_dagster_graphql(
                process.create_request_context(),
                LAUNCH_RUN,
                {
                    "executionParams": {
                        "selector": {
                            "repositoryLocationName": LOCATION,
                            "repositoryName": "__repository__",
                            "jobName": "enrich_job",
                        },
                        "executionMetadata": {
                            "tags": [{"key": "dagster/partition", "value": "alice"}]
                        },
                    }
                },
            )
            launched = result.data["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            assert launched["run"]["status"] == "QUEUED"

            # The code server dies (a crash, the old pod of a rollout) before the queue gets
            # to the run.
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            taken = time.time()
            list(daemon.run_iteration(process, fixed_iteration_time=taken))

            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == DagsterRunStatus.QUEUED
            assert run.tags[USER_TAG] == "alice"  # still in alice's queue
            lines = _events(instance, run_id)
            requeued = [line for line in lines if "re-submitting the run into the queue" in line]
            assert requeued == [
                "ENGINE_EVENT: Run dequeue failed to reach the user code server, re-submitting"
                " the run into the queue (5 retries remaining)"
            ], lines
            assert not [line for line in lines if "RUN_FAILURE" in line], lines

            # Within the retry delay the queue leaves the location's runs alone, even once the
            # server answers again (the restarted server, the new pod).
            with code_server(port, log):
                list(daemon.run_iteration(process, fixed_iteration_time=taken + 5))
                assert instance.get_run_by_id(run_id).status == DagsterRunStatus.QUEUED  # type: ignore[union-attr]
                assert _events(instance, run_id) == lines

                # After it the run is launched through the new server, and captions the row.
                list(daemon.run_iteration(process, fixed_iteration_time=taken + 16))
                run = instance.get_run_by_id(run_id)
                assert run is not None and run.status not in TERMINAL | {DagsterRunStatus.QUEUED}
                deadline = time.monotonic() + RUN_TIMEOUT
                while run.status not in TERMINAL:
                    assert time.monotonic() < deadline, _events(instance, run_id)
                    time.sleep(0.5)
                    run = instance.get_run_by_id(run_id)
                    assert run is not None
                assert run.status == DagsterRunStatus.SUCCESS, _events(instance, run_id)

    kinds = [e.dagster_event.event_type for e in instance.all_logs(run_id) if e.dagster_event]
    # Queued twice (submitted, put back), started once.
    assert kinds.count(DagsterEventType.RUN_ENQUEUED) == 2
    assert kinds.count(DagsterEventType.RUN_START) == 1
    assert items.row(item)["metadata"]["caption"]
