"""The run's heartbeat: a resource that beats while the run makes progress.

Every run of this code location writes the tag ``.dagster/enrich/heartbeat`` (epoch seconds)
every ``ENRICH_RUN_HEARTBEAT_INTERVAL`` seconds (10) and records ``.dagster/enrich/worker`` (its
run id, host and pid); the run launcher's health check (``instance/run_launcher.py``) reports a
run dead when that tag is older than ``ENRICH_RUN_HEARTBEAT_TIMEOUT`` seconds (90) or the
process is gone.

Where the beat is kept: Dagster hides run tags under ``.dagster/`` from the UI and GraphQL (its
own run worker id lives there), so the beat stays on the run, where run monitoring's health
check reads it with the run it already holds, without cluttering the run's visible tags. Being
hidden, the UI's re-execution never copies them to the new run; a copy that an API re-execution
(``use_parent_run_tags``) makes is not taken for the new run's beat, since the worker tag names
the run that wrote it. Runs started before the move carry ``enrich/heartbeat`` and
``enrich/worker`` (``LEGACY_*``), still read when a run has no hidden beat.

A process that is alive but stuck (a call that never returns, a lock never released) would beat
forever, and with one run per user its user would wait behind it for good. So the enrichment
run reports its progress (``progress``: a step starting or ending, a chunk loaded, a caption
taken; ``watch``: the provider's call counts, which move with every call that ends, answered or
failed) and the heartbeat beats only while the last progress is at most the **stall window**
old. The stall window is ``ENRICH_RUN_HEARTBEAT_TIMEOUT`` itself: the deployment's own figure
for how long a run may be silent. A run that stops progressing then stops beating, run
monitoring fails it one timeout later, and its claims stop being renewed (``ops.py`` gates the
lease keeper on ``progressing``), so its rows come back to the next run. A quiet spell shorter
than stall window plus timeout (about 180 s by default, above a model call's 60 s deadline and
its 30 s backoff) costs nothing: the beat resumes with the next progress.

A run that never reports progress (the batch jobs: their steps have no inner progress signal)
beats while its process lives, as every run did before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dagster import ConfigurableResource, DagsterInstance, InitResourceContext
from pydantic import PrivateAttr

log = logging.getLogger(__name__)

HEARTBEAT_TAG = ".dagster/enrich/heartbeat"
WORKER_TAG = ".dagster/enrich/worker"
# What runs started by the previous code carry (visible tags; the worker without its run id).
LEGACY_HEARTBEAT_TAG = "enrich/heartbeat"
LEGACY_WORKER_TAG = "enrich/worker"


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Liveness:
    """What a run's tags say of its liveness: its last beat and its worker process."""

    beat: str
    host: str
    pid: int | None

    @property
    def worker(self) -> str:
        return f"{self.host}:{self.pid}" if self.pid is not None else "?"


def liveness_of(run_id: str, tags: Mapping[str, str]) -> Liveness | None:
    """The run's own beat, or None when it has none (not beating yet, another code location's
    run, or tags copied from the run it re-executes)."""
    beat = tags.get(HEARTBEAT_TAG)
    if beat is not None:
        # Written with the first beat, so only a copy carries another run's id.
        owner, _, label = tags.get(WORKER_TAG, f"{run_id} ").partition(" ")
        if owner != run_id:
            return None
    else:
        beat, label = tags.get(LEGACY_HEARTBEAT_TAG), tags.get(LEGACY_WORKER_TAG, "")
        if beat is None:
            return None
    host, _, pid = label.rpartition(":")
    return Liveness(beat, host, int(pid) if pid.isdigit() else None)


class Pulse:
    """When the run last made progress, on ``clock`` (monotonic seconds; tests give their own).

    A run that reports progress is held to it: it counts as progressing until ``stall`` seconds
    pass without any. One that never reports (no ``progress``, no ``watch``) always counts as
    progressing.
    """

    def __init__(self, stall: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall = stall
        self._clock = clock
        self._last = clock()
        self._held = False
        self._probes: dict[str, Callable[[], Any]] = {}
        self._seen: dict[str, Any] = {}
        self._lock = threading.Lock()

    def progress(self) -> None:
        with self._lock:
            self._held = True
            self._last = self._clock()

    def watch(self, name: str, probe: Callable[[], Any]) -> None:
        """Count a change of ``probe()`` (read at every beat) as progress; ``name`` replaces an
        earlier probe of that name."""
        with self._lock:
            self._held = True
            self._probes[name] = probe
            self._seen[name] = probe()
            self._last = self._clock()

    def idle(self) -> float:
        """Seconds since the last progress, after reading the probes."""
        with self._lock:
            now = self._clock()
            for name, probe in self._probes.items():
                value = probe()
                if value != self._seen[name]:
                    self._seen[name] = value
                    self._last = now
            return now - self._last

    def progressing(self) -> bool:
        idle = self.idle()
        return not self._held or idle <= self.stall


class Heartbeat:
    """Writes the run's heartbeat tag every ``interval`` seconds while its pulse says the run
    progresses (a daemon thread: it dies with the run)."""

    def __init__(
        self,
        instance: DagsterInstance,
        run_id: str,
        interval: float,
        pulse: Pulse,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance
        self.run_id = run_id
        self.interval = interval
        self.pulse = pulse
        self._wall = wall
        self._stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="enrich-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._write({WORKER_TAG: f"{self.run_id} {worker_label()}"})
        self._thread.start()
        return self

    def beat(self) -> bool:
        """One beat, if the run still progresses; whether it was written."""
        if not self.pulse.progressing():
            if not self._stalled:
                self._stalled = True
                log.warning(
                    "run %s made no progress for %.0f s (ENRICH_RUN_HEARTBEAT_TIMEOUT): its "
                    "heartbeat stops, so that run monitoring fails it",
                    self.run_id,
                    self.pulse.idle(),
                )
            return False
        if self._stalled:
            self._stalled = False
            log.warning("run %s progresses again: its heartbeat resumes", self.run_id)
        self._write()
        return True

    def _write(self, extra: dict[str, str] | None = None) -> None:
        try:
            self.instance.add_run_tags(
                self.run_id, {HEARTBEAT_TAG: str(int(self._wall())), **(extra or {})}
            )
        except Exception as exc:  # noqa: BLE001 - storage away for a moment: beat again later
            log.warning("run heartbeat not written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()


class HeartbeatResource(ConfigurableResource):
    """The run's heartbeat (this module's docstring); outside a run (sensors, direct calls) it
    does nothing and the run always counts as progressing."""

    _pulse: Pulse | None = PrivateAttr(default=None)
    _heartbeat: Heartbeat | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        run = getattr(context, "run", None)
        if context.instance is None or run is None:
            return
        # Read when the run starts, like every other setting; imported here because the run
        # launcher imports this module for its tags, and the daemon needs no run settings.
        from enrich_pipeline.defs.config import dagster_settings

        settings = dagster_settings()
        self._pulse = Pulse(stall=settings.heartbeat_timeout)
        self._heartbeat = Heartbeat(
            context.instance, run.run_id, settings.heartbeat_interval, self._pulse
        ).start()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def progress(self) -> None:
        """The run moved: a step started or ended, a chunk loaded, a caption taken."""
        if self._pulse is not None:
            self._pulse.progress()

    def watch(self, name: str, probe: Callable[[], Any]) -> None:
        """A value whose every change is progress (read at every beat)."""
        if self._pulse is not None:
            self._pulse.watch(name, probe)

    def progressing(self) -> bool:
        return self._pulse is None or self._pulse.progressing()
