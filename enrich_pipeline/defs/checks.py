"""Asset checks on each user partition of ``enriched_items``.

Partitioned asset checks are a Dagster preview feature (we rely on it knowingly; see README).
Whatever button launched the check, it evaluates what it can: the run's partition, the
run's range of partitions (the sensor's shared runs, the asset page's backfills), or, for a run
with no partition (the Checks tab's "Execute all", "Execute" on the whole asset), every user
partition, followed by one evaluation of the whole asset that names the failing users. Each
partition's evaluation is recorded by the step itself, linked to the partition's latest
materialization (``check_evaluations.py``).
"""

from collections.abc import Callable

from dagster import AssetCheckExecutionContext, asset_check

from enrich_pipeline.defs import check_evaluations as found
from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.partitions import users_partitions
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource


def _scope(context: AssetCheckExecutionContext) -> tuple[list[str], bool]:
    """The partitions the run asked for, and whether it asked for none (then: all of them)."""
    op_context = context.op_execution_context
    if op_context.has_partition_key:
        return [op_context.partition_key], False
    if op_context.has_partition_key_range:
        return list(op_context.partition_keys), False
    return users_partitions.get_partition_keys(dynamic_partitions_store=context.instance), True


def _evaluate(
    context: AssetCheckExecutionContext,
    name: str,
    make: Callable[[AdbpgResource, DashScopeResource], found.Judge],
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
) -> None:
    op_context = context.op_execution_context
    keys, whole = _scope(context)
    tally = found.Tally() if whole else None
    judge = make(adbpg, dashscope)
    for _, evaluation in found.evaluations(context.instance, name, judge, keys, tally):
        op_context.log_event(evaluation)
    if tally is not None:
        op_context.log_event(found.whole_asset(context.instance, name, tally))
        context.log.info(
            f"{name}: no partition was selected, so every user partition was evaluated "
            f"({tally.judged}, {len(tally.failing)} failing, {tally.recorded} recorded one by one)"
        )


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description="No pending row is left for the user, apart from rows in the failure ledger; "
    "nor a stale one (image changed since captioned) where ENRICH_ON_IMAGE_CHANGE=recaption.",
)
def no_unrecorded_pending_rows(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> None:
    _evaluate(
        context, "no_unrecorded_pending_rows", found.no_unrecorded_pending_rows, adbpg, dashscope
    )


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description="Every stored caption embedding of the user has the configured dimensions and "
    "only finite values.",
)
def embedding_dimensions(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> None:
    _evaluate(context, "embedding_dimensions", found.embedding_dimensions, adbpg, dashscope)


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description=(
        "Warns when more than ENRICH_FAILURE_SHARE_WARN (default 10%) of the rows the pipeline "
        "attempted for the user failed (still retried, or given up). A user whose rows all "
        "failed (none captioned by the pipeline) gets no materialization: the run fails and the "
        "partition shows as failed."
    ),
)
def failure_share(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> None:
    _evaluate(context, "failure_share", found.failure_share, adbpg, dashscope)
