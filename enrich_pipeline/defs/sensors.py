"""The sensor that picks up new caption-less rows and requests one run per user.

Each tick runs two cheap queries (served by the partial index on pending rows), adds partitions
for users it has not seen, and requests a run for each user whose pending set changed, unless
that user already has a run queued or in progress. The run key is the user's partition key plus
a fingerprint of their pending set, so new rows make a new key (Dagster remembers run keys
forever) while an unchanged set never requests the same work twice.
"""

import json

import psycopg
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from enrich_pipeline.defs.config import AUTOMATION
from enrich_pipeline.defs.jobs import enrich_job
from enrich_pipeline.defs.partitions import user_to_key, users_partitions
from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline.defs.runs import IN_FLIGHT, retry_later
from enrich_pipeline.settings import ConfigError, RunSettings


def users_in_flight(context: SensorEvaluationContext) -> set[str]:
    """Partition keys of this job's runs that are queued or running."""
    runs = context.instance.get_runs(
        filters=RunsFilter(job_name=enrich_job.name, statuses=IN_FLIGHT)
    )
    return {r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags}


@sensor(
    job=enrich_job,
    minimum_interval_seconds=AUTOMATION.sensor_interval,
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests one enrichment run per user with new caption-less rows.",
)
def pending_rows_sensor(context: SensorEvaluationContext, adbpg: AdbpgResource):
    try:
        # The runs it requests use the same ENRICH_MAX_ATTEMPTS (their config default), so the
        # sensor and its runs agree on which rows are given up.
        max_attempts = RunSettings.from_env().max_attempts
        fingerprints = adbpg.store.items.pending_fingerprints(max_attempts)
    except (psycopg.Error, ConfigError) as exc:
        # A database that is down is a reason to skip, not a crash: the next tick tries again.
        return retry_later("database unreachable", exc)
    if not fingerprints:
        return SkipReason("no pending rows")

    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    keys = {user_to_key(u): fp for u, fp in fingerprints.items()}
    changed = {k: fp for k, fp in keys.items() if seen.get(k) != fp}
    if not changed:
        return SkipReason("pending rows unchanged since the last requested runs")

    known = set(context.instance.get_dynamic_partitions(users_partitions.name))
    new_keys = sorted(k for k in keys if k not in known)
    busy = users_in_flight(context)
    requests = []
    for key in sorted(changed):
        if key in busy:
            continue  # left out of the cursor, so it is requested once that run is done
        requests.append(RunRequest(partition_key=key, run_key=f"{key}|{changed[key]}"))
        seen[key] = changed[key]
    # Users with nothing pending any more leave the cursor, keeping it small.
    cursor = {k: v for k, v in seen.items() if k in keys}
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[users_partitions.build_add_request(new_keys)]
        if new_keys
        else [],
        cursor=json.dumps(cursor, sort_keys=True),
        skip_reason=None
        if requests
        else SkipReason(
            f"{len(busy & set(changed))} user(s) with new rows already have a run in flight"
        ),
    )
