"""A run's liveness bookkeeping (its heartbeat and worker) is kept out of the tags the UI shows,
while the launcher's health check and the sensor's dead-run release still judge every run:
runs of this code, runs the previous code started (visible ``enrich/*`` tags), and runs that
carry a copy of another run's tags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, materialize
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.tags import TagType, get_tag_type
from dagster._core.test_utils import create_run_for_test, instance_for_test
from dagster._core.utils import make_new_run_id
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster_graphql.test.utils import execute_dagster_graphql

from enrich_pipeline.cli.dagster import WORKSPACE_YAML
from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.heartbeat import (
    HEARTBEAT_TAG,
    LEGACY_HEARTBEAT_TAG,
    LEGACY_WORKER_TAG,
    WORKER_TAG,
    liveness_of,
)
from enrich_pipeline.defs.instance.backfill import workspace_opts
from enrich_pipeline.defs.instance.run_launcher import HeartbeatRunLauncher, worker_health
from enrich_pipeline.defs.reruns import dead_runs
from enrich_pipeline_tests.defs.test_asset import resources
from enrich_pipeline_tests.helpers import Items

RUN_TAGS = """
query RunTags($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { tags { key value } } }
}
"""


def _graphql_tags(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """The run's tags as the UI gets them (GraphQL, over the code location in process)."""
    from dagster._cli.workspace.cli_target import workspace_opts_to_load_target

    target = workspace_opts_to_load_target(
        workspace_opts(["-w", str(WORKSPACE_YAML)]), allow_in_process=True
    )
    with WorkspaceProcessContext(instance, target) as process:
        result = execute_dagster_graphql(
            process.create_request_context(), RUN_TAGS, {"runId": run_id}
        )
    return {t["key"]: t["value"] for t in result.data["runOrError"]["tags"]}


def test_a_run_keeps_its_heartbeat_where_the_ui_does_not_show_it(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("users", ["alice"])
        started = time.time()
        result = materialize(
            [enriched_items], partition_key="alice", instance=instance, resources=resources()
        )
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        # Kept on the run, hidden: the health check reads it from the run it holds.
        assert get_tag_type(HEARTBEAT_TAG) is TagType.HIDDEN
        assert get_tag_type(WORKER_TAG) is TagType.HIDDEN
        live = liveness_of(run.run_id, run.tags)
        assert live is not None and float(live.beat) >= int(started)
        assert live.pid == os.getpid() and live.host == socket.gethostname()
        # What a person sees on the run's page: the partition, no liveness bookkeeping.
        shown = _graphql_tags(instance, run.run_id)
        assert shown.get("dagster/partition") == "alice"
        assert not [k for k in shown if "heartbeat" in k or "worker" in k], shown


def test_runs_the_previous_code_started_are_still_judged_by_their_old_tags() -> None:
    with instance_for_test() as instance:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        host = socket.gethostname()
        now = time.time()
        old = create_run_for_test(
            instance,
            job_name="enrich_job",
            status=DagsterRunStatus.STARTED,
            tags={LEGACY_HEARTBEAT_TAG: str(int(now)), LEGACY_WORKER_TAG: f"{host}:{proc.pid}"},
        )
        assert worker_health(old, timeout=90) is WorkerStatus.RUNNING
        proc.kill()
        proc.wait()
        assert worker_health(old, timeout=90) is WorkerStatus.FAILED
        result = HeartbeatRunLauncher().check_run_worker_health(old)
        assert result.status is WorkerStatus.FAILED
        assert f"{host}:{proc.pid}" in (result.msg or "")
        silent = create_run_for_test(
            instance,
            job_name="enrich_job",
            status=DagsterRunStatus.STARTED,
            tags={LEGACY_HEARTBEAT_TAG: str(int(now - 120)), LEGACY_WORKER_TAG: "elsewhere:1"},
        )
        assert worker_health(silent, timeout=90) is WorkerStatus.FAILED
        # The sensor gives back the claims of such a run once it has failed.
        instance.report_run_failed(old)
        instance.report_run_failed(silent)
        records = instance.get_run_records()
        assert set(dead_runs(records, heartbeat_timeout=90)) == {old.run_id, silent.run_id}


def test_a_copy_of_another_runs_beat_is_not_taken_for_this_runs() -> None:
    """A re-execution through the API with ``use_parent_run_tags`` copies hidden tags too: the
    new run, not yet beating, must not be failed for its parent's dead process."""
    with instance_for_test() as instance:
        parent_id = make_new_run_id()
        copied = {
            HEARTBEAT_TAG: str(int(time.time() - 3600)),
            WORKER_TAG: f"{parent_id} {socket.gethostname()}:{2**22 + 7}",
        }
        child = create_run_for_test(
            instance, job_name="enrich_job", status=DagsterRunStatus.STARTED, tags=copied
        )
        assert liveness_of(child.run_id, child.tags) is None
        assert worker_health(child, timeout=90) is WorkerStatus.RUNNING
        # Its own first beat (same keys, written over the copy) is judged as usual.
        instance.add_run_tags(
            child.run_id,
            {HEARTBEAT_TAG: str(int(time.time() - 3600)), WORKER_TAG: f"{child.run_id} x:1"},
        )
        run = instance.get_run_by_id(child.run_id)
        assert run is not None and worker_health(run, timeout=90) is WorkerStatus.FAILED
