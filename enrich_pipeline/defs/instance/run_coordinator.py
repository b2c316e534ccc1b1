"""The run queue: one run at a time per user, whatever started it.

Runs name their user partitions in different tags: a materialization from the UI and the
sensor's single-user runs ``dagster/partition``; a backfill from the UI (``__ASSET_JOB``) and the
command line's only ``dagster/asset_partition_range_start``/``_end``. The queue's tag limits
compare one tag's values, so ``UserRunCoordinator`` (the ``QueuedRunCoordinator`` with one step
more, configured in the ``dagster.yaml`` beside this module) gives every submitted run one tag
that means its user, before the run is queued:

- a run of one user partition gets ``enrich/user: <partition key>``; the queue runs at most one
  run per value (``tag_concurrency_limits`` in ``dagster.yaml``), so a second run of that user
  waits until the first is over;
- a run of several users (the sensor's shared runs of small users) gets ``enrich/users`` (for
  people) and ``enrich/after: <its run id>``; a single-user run submitted while such a run
  holds its user gets ``enrich/after: <that run id>`` too, and the limit of one run per
  ``enrich/after`` value makes it wait for that run.

The sensor never requests a user that a queued or running run (of any job) or an open backfill
holds (runs.py), so shared runs never overlap each other or a single-user run. What is left is
two shared runs started by hand on overlapping ranges: claims still keep every row to one run,
and each materialization says what its run did and what the user's items are.
"""

from __future__ import annotations

import logging

from dagster import DagsterInstance, DagsterRun, QueuedRunCoordinator, SubmitRunContext

from enrich_pipeline.defs.runs import (
    PARTITION_TAG,
    RANGE_START_TAG,
    USER_TAG,
    USERS_TAG,
    PartitionOrder,
    run_keys,
    runs_in_flight,
)

log = logging.getLogger(__name__)

AFTER_TAG = "enrich/after"


def queue_tags(instance: DagsterInstance, run: DagsterRun) -> dict[str, str]:
    """The tags that put ``run`` in its users' queue."""
    if not (run.tags.get(PARTITION_TAG) or run.tags.get(RANGE_START_TAG)):
        return {}
    order = PartitionOrder.of(instance)
    keys = run_keys(run.tags, order)
    if not keys:
        return {}
    if len(keys) > 1:
        return {USERS_TAG: f"{len(keys)} users: {keys[0]} .. {keys[-1]}", AFTER_TAG: run.run_id}
    (key,) = keys
    tags = {USER_TAG: key}
    for other in runs_in_flight(instance):
        if other.run_id == run.run_id or AFTER_TAG not in other.tags:
            continue
        if key in run_keys(other.tags, order) and len(run_keys(other.tags, order)) > 1:
            tags[AFTER_TAG] = other.tags[AFTER_TAG]
            break
    return tags


class UserRunCoordinator(QueuedRunCoordinator):
    """``QueuedRunCoordinator`` that tags each run with its user before queueing it."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        try:
            tags = queue_tags(self._instance, run)
            if tags:
                self._instance.add_run_tags(run.run_id, tags)
                run = self._instance.get_run_by_id(run.run_id) or run
                context = SubmitRunContext(run, context.workspace)
        except Exception:  # noqa: BLE001 - a run is queued even if its tags could not be set
            log.exception("could not tag run %s with its users", run.run_id)
        return super().submit_run(context)
