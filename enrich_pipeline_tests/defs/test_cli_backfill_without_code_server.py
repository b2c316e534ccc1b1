"""``enrich-dagster backfill`` submits its backfill from its own process: no code server is
started (it cost most of the command's 7-17 s), and the backfill and its runs are what
``dagster job backfill`` made: one backfill, one queued run per user partition, each in its
user's queue, under the code location's name that the daemon launches it by."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.execution.backfill import BulkActionStatus

from enrich_pipeline.cli import dagster as enrich_dagster
from enrich_pipeline.defs.instance.run_coordinator import USER_TAG
from enrich_pipeline_tests.helpers import Items


@pytest.fixture
def dagster_home(env: pytest.MonkeyPatch, pg_conninfo: str, tmp_path: Path) -> Iterator[Path]:
    """A DAGSTER_HOME whose run storage is a database of its own on the test server."""
    name = f"dagster_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # generated name, not user input
    env.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    env.setenv("DAGSTER_PG_URL", enrich_dagster.dagster_url_for(pg_conninfo, name))
    yield tmp_path / "dagster_home"
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        # Dagster's pool may still hold a connection (no DROP ... FORCE before PostgreSQL 13).
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


class _Children:
    """Every process this one starts while watched (polled, so even a short-lived one)."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            for child in me.children(recursive=True):
                try:
                    # The test servers' PostgreSQL (children here on PostgreSQL 12) names
                    # Dagster's database in its backends' titles: not a Dagster process.
                    if child.name() != "postgres":
                        self.seen.setdefault(child.pid, " ".join(child.cmdline()))
                except psutil.Error:
                    continue

    def __enter__(self) -> _Children:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_backfill_queues_one_run_per_user_without_starting_a_code_server(
    dagster_home: Path, items: Items, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for user in ("alice", "bob"):
        items.add(user, str(image_dir / "blue.jpg"))
    with _Children() as children:
        code = enrich_dagster.main(["backfill", "--users", "alice, bob"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Backfilling 2 user partition(s): alice, bob" in out
    # A code server is `dagster api grpc` (or `dagster code-server`) in a child process.
    assert not [c for c in children.seen.values() if "grpc" in c or "dagster" in c], children.seen

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        (backfill,) = instance.get_backfills()
        assert backfill.status == BulkActionStatus.COMPLETED
        assert f"Launched backfill {backfill.backfill_id}: 2 run(s) queued" in out
        assert sorted(instance.get_dynamic_partitions("users")) == ["alice", "bob"]
        runs = instance.get_runs()
        assert sorted(r.tags["dagster/partition"] for r in runs) == ["alice", "bob"]
        for run in runs:
            assert run.job_name == "enrich_job"
            assert run.status == DagsterRunStatus.QUEUED  # no daemon here to launch it
            assert run.tags["dagster/backfill"] == backfill.backfill_id
            assert run.tags[USER_TAG] == run.tags["dagster/partition"]
            # The daemon finds the run's code by this name in its workspace (workspace.yaml).
            assert run.remote_job_origin is not None
            assert run.remote_job_origin.location_name == "enrich_pipeline"
