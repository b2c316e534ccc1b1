"""Which users have work queued or running, whatever started it, and what the sensors share.

A run covers user partitions through its tags: ``dagster/partition`` (a materialization from the
UI, the sensor's single-user runs, ``batch_submit_job``), or ``dagster/asset_partition_range_start``
and ``..._end`` (a backfill from the UI runs as ``__ASSET_JOB`` with these and no partition tag;
the sensor's shared runs cover ranges too). A backfill that is still being submitted covers the
partitions it has not launched a run for yet. Every job of the code location counts, not only
``enrich_job``: a user is busy whichever job holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from dagster import AssetKey, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter, SkipReason

from enrich_pipeline.defs.partitions import users_partitions

log = logging.getLogger(__name__)

IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]

PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
BACKFILL_TAG = "dagster/backfill"
# Set on every run that covers users (by the run coordinator, see queue.py).
USER_TAG = "enrich/user"
USERS_TAG = "enrich/users"
ASSET = AssetKey("enriched_items")


def retry_later(what: str, exc: BaseException) -> SkipReason:
    """A tick that could not do its work: one line, and the next tick tries again."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return SkipReason(f"{what}, will retry: {type(exc).__name__}: {first}")


class PartitionOrder:
    """The users partitions in their order (dynamic partitions keep the order of addition), to
    resolve a range to its keys."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.index = {k: n for n, k in enumerate(self.keys)}

    @classmethod
    def of(cls, instance: DagsterInstance) -> PartitionOrder:
        return cls(instance.get_dynamic_partitions(users_partitions.name))

    def between(self, start: str, end: str) -> list[str]:
        a, b = self.index.get(start), self.index.get(end)
        if a is None or b is None:
            # A key that is gone (deleted partition): the ends at least.
            return sorted({start, end})
        return self.keys[min(a, b) : max(a, b) + 1]


def run_keys(tags: Mapping[str, str], order: PartitionOrder) -> list[str]:
    """The user partition keys a run covers, from its tags."""
    if tags.get(PARTITION_TAG):
        return [tags[PARTITION_TAG]]
    start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if start and end:
        return [start] if start == end else order.between(start, end)
    return []


def runs_in_flight(instance: DagsterInstance) -> list[DagsterRun]:
    return list(instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT)))


def users_in_flight(
    instance: DagsterInstance,
    order: PartitionOrder | None = None,
    *,
    exclude_run: str | None = None,
    runs: Iterable[DagsterRun] | None = None,
) -> dict[str, str]:
    """Partition key -> the run (or backfill) that holds it: runs queued or in progress, of
    any job, and backfills still launching runs."""
    order = order or PartitionOrder.of(instance)
    busy: dict[str, str] = {}
    for run in runs_in_flight(instance) if runs is None else runs:
        if run.run_id == exclude_run:
            continue
        for key in run_keys(run.tags, order):
            busy.setdefault(key, run.run_id)
    for key, backfill in backfill_keys(instance).items():
        busy.setdefault(key, f"backfill {backfill}")
    return busy


def backfill_keys(instance: DagsterInstance) -> dict[str, str]:
    """Partition key -> backfill id, for backfills still launching runs (the partitions they
    have not launched a run for yet; those they have are covered by the runs)."""
    # Dagster exports neither name, and ``DagsterInstance.get_backfills`` takes only them to
    # filter by status.
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    out: dict[str, str] = {}
    try:
        backfills = instance.get_backfills(
            filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])
        )
    except Exception as exc:  # noqa: BLE001 - storage without backfills, or a newer shape
        log.warning("could not read the open backfills: %s", exc)
        return out
    for backfill in backfills:
        try:
            keys = _backfill_pending_keys(backfill)
        except Exception as exc:  # noqa: BLE001 - a backfill we cannot read is not "busy"
            log.warning("could not read backfill %s: %s", backfill.backfill_id, exc)
            continue
        for key in keys:
            out.setdefault(key, backfill.backfill_id)
    return out


def _backfill_pending_keys(backfill: object) -> list[str]:
    data = getattr(backfill, "asset_backfill_data", None)
    if data is not None:

        def keys(subset: object) -> set[str]:
            by_key = getattr(subset, "partitions_subsets_by_asset_key", {}) or {}
            part = by_key.get(ASSET)
            return set(part.get_partition_keys()) if part is not None else set()

        target = keys(data.target_subset)
        done = keys(data.materialized_subset) | keys(data.failed_and_downstream_subset)
        requested = keys(data.requested_subset)
        # Requested ones have runs (seen as runs); the rest is still to come.
        return sorted(target - done - requested)
    names = list(getattr(backfill, "partition_names", None) or [])
    last = getattr(backfill, "last_submitted_partition_name", None)
    if last in names:
        names = names[names.index(last) + 1 :]
    return names
