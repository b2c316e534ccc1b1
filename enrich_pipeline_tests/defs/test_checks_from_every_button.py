"""The asset checks from every button: a run with no partition (the Checks tab's "Execute all",
"Execute" on the whole asset) evaluates every user partition and then the whole asset; a run of
chosen partitions evaluates those; an asset-page backfill's single-partition range run links its
evaluations to its own materialization. No launch path ends in a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetCheckKey, DagsterInstance, materialize
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.check_evaluations import CHECK_NAMES, ENRICHED_ITEMS, targets
from enrich_pipeline.defs.checks import (
    embedding_dimensions,
    failure_share,
    no_unrecorded_pending_rows,
)
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.runs import RANGE_END_TAG, RANGE_START_TAG
from enrich_pipeline_tests.helpers import Items

ASSETS = [enriched_items, no_unrecorded_pending_rows, embedding_dimensions, failure_share]
ALL_CHECKS = {AssetCheckKey(ENRICHED_ITEMS, n) for n in CHECK_NAMES}


def resources() -> dict:
    return {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }


def run(instance: DagsterInstance, **kwargs: object):
    return materialize(ASSETS, instance=instance, resources=resources(), **kwargs)


def run_checks(
    instance: DagsterInstance, checks: set[AssetCheckKey] = ALL_CHECKS, **kwargs: object
):
    """A run of checks alone in the code location's asset job, as the Checks tab launches it."""
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(), asset_check_selection=checks
    )
    return job.execute_in_process(instance=instance, **kwargs)


def evaluations_by_key(result) -> dict:  # noqa: ANN001 - ExecuteInProcessResult
    return {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}


def latest_materialization(instance: DagsterInstance, key: str) -> int:
    return targets(instance, [key])[key].storage_id


def test_a_check_run_without_a_partition_evaluates_every_user_and_the_whole_asset(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, tmp_path: Path
) -> None:
    items.add("ann", str(image_dir / "blue.jpg"))
    items.add("ben", str(image_dir / "red.jpg"))
    items.add("ben", str(tmp_path / "missing.png"))  # one of ben's two rows fails
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["ann", "ben", "zed"])  # zed: never materialized
    # Materialized without their checks, so none of them has an evaluation yet.
    for user in ("ann", "ben"):
        assert materialize(
            [enriched_items], instance=instance, resources=resources(), partition_key=user
        ).success

    result = run_checks(instance)  # what "Execute all" launches: no partition

    assert result.success
    assert not [e for e in result.all_events if e.is_failure]
    found = evaluations_by_key(result)
    assert set(found) == {(n, k) for n in CHECK_NAMES for k in ("ann", "ben", "zed", None)}
    # Each user's evaluation is linked to that user's latest materialization.
    for name in CHECK_NAMES:
        for user in ("ann", "ben"):
            target = found[(name, user)].target_materialization_data
            assert target is not None
            assert target.storage_id == latest_materialization(instance, user)
        assert found[(name, "zed")].target_materialization_data is None
    # The whole asset's evaluation says how it went over every user, naming the failing ones.
    whole = found[("failure_share", None)]
    assert not whole.passed and whole.severity.value == "WARN"
    assert whole.description.startswith("1 of 3 user partition(s) fail: ben")
    assert whole.metadata["partitions_evaluated"].value == 3
    assert found[("embedding_dimensions", None)].passed
    assert found[("embedding_dimensions", None)].description == "all 3 user partition(s) pass"
    assert found[("failure_share", None)].target_materialization_data is not None
    # The check's own row shows a result for the run, not "Execution failed" or "Skipped".
    for name in CHECK_NAMES:
        (latest,) = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(ENRICHED_ITEMS, name),
            limit=1,
            partition_filter=None,
        )[:1]
        assert latest.run_id == result.run_id
        assert latest.status != AssetCheckExecutionRecordStatus.PLANNED
    lines = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any(
        "no partition was selected, so every user partition was evaluated" in m for m in lines
    )


def test_a_check_run_of_chosen_partitions_evaluates_those_linked_to_their_materializations(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    for user in ("ann", "ben", "cid"):
        items.add(user, str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["ann", "ben", "cid"])
    assert run(instance, tags={RANGE_START_TAG: "ann", RANGE_END_TAG: "cid"}).success

    one = run_checks(instance, partition_key="ben")
    assert set(evaluations_by_key(one)) == {(n, "ben") for n in CHECK_NAMES}
    span = run_checks(instance, tags={RANGE_START_TAG: "ann", RANGE_END_TAG: "ben"})
    assert set(evaluations_by_key(span)) == {(n, k) for n in CHECK_NAMES for k in ("ann", "ben")}
    for result in (one, span):
        assert result.success
        for (_, key), e in evaluations_by_key(result).items():
            target = e.target_materialization_data
            assert target is not None and target.storage_id == latest_materialization(instance, key)


def test_a_backfills_single_partition_range_run_links_its_checks_to_its_materialization(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    """Asset-page backfills run one partition as a range (no ``dagster/partition``): Dagster
    fills no target there; the checks do."""
    items.add("bob", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["bob"])

    result = run(instance, tags={RANGE_START_TAG: "bob", RANGE_END_TAG: "bob"})

    assert result.success
    (mat,) = result.asset_materializations_for_node("enriched_items")
    assert mat.partition == "bob"
    found = evaluations_by_key(result)
    assert set(found) == {(n, "bob") for n in CHECK_NAMES}
    for e in found.values():
        target = e.target_materialization_data
        assert target is not None and target.run_id == result.run_id
        assert target.storage_id == latest_materialization(instance, "bob")


def test_execute_all_again_records_only_the_partitions_whose_result_or_target_changed(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    """Each evaluation is an event write: a run over every user records a partition again only
    when its result or its target materialization changed, so 100,000 users cost grouped
    queries, not 100,000 events per click."""
    keys = ["ann", "ben", "cid", "dot"]
    for user in keys:
        items.add(user, str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", keys)
    everyone = {RANGE_START_TAG: "ann", RANGE_END_TAG: "dot"}
    assert materialize(
        [enriched_items], instance=instance, resources=resources(), tags=everyone
    ).success  # without the checks: no partition has an evaluation yet
    check = {AssetCheckKey(ENRICHED_ITEMS, "no_unrecorded_pending_rows")}
    first = run_checks(instance, check)
    assert {p for _, p in evaluations_by_key(first)} == {*keys, None}  # every one, first time

    unchanged = run_checks(instance, check)
    assert {p for _, p in evaluations_by_key(unchanged)} == {None}
    whole = evaluations_by_key(unchanged)[("no_unrecorded_pending_rows", None)]
    assert whole.passed and whole.description == "all 4 user partition(s) pass"
    assert whole.metadata["partitions_recorded"].value == 0

    # ben gets a new row (his result changes); cid is materialized again without the checks
    # (his target changes).
    items.add("ben", str(image_dir / "red.jpg"))
    assert materialize(
        [enriched_items], instance=instance, resources=resources(), partition_key="cid"
    ).success
    changed = run_checks(instance, check)
    found = evaluations_by_key(changed)
    assert {p for _, p in found} == {"ben", "cid", None}
    assert not found[("no_unrecorded_pending_rows", "ben")].passed
    assert found[("no_unrecorded_pending_rows", None)].description.startswith(
        "1 of 4 user partition(s) fail: ben"
    )
