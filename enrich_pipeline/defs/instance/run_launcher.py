"""The run launcher: Dagster's default one (a run worker process per run), with the health check
it lacks, so that run monitoring notices a dead run.

Dagster's run monitoring fails a run whose worker the launcher reports dead, but the default
launcher (what ``dagster dev`` and a single-machine deployment use) offers no health check: a
run whose process was killed (``kill -9``, the OOM killer, a reboot) stays STARTED forever, and
with one run per user its user's next run waits behind it for good. The other offer, a maximum
runtime, would also kill long healthy runs.

So every run of this code location beats while it makes progress (``defs/heartbeat.py``), and
``HeartbeatRunLauncher`` (named by the ``dagster.yaml`` beside this module) reads the beat: a run
is FAILED when its worker is a process of this host that no longer exists, or when its last
heartbeat is older than ``ENRICH_RUN_HEARTBEAT_TIMEOUT`` seconds (90); run monitoring (every
20 s) then marks it failed, which frees its queue slot and pool slots. Runs without a heartbeat
(another code location's) are left to Dagster's other checks.
"""

from __future__ import annotations

import socket
import time

from dagster import DagsterRun, DefaultRunLauncher

# Dagster exports neither name; they are the types of the health-check API that
# ``check_run_worker_health`` must return (``RunLauncher``'s own signature uses them).
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

from enrich_pipeline.db.embedded import process_alive
from enrich_pipeline.defs.heartbeat import liveness_of


def worker_health(run: DagsterRun, timeout: float, now: float | None = None) -> WorkerStatus:
    """RUNNING, or FAILED when the run's process is gone or its heartbeat stopped."""
    now = time.time() if now is None else now
    live = liveness_of(run.run_id, run.tags)
    if live is None:
        return WorkerStatus.RUNNING  # not one of ours, or not beating yet: no opinion
    if live.host == socket.gethostname() and live.pid is not None and not process_alive(live.pid):
        return WorkerStatus.FAILED
    try:
        age = now - float(live.beat)
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
            live = liveness_of(run.run_id, run.tags)
            return CheckRunHealthResult(
                status,
                f"the run's process ({live.worker if live else '?'}) is gone or has not sent a "
                f"heartbeat for {timeout:.0f} s (ENRICH_RUN_HEARTBEAT_TIMEOUT)",
            )
        return CheckRunHealthResult(status)
