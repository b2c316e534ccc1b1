"""Runs that ended without finishing their rows, and when their users are requested again.

The pending-rows sensor requests a user when the user's pending set changes. A run that ends
with its rows still pending (failed on a provider outage or throttling, stopped by a bad key,
canceled, its process killed, or a success that gave its rows back uncharged) changes nothing,
so on its own the sensor would never request that user again. Each tick therefore reads the
runs that finished since the last one (``RunsFilter(updated_after=...)``, ascending, at most
``MAX_FINISHED`` a tick: the tick's cost follows the runs that ended, not the users or the
history) and, for each user such a run covered that is still pending:

- the user becomes due again once a back-off has passed since that run's end:
  ``ENRICH_RERUN_BACKOFF`` seconds (60), doubled for each such run in a row, at most
  ``ENRICH_RERUN_BACKOFF_MAX`` (1800), so an outage is retried, not hammered; a run that
  finishes its rows, or makes them change, ends the streak;
- a run stopped by an account or settings problem (the step failure's ``stopped_because``:
  a rejected key, arrears, a model the account may not use, a mistyped base URL; anything but
  ``provider_unavailable``) holds every request, for every user, while the DashScope settings
  are those it ran with (a digest, ``enrich/settings``: the key is never stored). A change of
  any ``DASHSCOPE_*`` setting (the code location restarted with it) lifts the hold; so does a
  run that a person started after the stop (a materialization or ``enrich-dagster backfill``)
  and that succeeded; deleting the sensor's cursor (``dagster sensor cursor
  pending_rows_sensor --delete``) forgets every hold and back-off.

A run Dagster has failed or canceled whose process is known to be gone (the launcher's own
health check: a pid of this host that no longer exists, or a heartbeat older than
``ENRICH_RUN_HEARTBEAT_TIMEOUT``) gives its claims back at once: its rows need not wait for
their lease, and a run taking the user's newer rows cannot leave the older ones behind. A
failed run whose process might still live keeps its claims until the lease ends (its own
renewals stop with its progress), since taking them from a live process could pay for a row
twice.

All of it lives in the sensor's cursor: a small record per user with a streak, the time of the
last requested retry, and the hold.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunRecord,
    RunsFilter,
)
from dagster._core.launcher import WorkerStatus

from enrich_pipeline.defs.instance.run_launcher import worker_health
from enrich_pipeline.defs.runs import PartitionOrder, run_keys
from enrich_pipeline.settings import AutomationSettings, DashScopeSettings

FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
UNFINISHED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
# The DashScope settings the sensor's runs were requested with, as a digest.
SETTINGS_TAG = "enrich/settings"
# Finished runs read per tick (more wait for the next tick).
MAX_FINISHED = 500
# How far back the first tick (a cursor without a watermark) reads finished runs: users left
# behind by an older version's failed runs come back too.
LOOKBACK = 86_400.0
# A run's end is stored with its own time, which may be a moment before it is written: each
# tick reads this far behind the last one, and skips the runs it has already counted.
MARGIN = 10.0
# Step failures read per failed run, and failed runs whose reason is read per tick.
STEP_FAILURES_READ = 20
REASONS_PER_TICK = 50
# The provider's stops that later runs ride out; every other ``stopped_because`` needs a person.
TRANSIENT_STOPS = frozenset({"provider_unavailable"})

_KEY_BYTES = 6
_RECORD = struct.Struct(">6sBI")  # key digest, unfinished runs in a row, due at (epoch s)


def settings_fingerprint(api: DashScopeSettings) -> str:
    """A digest of every DashScope setting, the API key included: it changes when any of them
    does, and reveals none of them."""
    values = {}
    for name in type(api).model_fields:
        value = getattr(api, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        values[name] = value
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8, person=b"enrich-settings").hexdigest()


# Every tick digests every pending user's key (100,000 users: about 0.15 s a pass), and the code
# server evaluating the sensor lives across ticks: remembered, a tick pays for new users only.
@functools.lru_cache(maxsize=1 << 18)
def _key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=_KEY_BYTES, person=b"enrich-rerun").digest()


@dataclass
class Retry:
    """A user whose runs ended with its rows pending: how many in a row, and when it is due."""

    unfinished: int
    due: int


@dataclass(frozen=True)
class Hold:
    """Every request held: a run stopped on a problem that only a person can fix."""

    settings: str
    code: str
    run_id: str
    since: float

    def describe(self) -> str:
        return (
            f"requests held since run {self.run_id[:8]} stopped with {self.code}: fix it "
            "(DASHSCOPE_API_KEY, the account's billing, the model, DASHSCOPE_BASE_URL) and "
            "restart the code location with the new setting, or materialize a user (a run "
            "started after the stop that succeeds lifts the hold)"
        )


@dataclass(frozen=True)
class Stop:
    """Why a failed run stopped, as its step failure recorded it."""

    code: str
    transient: bool


class Reruns:
    """The sensor's memory of unfinished runs (see the module docstring)."""

    def __init__(
        self,
        *,
        watermark: float | None = None,
        recent: Iterable[str] = (),
        retry: Mapping[bytes, Retry] | None = None,
        hold: Hold | None = None,
        generation: int = 0,
    ) -> None:
        self.watermark = watermark
        self.recent = set(recent)
        self.retry: dict[bytes, Retry] = dict(retry or {})
        self.hold = hold
        self.generation = generation
        self.read = 0  # finished runs read this tick
        self.released: list[str] = []  # dead runs whose claims were given back this tick

    # --- the cursor ---------------------------------------------------------------------------

    @classmethod
    def parse(cls, cursor: str | None) -> Reruns:
        data = json.loads(cursor) if cursor else None
        if not isinstance(data, dict) or data.get("v") != 3:
            return cls()
        raw = base64.b64decode(data.get("retry", ""))
        retry = {}
        for n in range(0, len(raw) - len(raw) % _RECORD.size, _RECORD.size):
            key, unfinished, due = _RECORD.unpack_from(raw, n)
            retry[key] = Retry(unfinished, due)
        hold = data.get("hold")
        return cls(
            watermark=data.get("watermark"),
            recent=data.get("recent", []),
            retry=retry,
            hold=Hold(**hold) if isinstance(hold, dict) else None,
            generation=int(data.get("generation", 0)),
        )

    def to_json(self) -> dict:
        raw = b"".join(
            _RECORD.pack(k, min(r.unfinished, 255), max(0, min(r.due, 2**32 - 1)))
            for k, r in sorted(self.retry.items())
        )
        return {
            "watermark": self.watermark,
            "recent": sorted(self.recent),
            "retry": base64.b64encode(raw).decode(),
            "hold": None if self.hold is None else self.hold.__dict__,
            "generation": self.generation,
        }

    # --- reading the finished runs ------------------------------------------------------------

    def finished_runs(self, instance: DagsterInstance, now: float) -> list[RunRecord]:
        """Runs that finished since the last tick (a little before: ``MARGIN``), oldest first,
        not counted yet."""
        since = (now - LOOKBACK) if self.watermark is None else self.watermark - MARGIN
        records = instance.get_run_records(
            filters=RunsFilter(
                statuses=FINISHED, updated_after=datetime.fromtimestamp(since, tz=UTC)
            ),
            limit=MAX_FINISHED + len(self.recent),
            order_by="update_timestamp",
            ascending=True,
        )
        self.read = len(records)
        fresh = []
        for record in records:
            ended = _ended(record)
            # Skipped: counted already, or an old run touched again (a tag written late).
            if record.dagster_run.run_id in self.recent or ended <= since:
                continue
            fresh.append(record)
        if records:
            self.watermark = max(r.update_timestamp.timestamp() for r in records)
            edge = self.watermark - MARGIN
            self.recent = {
                r.dagster_run.run_id for r in records if r.update_timestamp.timestamp() > edge
            }
        elif self.watermark is None:
            self.watermark = since
        return fresh

    # --- what they mean for the users ---------------------------------------------------------

    def record(
        self,
        runs: Sequence[RunRecord],
        order: PartitionOrder,
        unchanged: set[str],
        stops: Mapping[str, Stop],
        settings: str,
        automation: AutomationSettings,
    ) -> None:
        """Count the finished runs into the users' streaks and the hold. ``unchanged``: users
        still pending with the very pending set the sensor last requested (a run of theirs that
        succeeded left their rows as they were); ``stops``: why failed runs stopped."""
        for record in runs:
            run = record.dagster_run
            keys = run_keys(run.tags, order)
            if not keys:
                continue
            ended = _ended(record)
            status = run.status
            if status == DagsterRunStatus.SUCCESS:
                hold = self.hold
                if hold is not None and record.create_timestamp.timestamp() > hold.since:
                    self.hold = None  # asked for after the stop, and it worked
                for key in keys:
                    if key in unchanged:
                        self._bump(key, ended, automation)
                    else:
                        self.retry.pop(_key_digest(key), None)
                continue
            for key in keys:
                self._bump(key, ended, automation)
            stop = stops.get(run.run_id)
            if stop is not None and not stop.transient:
                self.hold = Hold(
                    run.tags.get(SETTINGS_TAG) or settings, stop.code, run.run_id, ended
                )

    def _bump(self, key: str, ended: float, automation: AutomationSettings) -> None:
        digest = _key_digest(key)
        retry = self.retry.get(digest) or Retry(0, 0)
        retry.unfinished = min(retry.unfinished + 1, 255)
        retry.due = int(ended + automation.rerun_wait(retry.unfinished) + 0.999)
        self.retry[digest] = retry

    def held(self, settings: str) -> Hold | None:
        """The hold, while the settings are those it was taken with (lifted otherwise)."""
        if self.hold is not None and self.hold.settings != settings:
            self.hold = None
        return self.hold

    def waiting(self, key: str) -> Retry | None:
        return self.retry.get(_key_digest(key))

    def due(self, keys: Iterable[str], now: float) -> set[str]:
        """Users whose last unfinished run's back-off has passed."""
        if not self.retry:
            return set()
        return {k for k in keys if (r := self.retry.get(_key_digest(k))) and r.due <= now}

    def backing_off(self, keys: Iterable[str], now: float) -> set[str]:
        if not self.retry:
            return set()
        return {k for k in keys if (r := self.retry.get(_key_digest(k))) and r.due > now}

    def requested(self, keys: Iterable[str], now: float, automation: AutomationSettings) -> None:
        """Users requested again: if their run never comes to an end (a request Dagster
        dropped), they are due again one back-off later."""
        for key in keys:
            retry = self.retry.get(_key_digest(key))
            if retry is not None:
                retry.due = int(now + automation.rerun_wait(retry.unfinished) + 0.999)

    def kept(self, pending: Iterable[str]) -> None:
        """Only the users still pending."""
        if not self.retry:
            return
        wanted = {_key_digest(k) for k in pending}
        self.retry = {k: r for k, r in self.retry.items() if k in wanted}


def _ended(record: RunRecord) -> float:
    return record.end_time or record.update_timestamp.timestamp()


def dead_runs(runs: Iterable[RunRecord], heartbeat_timeout: float) -> list[str]:
    """Failed or canceled runs whose process is gone (or silent past the heartbeat timeout):
    their claims can be given back at once."""
    return [
        r.dagster_run.run_id
        for r in runs
        if r.dagster_run.status in UNFINISHED
        and worker_health(r.dagster_run, heartbeat_timeout) is WorkerStatus.FAILED
    ]


def stops(instance: DagsterInstance, runs: Iterable[RunRecord]) -> dict[str, Stop]:
    """Why failed runs stopped, where a step failure says (``stopped_because``, set where a
    provider stop fails the step: ``defs/chunk_steps.provider_step``). Only runs failed by a
    step are read, newest first, at most ``REASONS_PER_TICK``."""
    failed = [
        r.dagster_run
        for r in runs
        if r.dagster_run.status == DagsterRunStatus.FAILURE
        and r.dagster_run.tags.get("dagster/failure_reason", "STEP_FAILURE") == "STEP_FAILURE"
    ]
    out: dict[str, Stop] = {}
    for run in failed[-REASONS_PER_TICK:]:
        stop = _stop_of(instance, run)
        if stop is not None:
            out[run.run_id] = stop
    return out


def _stop_of(instance: DagsterInstance, run: DagsterRun) -> Stop | None:
    connection = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.STEP_FAILURE, limit=STEP_FAILURES_READ
    )
    for record in connection.records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event is not None else None
        failure = data.user_failure_data if data is not None else None
        metadata = failure.metadata if failure is not None else {}
        code = metadata.get("stopped_because")
        if code is None:
            continue
        unavailable = metadata.get("provider_unavailable")
        transient = bool(unavailable.value) if unavailable is not None else False
        return Stop(str(code.value), transient or str(code.value) in TRANSIENT_STOPS)
    return None
