"""The sensor that picks up new caption-less rows and requests runs for their users.

Each tick runs two cheap queries (served by the partial index on pending rows), adds partitions
for users it has not seen, and requests runs for the users whose pending set changed, unless a
queued or running run (of any job: the sensor's, a materialization or backfill from the UI or
the command line) or a backfill still launching runs holds that user. Held users stay out of
the cursor, so they are requested as soon as they are free.

A run that ends without finishing its rows (failed, canceled, killed, stopped by the provider,
or a success that gave them back) changes no pending set: the runs that finished since the last
tick make their users due again after a back-off, a stop that needs a person holds every
request until the DashScope settings change, and dead runs' claims are given back
(``reruns.py``).

How many runs, and of what:

- At most ``ENRICH_SENSOR_MAX_RUNS`` runs a tick (default: twice ``ENRICH_MAX_CONCURRENT_RUNS``
  less the runs already queued or running), so the queue holds what can start soon, not ten
  thousand runs; users left over are requested by later ticks.
- When every changed user fits in that budget, each gets a run of its own (partition key
  ``<user>``, run key ``<partition>|<count>-<newest updated_at>-<attempts>|<generation>``: the
  cursor's record of requested pending sets keeps an unchanged set from running twice, and the
  generation, one more each tick that requests runs, keeps a set that comes back (rows a dead
  run held) from a key Dagster already saw: it drops such a request, remembering keys forever).
- When there are more, users with fewer than ``ENRICH_BUNDLE_ROWS`` (2,000) pending rows share
  a run: a run over a range of consecutive user partitions (at most ``ENRICH_BUNDLE_USERS``,
  1,000, and about ``ENRICH_BUNDLE_ROWS`` rows), which still records one materialization per
  user with that user's own figures. A larger user keeps a run of its own. A range never spans
  a user that is held elsewhere or whose rows did not change; it may span a few partitions with
  nothing pending (their materialization then says so). The fullest runs are chosen first.
- On a cold start (no run of the job queued or running) the first runs are staggered: of the
  ``ENRICH_MAX_CONCURRENT_RUNS`` runs that start together, the first shared ones take 1/4, 2/4,
  3/4 of their rows (with 4), so they end one after another and each one's last steps overlap
  the others' model calls (``plan_runs``).

New users' partitions are added by the tick, at most ``MAX_NEW_PARTITIONS`` (50,000) a tick:
users past that wait for the next ticks. The partitions are kept between ticks in the process
that evaluates the sensor (``known_partitions.py``).

The runs it requests call the model with ``ENRICH_SENSOR_CONCURRENT`` calls in flight (16). The
quota is the account's, not the run's: where the provider layer's shared budget paces every
process (``ENRICH_SHARED_QUOTA``) the runs use it; otherwise each of the runs at once gets an
equal share of ``DASHSCOPE_RPM``.

The cursor remembers, for every user still pending, a 6-byte digest of (partition, fingerprint)
that was requested: about 80 KB for 10,000 users instead of a JSON map several times that; and
11 bytes for each user waiting after an unfinished run (``reruns.py``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psycopg
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

# Dagster's own clock: what its daemon ticks by, and what its test tools can move.
from dagster._time import get_current_timestamp

from enrich_pipeline.defs.config import AUTOMATION, dagster_settings
from enrich_pipeline.defs.jobs import enrich_job
from enrich_pipeline.defs.known_partitions import known_order, missing
from enrich_pipeline.defs.partitions import user_to_key, users_partitions
from enrich_pipeline.defs.reruns import (
    SETTINGS_TAG,
    Reruns,
    dead_runs,
    settings_fingerprint,
    stops,
)
from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline.defs.runs import (
    RANGE_END_TAG,
    RANGE_START_TAG,
    PartitionOrder,
    retry_later,
    run_keys,
    runs_in_flight,
    users_in_flight,
)
from enrich_pipeline.settings import (
    AutomationSettings,
    ConfigError,
    DashScopeSettings,
    RunSettings,
)

DIGEST_BYTES = 6
# New users' partitions added by one tick, at most: adding 100,000 took 8 s here (82 us each,
# more as the table grows) and Dagster gives a sensor's evaluation 60 s, so a first tick at a
# million users would never finish (benchmarks/scale.py).
MAX_NEW_PARTITIONS = 50_000
# Idle partitions (nothing pending) a shared range may step over, in a row.
MAX_GAP = 20


# --- the cursor --------------------------------------------------------------------------------


# Every tick digests every pending user's (partition, fingerprint) twice (100,000 users: about
# 0.2 s a pass); the code server evaluating the sensor lives across ticks and most pending sets
# do not change between two: remembered, a tick pays for the changed ones only.
@functools.lru_cache(maxsize=1 << 18)
def _digest(key: str, fingerprint: str) -> bytes:
    return hashlib.blake2b(f"{key}\x00{fingerprint}".encode(), digest_size=DIGEST_BYTES).digest()


class Seen:
    """The (partition, fingerprint) pairs already requested, as a set of short digests."""

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        self.digests = set(digests)

    @classmethod
    def parse(cls, cursor: str | None) -> Seen:
        if not cursor:
            return cls()
        data = json.loads(cursor)
        if isinstance(data, dict) and data.get("v") in (2, 3):
            raw = base64.b64decode(data.get("seen", ""))
            return cls(raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES))
        if isinstance(data, dict):  # the first cursor format: {partition: fingerprint}
            return cls(_digest(str(k), str(v)) for k, v in data.items())
        return cls()

    def unchanged(self, fingerprints: Mapping[str, str]) -> set[str]:
        """The partitions whose pending set (fingerprint) is the one requested."""
        digests = self.digests
        return {k for k, fp in fingerprints.items() if _digest(k, fp) in digests}

    def add(self, key: str, fingerprint: str) -> None:
        self.digests.add(_digest(key, fingerprint))

    def kept(self, fingerprints: Mapping[str, str]) -> Seen:
        """Only the digests of these partitions' pending sets (users still pending, unchanged
        or requested)."""
        return Seen(self.digests.intersection(map(_digest, fingerprints, fingerprints.values())))

    def to_json(self) -> dict:
        raw = b"".join(sorted(self.digests))
        return {"v": 3, "seen": base64.b64encode(raw).decode()}

    def dumps(self) -> str:
        return json.dumps(self.to_json())


# --- planning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One run to request: one partition, or a range of them."""

    keys: tuple[str, ...]
    rows: int

    @property
    def shared(self) -> bool:
        return len(self.keys) > 1


def plan_runs(
    order: Sequence[str],
    wanted: Mapping[str, int],
    blocked: set[str],
    *,
    budget: int,
    bundle_rows: int,
    bundle_users: int,
    stagger: int = 0,
) -> list[Planned]:
    """Runs for the ``wanted`` partitions (key -> pending rows), in partition order, at most
    ``budget``. One run each when they fit the budget; otherwise small users share ranges of
    consecutive partitions that avoid ``blocked`` keys (held elsewhere, or pending but
    unchanged), and the fullest runs are chosen.

    ``stagger`` (the runs that start at once, on a cold start): the first ``stagger - 1``
    shared runs keep only 1/stagger, 2/stagger, ... of their rows, so that the runs that start
    together end one after another. Equal runs started together would also end together, and
    their last steps (a materialization and three check evaluations per user) would then leave
    the quota idle; staggered, one run's last steps overlap the others' calls, and the runs
    started after them inherit the offsets."""
    if budget <= 0 or not wanted:
        return []
    ordered = [k for k in order if k in wanted]
    if len(ordered) <= budget:
        return [Planned((k,), wanted[k]) for k in ordered]
    runs: list[Planned] = []
    current: list[str] = []  # the range being built, ending on a wanted key
    gap: list[str] = []  # idle keys since its last wanted key
    rows = 0

    def close() -> None:
        nonlocal current, gap, rows
        if current:
            runs.append(Planned(tuple(current), rows))
        current, gap, rows = [], [], 0

    for key in order:
        if key in wanted:
            n = wanted[key]
            if n >= bundle_rows:
                close()
                runs.append(Planned((key,), n))
                continue
            if current and (rows + n > bundle_rows or len(current) + len(gap) + 1 > bundle_users):
                close()
            current.extend(gap)
            gap = []
            current.append(key)
            rows += n
        elif key in blocked:
            close()
        elif current:
            gap.append(key)
            if len(gap) > MAX_GAP:
                close()
    close()
    # The fullest runs first (a few users left over here and there must not take the places of
    # full ones), then in partition order.
    chosen = sorted(range(len(runs)), key=lambda i: -runs[i].rows)[:budget]
    picked = [runs[i] for i in sorted(chosen)]
    for n in range(min(stagger - 1, len(picked))):
        if picked[n].shared:
            picked[n] = _head(picked[n], wanted, (n + 1) / stagger)
    return picked


def _head(run: Planned, wanted: Mapping[str, int], share: float) -> Planned:
    """The first partitions of a shared run holding about ``share`` of its rows (ending on a
    wanted key; the rest is left to later ticks)."""
    keys: list[str] = []
    rows = 0
    for key in run.keys:
        keys.append(key)
        rows += wanted.get(key, 0)
        if key in wanted and rows >= share * run.rows:
            break
    return Planned(tuple(keys), rows)


def _quota_is_shared(api: DashScopeSettings, *, embedded: bool) -> bool:
    """Whether every process already paces on one budget per model (the provider layer's
    shared quota, ``ENRICH_SHARED_QUOTA``, where the settings tree has it: on by default with a
    configured database). Then runs must not split the quota among themselves as well."""
    shared = getattr(api, "shared_quota", False)
    return (not embedded) if shared is None else bool(shared)


def _run_config(concurrent: int, rpm: int | None) -> dict:
    config: dict = {
        "ops": {"enriched_items": {"ops": {"pending_rows": {"config": {"concurrent": concurrent}}}}}
    }
    if rpm is not None:
        config["resources"] = {"dashscope": {"config": {"requests_per_minute": rpm}}}
    return config


def _request(
    run: Planned,
    fingerprints: Mapping[str, str],
    concurrent: int,
    rpm: int | None,
    *,
    generation: int,
    settings: str,
) -> RunRequest:
    """The run's request. Its run key ends with the tick's generation: Dagster drops a request
    whose key any earlier run had, forever, and a pending set can come back to an earlier
    fingerprint (rows a dead run held, returned), so no two ticks make the same key, while the
    same tick evaluated again does."""
    config = _run_config(concurrent, rpm)
    tags = {SETTINGS_TAG: settings}
    if not run.shared:
        (key,) = run.keys
        return RunRequest(
            partition_key=key,
            run_key=f"{key}|{fingerprints[key]}|{generation}",
            run_config=config,
            tags=tags,
        )
    digest = hashlib.blake2b(digest_size=8)
    for key in run.keys:
        digest.update(f"{key}\x00{fingerprints.get(key, '-')}\x01".encode())
    first, last = run.keys[0], run.keys[-1]
    return RunRequest(
        run_key=f"users|{first}|{last}|{digest.hexdigest()}|{generation}",
        run_config=config,
        tags={**tags, RANGE_START_TAG: first, RANGE_END_TAG: last},
    )


@sensor(
    job=enrich_job,
    minimum_interval_seconds=AUTOMATION.sensor_interval,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Every ENRICH_SENSOR_INTERVAL seconds: adds a partition for each user with caption-less "
        "rows and requests runs for users whose pending rows changed, or whose last run ended "
        "without finishing them (after a back-off; held while a run's stop needs a person), "
        "one run per user or shared runs of small users when there are more users than the "
        "queue can start, never for a user a queued or running run or an open backfill holds."
    ),
)
def pending_rows_sensor(context: SensorEvaluationContext, adbpg: AdbpgResource):
    started = time.perf_counter()
    # Dagster's clock (what its sensors and tests use), in epoch seconds.
    now = get_current_timestamp()
    instance = context.instance
    seen = Seen.parse(context.cursor)
    reruns = Reruns.parse(context.cursor)
    try:
        # The runs it requests use the same ENRICH_MAX_ATTEMPTS (their config default), so the
        # sensor and its runs agree on which rows are given up.
        run_settings = RunSettings.from_env()
        max_attempts = run_settings.max_attempts
        automation = AutomationSettings.from_env()
        api = DashScopeSettings.from_env()
        layer = dagster_settings()
        store = adbpg.store
        settings = settings_fingerprint(api)
        finished = reruns.finished_runs(instance, now)
        # Before the pending rows are read, so that a dead run's rows count as pending.
        released = store.items.release_workers(dead_runs(finished, layer.heartbeat_timeout))
        # Stale rows are work as ENRICH_ON_IMAGE_CHANGE says (the runs read the same variable).
        fingerprints = store.items.pending_fingerprints(
            max_attempts, stale=run_settings.on_image_change
        )
        shared = _quota_is_shared(api, embedded=store.settings.embedded)
    except (psycopg.Error, ConfigError) as exc:
        # A database that is down is a reason to skip, not a crash: the next tick tries again.
        return retry_later("database unreachable", exc)

    queried = time.perf_counter()
    keys = {user_to_key(u): fp for u, fp in fingerprints.items()}
    order = known_order(instance)
    new_keys = sorted(k for k in keys if k not in order.index)
    # Users past the tick's share of new partitions are left to the next ticks, as if their
    # rows had not arrived yet (they are not in the cursor, so they count as changed then).
    for key in new_keys[MAX_NEW_PARTITIONS:]:
        del keys[key]
    waiting_partitions = max(0, len(new_keys) - MAX_NEW_PARTITIONS)
    new_keys = new_keys[:MAX_NEW_PARTITIONS]
    order = PartitionOrder(order.keys + new_keys)
    unchanged = seen.unchanged(keys)
    reruns.record(finished, order, unchanged, stops(instance, finished), settings, automation)
    reruns.kept(keys)
    if released:
        context.log.info(f"{released} claim(s) of failed runs whose process is gone given back")

    def skipped(reason: str) -> SensorResult:
        return SensorResult(cursor=_cursor(seen.kept(keys), reruns), skip_reason=SkipReason(reason))

    if not keys:
        return skipped("no pending rows")
    # New users' partitions are added here, in one statement, before their runs are
    # requested: returned as a dynamic-partitions request instead, Dagster's daemon checks and
    # adds them one key at a time (10,000 keys took it 90 s before it launched a run).
    if new_keys:
        instance.add_dynamic_partitions(users_partitions.name, new_keys)
    hold = reruns.held(settings)
    if hold is not None:
        return skipped(hold.describe())
    due = reruns.due(keys, now)
    waiting = reruns.backing_off(keys, now)
    wanted = ({k for k in keys if k not in unchanged} - waiting) | due
    if not wanted:
        if waiting:
            soonest = min(r.due for k in waiting if (r := reruns.waiting(k)))
            return skipped(
                f"{len(waiting)} user(s) whose last run left their rows pending wait "
                f"(ENRICH_RERUN_BACKOFF): the next is due in {max(0, soonest - now):.0f} s"
            )
        return skipped("pending rows unchanged since the last requested runs")

    runs = runs_in_flight(instance)
    busy = users_in_flight(instance, order, runs=runs)
    active = sum(1 for r in runs if run_keys(r.tags, order))
    budget = layer.runs_per_tick or max(0, 2 * automation.max_concurrent_runs - active)
    counts = {k: int(keys[k].split("-", 1)[0]) for k in wanted if k not in busy}
    blocked = set(busy) | (set(keys) - wanted)
    planned = plan_runs(
        order.keys,
        counts,
        blocked,
        budget=budget,
        bundle_rows=layer.bundle_rows,
        bundle_users=layer.bundle_users,
        stagger=automation.max_concurrent_runs if active == 0 else 0,
    )
    # The quota is the account's: runs at once share it, unless the provider layer already
    # paces every process on one shared budget.
    quota = api.requests_per_minute
    at_once = min(automation.max_concurrent_runs, active + len(planned))
    rpm = quota // at_once if quota and at_once > 1 and not shared else None
    requests = [
        _request(
            p,
            keys,
            layer.sensor_concurrent,
            rpm,
            generation=reruns.generation,
            settings=settings,
        )
        for p in planned
    ]
    requested = {k for p in planned for k in p.keys if k in wanted}
    # Partitions are kept between ticks (known_partitions.py): one removed elsewhere while its
    # user still has rows must exist again before a run can name it (a run names one partition,
    # or a range by its two ends, both users with rows).
    named = {k for p in planned for k in (p.keys[0], p.keys[-1])}
    gone = missing(instance, named.difference(new_keys))
    if gone:
        instance.add_dynamic_partitions(users_partitions.name, sorted(gone))
        return skipped(
            f"{len(gone)} partition(s) removed elsewhere while their users still have pending "
            "rows were added again; their runs are requested at the next tick"
        )
    for key in requested:
        seen.add(key, keys[key])
    reruns.requested(requested, now, automation)
    if requests:
        reruns.generation += 1
    cursor = _cursor(seen.kept(keys), reruns)
    waiting_busy = len(wanted & set(busy))
    waiting_budget = len(set(counts) - requested)
    elapsed = (time.perf_counter() - started) * 1000
    context.log.info(
        f"{len(keys)} user(s) pending"
        + (f" (and {waiting_partitions} new waiting for a partition)" if waiting_partitions else "")
        + f", {len(wanted)} changed: {len(requests)} run(s) for "
        f"{len(requested)} user(s); {waiting_busy} held by another run, {waiting_budget} left "
        f"for later ticks (budget {budget}); {len(due)} requested again after a run that left "
        f"their rows, {len(waiting)} waiting (ENRICH_RERUN_BACKOFF), {reruns.read} finished "
        f"run(s) read; {elapsed:.0f} ms (database {(queried - started) * 1000:.0f} ms), "
        f"cursor {len(cursor)} B"
    )
    if requests:
        skip = None
    elif waiting_busy:
        skip = SkipReason(f"{waiting_busy} user(s) with new rows already have a run in flight")
    else:
        skip = SkipReason(f"the run queue is full ({active} run(s) queued or running)")
    return SensorResult(run_requests=requests, cursor=cursor, skip_reason=skip)


def _cursor(seen: Seen, reruns: Reruns) -> str:
    return json.dumps({**seen.to_json(), **reruns.to_json()})


__all__ = ["Seen", "pending_rows_sensor", "plan_runs"]
