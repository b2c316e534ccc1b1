"""Noticing a dead run: a heartbeat from every run, and a run launcher whose health check reads it.

Dagster's run monitoring fails a run whose worker the launcher reports dead, but the default
launcher (a run worker process per run, what ``dagster dev`` and a single-machine deployment use)
offers no health check: a run whose process was killed (``kill -9``, the OOM killer, a reboot)
stays STARTED forever, and with one run per user its user's next run waits behind it for good.
The other offer, a maximum runtime, would also kill long healthy runs.

So every run of this code location beats: its DashScope resource starts a thread that writes
the tag ``enrich/heartbeat`` (epoch seconds) every ``ENRICH_RUN_HEARTBEAT_INTERVAL`` seconds (10),
and records ``enrich/worker`` (host and pid). ``HeartbeatRunLauncher`` (``dagster.yaml``) is the
default launcher with ``check_run_worker_health``: a run is FAILED when its worker is a process
of this host that no longer exists, or when its last heartbeat is older than
``ENRICH_RUN_HEARTBEAT_TIMEOUT`` seconds (90); run monitoring (every 20 s) then marks it failed,
which frees its queue slot and pool slots. Runs without a heartbeat (another code location's)
are left to Dagster's other checks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from dagster import DagsterInstance, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus

from enrich_pipeline.db.embedded import process_alive

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "enrich/heartbeat"
WORKER_TAG = "enrich/worker"


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Writes the run's heartbeat tag until stopped (a daemon thread: it dies with the run)."""

    def __init__(self, instance: DagsterInstance, run_id: str, interval: float) -> None:
        self.instance = instance
        self.run_id = run_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="enrich-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat({WORKER_TAG: worker_label()})
        self._thread.start()
        return self

    def _beat(self, extra: dict[str, str] | None = None) -> None:
        try:
            self.instance.add_run_tags(
                self.run_id, {HEARTBEAT_TAG: str(int(time.time())), **(extra or {})}
            )
        except Exception as exc:  # noqa: BLE001 - storage away for a moment: beat again later
            log.warning("run heartbeat not written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()


def worker_health(run: DagsterRun, timeout: float, now: float | None = None) -> WorkerStatus:
    """RUNNING, or FAILED when the run's process is gone or its heartbeat stopped."""
    now = time.time() if now is None else now
    beat = run.tags.get(HEARTBEAT_TAG)
    if beat is None:
        return WorkerStatus.RUNNING  # not one of ours, or not beating yet: no opinion
    host, _, pid = run.tags.get(WORKER_TAG, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
        return WorkerStatus.FAILED
    try:
        age = now - float(beat)
    except ValueError:
        return WorkerStatus.RUNNING
    return WorkerStatus.FAILED if age > timeout else WorkerStatus.RUNNING


class HeartbeatRunLauncher(DefaultRunLauncher):
    """The default run launcher, plus a health check that run monitoring can use."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        from enrich_pipeline.defs.config import dagster_settings

        timeout = dagster_settings().heartbeat_timeout
        status = worker_health(run, timeout)
        if status is WorkerStatus.FAILED:
            return CheckRunHealthResult(
                status,
                f"the run's process ({run.tags.get(WORKER_TAG, '?')}) is gone or has not sent a "
                f"heartbeat for {timeout:.0f} s (ENRICH_RUN_HEARTBEAT_TIMEOUT)",
            )
        return CheckRunHealthResult(status)
