"""Partitions whose rows all failed: not materialized, and failed in Dagster's own partition
status.

Definition: after the run's writes the user has failed rows (still retried, or given up) and
the pipeline has captioned none of the user's rows. Dagster's output would materialize every
partition of the run, so when one of them failed the summary step materializes the others
itself, evaluates the run's planned checks for every partition of the run (the check steps are
skipped once the step fails), then fails with one line naming the users. Dagster's status
cache marks a planned partition of a failed run without a materialization as failed
(dagster/_core/storage/partition_status_cache.py), so the partition shows red, the others of a
shared run green. The failure carries no ``stopped_because``: the sensor retries a user with
rows still to retry after its back-off, like any failed run (reruns.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import AssetCheckEvaluation, AssetMaterialization, Failure, OpExecutionContext
from dagster._core.storage.tags import BACKFILL_ID_TAG

from enrich_pipeline.db.ledger import LedgerEntry
from enrich_pipeline.db.summary import UserItems
from enrich_pipeline.defs.check_evaluations import (
    ENRICHED_ITEMS,
    JUDGES,
    evaluations,
    planned_checks,
)
from enrich_pipeline.defs.metadata import ledger_table
from enrich_pipeline.defs.partitions import key_to_user
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource

# Users named in the one line of a run that failed their partitions (all are in its metadata).
NAMED_FAILED = 5


def all_failed(items: UserItems) -> bool:
    """The user has failed rows (still retried or given up) and the pipeline captioned none of
    the user's rows: the partition is failed, not materialized."""
    return items.failed_retrying + items.given_up > 0 and items.captioned_by_pipeline == 0


@dataclass
class Summary:
    """A run's partitions: the metadata of those it materializes and of those whose rows all
    failed."""

    materialized: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, tuple[UserItems, Sequence[LedgerEntry]]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def failure(self) -> Failure:
        users = [key_to_user(k) for k in self.failed]
        named = ", ".join(repr(u) for u in users[:NAMED_FAILED])
        more = f" and {len(users) - NAMED_FAILED} more" if len(users) > NAMED_FAILED else ""
        given_up = sum(i.given_up for i, _ in self.failed.values())
        retried = sum(i.failed_retrying for i, _ in self.failed.values())
        others = len(self.keys) - len(self.failed)
        line = (
            f"{'user' if len(users) == 1 else 'users'} {named}{more}: every row the pipeline "
            f"attempted failed ({given_up} given up, {retried} failing and retried; none "
            "captioned), so the partition is not materialized"
            + (f" (the run's {others} other partition(s) are)" if others else "")
            + "; the failure ledger is in this failure's metadata"
        )
        metadata: dict[str, Any] = {
            "users_failed": ", ".join(users[:100]) + (" ..." if len(users) > 100 else ""),
            "rows_given_up": given_up,
            "rows_failing_retried": retried,
        }
        for key, (_, ledger) in list(self.failed.items())[:NAMED_FAILED]:
            label = "failure_ledger" if len(self.failed) == 1 else f"failure_ledger {key}"
            metadata[label] = ledger_table(ledger)
        return Failure(description=line, metadata=metadata, allow_retries=False)


def fail_partitions(
    context: OpExecutionContext,
    summary: Summary,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
) -> Iterator[AssetMaterialization | AssetCheckEvaluation]:
    # Dagster's output would materialize every partition of the run: the others are materialized
    # here instead, as the output would (with the backfill's tag).
    tags = {}
    backfill = context.run.tags.get(BACKFILL_ID_TAG)
    if backfill:
        tags[BACKFILL_ID_TAG] = backfill
    for key, metadata in summary.materialized.items():
        yield AssetMaterialization(
            asset_key=ENRICHED_ITEMS, partition=key, metadata=metadata, tags=tags or None
        )
    names = planned_checks(context.instance, context.run_id)
    for name in names:
        judge = JUDGES[name](adbpg, dashscope)
        for _, evaluation in evaluations(context.instance, name, judge, summary.keys):
            yield evaluation
    if names:
        context.log.info(
            f"checks {', '.join(names)} evaluated by this step for the run's {len(summary.keys)} "
            "partition(s): their own steps are skipped once it fails"
        )
