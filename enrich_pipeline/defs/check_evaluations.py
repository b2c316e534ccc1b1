"""What the asset checks find for user partitions, and the evaluations that carry it.

Kept apart from the ``@asset_check`` definitions (``checks.py``) because two steps evaluate
the checks: the check steps, and the summary step of a run whose partition it fails (the check
steps are skipped there, so the step that failed the partition evaluates its checks itself).

Every evaluation carries the partition's latest materialization as its target (the run's own
where it made one), whatever the launch path: Dagster fills the target only for runs of one
partition key, and asset-page backfills run single-partition ranges.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    MetadataValue,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from enrich_pipeline.defs.config import dagster_settings
from enrich_pipeline.defs.partitions import key_to_user
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.settings import RunSettings

ENRICHED_ITEMS = AssetKey("enriched_items")
# Each check's severity, for its partitions' evaluations and its whole-asset one.
SEVERITY = {
    # Rows can arrive during a run; that is a reason to look, not to stop anything.
    "no_unrecorded_pending_rows": AssetCheckSeverity.WARN,
    "embedding_dimensions": AssetCheckSeverity.ERROR,
    "failure_share": AssetCheckSeverity.WARN,
}
CHECK_NAMES = tuple(SEVERITY)
# Users judged per grouped statement (and per materialization lookup): a run of every
# partition reads 100,000 users in 100 such batches, never one statement per user.
BATCH = 1000
# Failing partitions named in a whole-asset evaluation's description and metadata.
NAMED = 20
# A run without a partition judges every user partition, but each evaluation costs Dagster an
# event write (5 to 35 ms measured): it records only the partitions whose result or target
# changed since their latest evaluation (all of them the first time), at most this many per
# check and run.
RECORDED_MAX = 10_000


@dataclass(frozen=True)
class Verdict:
    passed: bool
    severity: AssetCheckSeverity
    metadata: dict[str, Any]
    description: str | None


Judge = Callable[[list[str]], dict[str, Verdict]]


def _figures(adbpg: AdbpgResource, keys: list[str], dims: int) -> dict[str, dict[str, int]]:
    """The checks' figures per partition, in three grouped statements however many users
    (not three per user)."""
    users = {key_to_user(k): k for k in keys}
    figures = adbpg.store.items.check_partitions(users, dims)
    return {users[u]: f for u, f in figures.items()}


def no_unrecorded_pending_rows(adbpg: AdbpgResource, dashscope: DashScopeResource) -> Judge:
    dims = dashscope.settings.embedding_dimensions
    # Stale rows are left-over work only where runs re-caption them; counted in every mode.
    recaptioned = RunSettings.from_env().on_image_change == "recaption"

    def judge(keys: list[str]) -> dict[str, Verdict]:
        out: dict[str, Verdict] = {}
        for key, figures in _figures(adbpg, keys, dims).items():
            pending = figures["pending_unrecorded"]
            stale = figures["stale_unrecorded"]
            left = pending + (stale if recaptioned else 0)
            problems = [
                f"{pending} pending row(s) without a recorded failure" if pending else "",
                f"{stale} stale row(s) (image changed since captioned) without a recorded failure"
                if stale and recaptioned
                else "",
            ]
            out[key] = Verdict(
                left == 0,
                SEVERITY["no_unrecorded_pending_rows"],
                {
                    "pending_unrecorded": pending,
                    "stale_unrecorded": stale,
                    "failures_recorded": figures["failures_recorded"],
                },
                "; ".join(p for p in problems if p) or None,
            )
        return out

    return judge


def embedding_dimensions(adbpg: AdbpgResource, dashscope: DashScopeResource) -> Judge:
    dims = dashscope.settings.embedding_dimensions

    def judge(keys: list[str]) -> dict[str, Verdict]:
        out: dict[str, Verdict] = {}
        for key, figures in _figures(adbpg, keys, dims).items():
            wrong = figures["embeddings_wrong_dimensions"]
            not_finite = figures["embeddings_not_finite"]
            problems = [
                f"{wrong} embedding(s) without {dims} dimensions" if wrong else "",
                f"{not_finite} embedding(s) with NaN or infinite values, skipped by search: "
                f"`enrich-search --reembed --user-id {shlex.quote(key_to_user(key))}` embeds "
                "their captions again"
                if not_finite
                else "",
            ]
            out[key] = Verdict(
                wrong == 0 and not_finite == 0,
                SEVERITY["embedding_dimensions"],
                {
                    "expected_dimensions": dims,
                    "embeddings": figures["embeddings"],
                    "wrong_dimensions": wrong,
                    "not_finite": not_finite,
                },
                "; ".join(p for p in problems if p) or None,
            )
        return out

    return judge


def failure_share(adbpg: AdbpgResource, dashscope: DashScopeResource) -> Judge:
    threshold = dagster_settings().failure_share_warn

    def judge(keys: list[str]) -> dict[str, Verdict]:
        users = {key_to_user(k): k for k in keys}
        max_attempts = RunSettings.from_env().max_attempts
        figures = adbpg.store.summary.user_items(users, max_attempts=max_attempts)
        out: dict[str, Verdict] = {}
        for user, key in users.items():
            f = figures[user]
            share = f.failure_share
            failed = f.failed_retrying + f.given_up
            over = share is not None and share > threshold
            metadata: dict[str, Any] = {
                "threshold": threshold,
                "failed_rows": failed,
                "given_up": f.given_up,
                "captioned_by_pipeline": f.captioned_by_pipeline,
            }
            if share is not None:
                metadata["failure_share"] = round(share, 4)
            out[key] = Verdict(
                not over,
                SEVERITY["failure_share"],
                metadata,
                f"{failed} of {f.captioned_by_pipeline + failed} attempted row(s) failed "
                f"({share:.0%} > {threshold:.0%}); see the failure ledger in the metadata"
                if over and share is not None
                else None,
            )
        return out

    return judge


JUDGES: dict[str, Callable[[AdbpgResource, DashScopeResource], Judge]] = {
    "no_unrecorded_pending_rows": no_unrecorded_pending_rows,
    "embedding_dimensions": embedding_dimensions,
    "failure_share": failure_share,
}


def targets(
    instance: DagsterInstance, keys: Sequence[str]
) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
    """Each partition's latest materialization (none for a partition never materialized), in
    two statements per ``BATCH`` partitions."""
    out: dict[str, AssetCheckEvaluationTargetMaterializationData] = {}
    for start in range(0, len(keys), BATCH):
        batch = set(keys[start : start + BATCH])
        latest = instance.event_log_storage.get_latest_storage_id_by_partition(
            ENRICHED_ITEMS, DagsterEventType.ASSET_MATERIALIZATION, partitions=batch
        )
        if not latest:
            continue
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=ENRICHED_ITEMS, storage_ids=list(latest.values())),
            limit=len(latest),
        ).records
        for record in records:
            if record.partition_key is not None:
                out[record.partition_key] = AssetCheckEvaluationTargetMaterializationData(
                    storage_id=record.storage_id,
                    run_id=record.run_id,
                    timestamp=record.timestamp,
                )
    return out


def _latest_of_asset(
    instance: DagsterInstance,
) -> AssetCheckEvaluationTargetMaterializationData | None:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=ENRICHED_ITEMS), limit=1
    ).records
    if not records:
        return None
    r = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=r.storage_id, run_id=r.run_id, timestamp=r.timestamp
    )


def _unchanged(
    instance: DagsterInstance, name: str, keys: Sequence[str]
) -> dict[str, tuple[AssetCheckExecutionRecordStatus, int | None]]:
    """Each partition's latest recorded result and the materialization it targeted."""
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(ENRICHED_ITEMS, name)], partition_keys=list(keys)
    )
    return {
        i.partition_key: (i.latest_execution_status, i.latest_target_materialization_storage_id)
        for i in infos
        if i.partition_key is not None
    }


@dataclass
class Tally:
    """What a run of many partitions judged and recorded, for its whole-asset evaluation."""

    judged: int = 0
    recorded: int = 0
    unrecorded_changes: int = 0
    failing: dict[str, str | None] = field(default_factory=dict)


def evaluations(
    instance: DagsterInstance,
    name: str,
    judge: Judge,
    keys: Sequence[str],
    tally: Tally | None = None,
) -> Iterator[tuple[str, AssetCheckEvaluation]]:
    """One evaluation per partition, ``BATCH`` partitions at a time. With a ``tally`` (a run
    without a partition), only the partitions whose result or target changed since their
    latest evaluation are recorded (at most ``RECORDED_MAX``)."""
    changed_only = tally is not None
    for start in range(0, len(keys), BATCH):
        batch = list(keys[start : start + BATCH])
        found = targets(instance, batch)
        verdicts = judge(batch)
        latest = _unchanged(instance, name, batch) if changed_only else {}
        for key in batch:
            v = verdicts[key]
            target = found.get(key)
            if tally is not None:
                tally.judged += 1
                if not v.passed:
                    tally.failing[key] = v.description
            if changed_only:
                status = (
                    AssetCheckExecutionRecordStatus.SUCCEEDED
                    if v.passed
                    else AssetCheckExecutionRecordStatus.FAILED
                )
                if latest.get(key) == (status, target.storage_id if target else None):
                    continue
                if tally is not None and tally.recorded >= RECORDED_MAX:
                    tally.unrecorded_changes += 1
                    continue
            if tally is not None:
                tally.recorded += 1
            yield (
                key,
                AssetCheckEvaluation(
                    asset_key=ENRICHED_ITEMS,
                    check_name=name,
                    passed=v.passed,
                    severity=v.severity,
                    metadata=v.metadata,
                    description=v.description,
                    partition=key,
                    target_materialization_data=target,
                ),
            )


def whole_asset(instance: DagsterInstance, name: str, tally: Tally) -> AssetCheckEvaluation:
    """The evaluation of a run launched without a partition ("Execute all" on the Checks tab):
    what it found over every user partition, so the check's own row says how the run went."""
    failing = tally.failing
    named = list(failing.items())[:NAMED]
    more = f", and {len(failing) - NAMED} more" if len(failing) > NAMED else ""
    if failing:
        description = (
            f"{len(failing)} of {tally.judged} user partition(s) fail: "
            + ", ".join(key_to_user(k) for k, _ in named)
            + more
            + "; each partition's own evaluation says why"
        )
    elif tally.judged:
        description = f"all {tally.judged} user partition(s) pass"
    else:
        description = "no user partition yet: nothing to evaluate"
    metadata: dict[str, Any] = {
        "partitions_evaluated": MetadataValue.int(tally.judged),
        "partitions_failing": MetadataValue.int(len(failing)),
        # Partitions whose result and target did not change keep their latest evaluation.
        "partitions_recorded": MetadataValue.int(tally.recorded),
    }
    if tally.unrecorded_changes:
        metadata["changes_not_recorded"] = MetadataValue.int(tally.unrecorded_changes)
        description += (
            f"; {tally.unrecorded_changes} changed partition(s) beyond {RECORDED_MAX} were not "
            "recorded one by one: execute again, or select a range of partitions"
        )
    if failing:
        metadata["failing"] = MetadataValue.md(
            "\n".join(f"- {key_to_user(k)}: {why or 'failed'}" for k, why in named) + more
        )
    return AssetCheckEvaluation(
        asset_key=ENRICHED_ITEMS,
        check_name=name,
        passed=not failing,
        severity=SEVERITY[name],
        metadata=metadata,
        description=description,
        target_materialization_data=_latest_of_asset(instance),
    )


def planned_checks(instance: DagsterInstance, run_id: str) -> list[str]:
    """The checks the run was launched to evaluate (its planned evaluations), in order."""
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED
    ).records
    names = set()
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is not None:
            names.add(event.event_specific_data.check_name)  # type: ignore[union-attr]
    return [n for n in CHECK_NAMES if n in names]
