"""Asset checks on each user partition of ``enriched_items``."""

import warnings

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    PreviewWarning,
    asset_check,
)

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.partitions import key_to_user, users_partitions
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource

# Partitioned asset checks are a Dagster preview feature; we rely on it knowingly (README).
warnings.filterwarnings(
    "ignore", category=PreviewWarning, message=".*partitions_def on an AssetCheckSpec"
)


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description="No pending row is left for the user, apart from rows in the failure ledger.",
)
def no_unrecorded_pending_rows(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> AssetCheckResult:
    user = key_to_user(context.partition_key)
    figures = adbpg.store.items.check_partition(user, dashscope.settings.embedding_dimensions)
    left = figures["pending_unrecorded"]
    return AssetCheckResult(
        passed=left == 0,
        # Rows can arrive during a run; that is a reason to look, not to stop anything.
        severity=AssetCheckSeverity.WARN,
        metadata={"pending_unrecorded": left, "failures_recorded": figures["failures_recorded"]},
        description=f"{left} pending row(s) without a recorded failure" if left else None,
    )


@asset_check(
    asset=enriched_items,
    partitions_def=users_partitions,
    description="Every stored caption embedding of the user has the configured dimensions and "
    "only finite values.",
)
def embedding_dimensions(
    context: AssetCheckExecutionContext, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> AssetCheckResult:
    user = key_to_user(context.partition_key)
    dims = dashscope.settings.embedding_dimensions
    figures = adbpg.store.items.check_partition(user, dims)
    wrong = figures["embeddings_wrong_dimensions"]
    not_finite = figures["embeddings_not_finite"]
    return AssetCheckResult(
        passed=wrong == 0 and not_finite == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "expected_dimensions": dims,
            "embeddings": figures["embeddings"],
            "wrong_dimensions": wrong,
            "not_finite": not_finite,
        },
    )
