"""Asset checks on each user partition of ``enriched_items``.

Partitioned asset checks are a Dagster preview feature (we rely on it knowingly; see README).
A run of one partition returns its check result; a run that covers a range of partitions (the
sensor's shared runs of small users) records one evaluation per partition itself, since Dagster
would otherwise record a single evaluation with no partition.
"""

import shlex
from collections.abc import Callable
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    asset_check,
)

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.config import dagster_settings
from enrich_pipeline.defs.partitions import key_to_user, users_partitions
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.settings import RunSettings

Verdict = tuple[bool, AssetCheckSeverity, dict[str, Any], str | None]


def _per_partition(
    context: AssetCheckExecutionContext,
    name: str,
    judge: Callable[[list[str]], dict[str, Verdict]],
) -> AssetCheckResult | None:
    op_context = context.op_execution_context
    if op_context.has_partition_key:
        key = context.partition_key
        passed, severity, metadata, description = judge([key])[key]
        return AssetCheckResult(
            passed=passed, severity=severity, metadata=metadata, description=description
        )
    keys = list(op_context.partition_keys)
    for key, (passed, severity, metadata, description) in judge(keys).items():
        op_context.log_event(
            AssetCheckEvaluation(
                asset_key=enriched_items.key,
                check_name=name,
                passed=passed,
                severity=severity,
                metadata=metadata,
                description=description,
                partition=key,
            )
        )
    return None


def _figures(adbpg: AdbpgResource, keys: list[str], dims: int) -> dict[str, dict[str, int]]:
    """The checks' figures per partition, in three grouped statements however many users the
    run covers (not three per user)."""
    users = {key_to_user(k): k for k in keys}
    figures = adbpg.store.items.check_partitions(users, dims)
    return {users[u]: f for u, f in figures.items()}


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description="No pending row is left for the user, apart from rows in the failure ledger; "
    "nor a stale one (image changed since captioned) where ENRICH_ON_IMAGE_CHANGE=recaption.",
)
def no_unrecorded_pending_rows(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> AssetCheckResult | None:
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
            out[key] = (
                left == 0,
                # Rows can arrive during a run; that is a reason to look, not to stop anything.
                AssetCheckSeverity.WARN,
                {
                    "pending_unrecorded": pending,
                    "stale_unrecorded": stale,
                    "failures_recorded": figures["failures_recorded"],
                },
                "; ".join(p for p in problems if p) or None,
            )
        return out

    return _per_partition(context, "no_unrecorded_pending_rows", judge)


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description="Every stored caption embedding of the user has the configured dimensions and "
    "only finite values.",
)
def embedding_dimensions(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> AssetCheckResult | None:
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
            out[key] = (
                wrong == 0 and not_finite == 0,
                AssetCheckSeverity.ERROR,
                {
                    "expected_dimensions": dims,
                    "embeddings": figures["embeddings"],
                    "wrong_dimensions": wrong,
                    "not_finite": not_finite,
                },
                "; ".join(p for p in problems if p) or None,
            )
        return out

    return _per_partition(context, "embedding_dimensions", judge)


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description=(
        "Warns when more than ENRICH_FAILURE_SHARE_WARN (default 10%) of the rows the pipeline "
        "attempted for the user failed (still retried, or given up): the partition is "
        "materialized either way, this is what shows a user whose rows keep failing."
    ),
)
def failure_share(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource
) -> AssetCheckResult | None:
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
            out[key] = (
                not over,
                AssetCheckSeverity.WARN,
                metadata,
                f"{failed} of {f.captioned_by_pipeline + failed} attempted row(s) failed "
                f"({share:.0%} > {threshold:.0%}); see the failure ledger in the metadata"
                if over and share is not None
                else None,
            )
        return out

    return _per_partition(context, "failure_share", judge)
