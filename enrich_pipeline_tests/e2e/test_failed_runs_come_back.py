"""End to end, with the real Dagster daemon: runs that end without finishing their rows (a
provider outage, a run worker killed with ``kill -9``) leave nothing stranded. Nobody clicks:
the sensor requests the user again once the cause can have passed, and every row is captioned.

The stack (launcher, webserver, daemon, stand-in, seeded namespace) is ``e2e/test_ui.py``'s,
with ``ENRICH_RERUN_BACKOFF=2`` and ``ENRICH_LEASE_SECONDS=10``.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from dagster import DagsterRunStatus
from PIL import Image

from enrich_pipeline.defs.heartbeat import liveness_of
from enrich_pipeline_tests.e2e.test_ui import (
    RUNS_TIMEOUT,
    TERMINAL,
    Stack,
    _dump_output_on_failure,
    _user_runs,
    _wait_all_captioned,
    stack,  # noqa: F401 - the module's stack
)
from enrich_pipeline_tests.helpers import hues

FOREVER = 1_000_000


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Stack:
    """``test_ui.py``'s stack, started for this module."""
    return request.getfixturevalue("stack")


def _rows(daemon: Stack, user: str, n: int) -> list[str]:
    folder = Path(daemon.items.row(daemon.seeded["alice"][0])["image"]).parent
    ids = []
    for k, rgb in enumerate(hues(n)):
        path = folder / f"{user}_{k}.png"
        Image.new("RGB", (42, 30), rgb).save(path)
        ids.append(daemon.items.add(user, str(path)))
    return ids


def _wait_for_run(daemon: Stack, user: str, status: DagsterRunStatus, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in _user_runs(daemon, user) if r.status == status]
        if runs:
            return runs[0]
        assert time.monotonic() < deadline, f"no {status.value} run for {user}: " + ", ".join(
            r.status.value for r in _user_runs(daemon, user)
        )
        time.sleep(0.3)


def _ledger_and_claims(daemon: Stack, user: str) -> tuple[int, int]:
    (failures,) = daemon.items.execute(
        "SELECT count(*) FROM {ns}.enrich_failures WHERE user_id = %s", (user,)
    )[0]
    (claims,) = daemon.items.execute(
        "SELECT count(*) FROM {ns}.enrich_claims WHERE user_id = %s AND expires_at > now()",
        (user,),
    )[0]
    return failures, claims


def test_after_an_outage_the_user_is_requested_again_and_every_row_captioned(
    daemon: Stack,
) -> None:
    """503 on every call: the run fails and charges no row. Once the provider answers again,
    the sensor requests the user again (its pending set unchanged) and the rows are
    captioned."""
    daemon.wait_for_runs()
    user = "olga"
    daemon.standin.inject("503", times=FOREVER, endpoint="chat")
    try:
        with _dump_output_on_failure(daemon):
            ids = _rows(daemon, user, 4)
            failed = _wait_for_run(daemon, user, DagsterRunStatus.FAILURE, RUNS_TIMEOUT)
            assert all(not daemon.items.row(i)["metadata"].get("caption") for i in ids)
            assert _ledger_and_claims(daemon, user)[0] == 0, "no row charged"
    finally:
        daemon.standin.clear_faults()
    with _dump_output_on_failure(daemon):
        _wait_all_captioned(daemon, ids)
        # The rows are written before the run's last steps: wait for it to end.
        _wait_for_run(daemon, user, DagsterRunStatus.SUCCESS, RUNS_TIMEOUT)
        runs = _user_runs(daemon, user)
        assert all(r.tags.get("dagster/sensor_name") == "pending_rows_sensor" for r in runs)
        keys = [r.tags["dagster/run_key"] for r in runs]
        assert len(set(keys)) == len(keys) and failed.run_id in {r.run_id for r in runs}
        assert _ledger_and_claims(daemon, user) == (0, 0)


def test_a_killed_run_worker_with_no_new_rows_is_requested_again(daemon: Stack) -> None:
    """``kill -9`` of a run's process (the code server that launched it paused, so nobody
    reports it; ``test_ui.py``'s killed-run test adds new rows, which this one does not): run
    monitoring fails the run, its claims are given back, and the sensor requests the user
    again though its pending set did not change."""
    daemon.wait_for_runs()
    user = "pia"
    daemon.standin.latency = 5.0  # the run is surely in its captions when it is killed
    try:
        with _dump_output_on_failure(daemon):
            ids = _rows(daemon, user, 4)
            deadline = time.monotonic() + RUNS_TIMEOUT
            while True:
                runs = [r for r in _user_runs(daemon, user) if r.status == DagsterRunStatus.STARTED]
                if runs and liveness_of(runs[0].run_id, runs[0].tags) is not None:
                    break
                assert time.monotonic() < deadline, f"no run for {user} started"
                time.sleep(0.3)
            (run,) = runs
            live = liveness_of(run.run_id, run.tags)
            assert live is not None and live.pid is not None
            worker = psutil.Process(live.pid)
            parent = worker.parent()
            assert parent is not None and "grpc" in " ".join(parent.cmdline()), parent
            parent.suspend()
            try:
                worker.kill()
                killed_at = time.monotonic()
                while True:
                    status = daemon.instance.get_run_by_id(run.run_id).status
                    if status in TERMINAL:
                        break
                    assert time.monotonic() - killed_at < 90, f"killed run still {status}"
                    time.sleep(0.5)
            finally:
                parent.resume()
            daemon.standin.latency = 0.0
            assert status == DagsterRunStatus.FAILURE
            _wait_all_captioned(daemon, ids, timeout=150)
    finally:
        daemon.standin.latency = 0.0
    _wait_for_run(daemon, user, DagsterRunStatus.SUCCESS, RUNS_TIMEOUT)
    runs = _user_runs(daemon, user)
    assert [r.run_id for r in runs if r.status == DagsterRunStatus.FAILURE] == [run.run_id]
    assert _ledger_and_claims(daemon, user) == (0, 0)
