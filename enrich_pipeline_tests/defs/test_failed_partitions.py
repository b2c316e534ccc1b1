"""A user whose rows all failed: the partition is failed in Dagster's own partition status (not
a green "Materialized"), while the other partitions of the same run are materialized; the
failure is one line naming the user, not an account stop, and the checks are still evaluated."""

from __future__ import annotations

from pathlib import Path
from shutil import copyfile

import pytest
from dagster import AssetCheckKey, DagsterInstance, RunsFilter, materialize
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.check_evaluations import CHECK_NAMES
from enrich_pipeline.defs.checks import (
    embedding_dimensions,
    failure_share,
    no_unrecorded_pending_rows,
)
from enrich_pipeline.defs.partitions import users_partitions
from enrich_pipeline.defs.reruns import stops
from enrich_pipeline.defs.runs import RANGE_END_TAG, RANGE_START_TAG
from enrich_pipeline_tests.defs.test_asset import resources
from enrich_pipeline_tests.helpers import Items

ASSETS = [enriched_items, no_unrecorded_pending_rows, embedding_dimensions, failure_share]


def partition_status(instance: DagsterInstance) -> tuple[set[str], set[str]]:
    """(materialized, failed) partitions as the UI's partition view computes them: Dagster's
    status cache; the UI shows a partition in both as failed."""
    value = get_and_update_asset_status_cache_value(instance, enriched_items.key, users_partitions)
    assert value is not None
    materialized = set(
        value.deserialize_materialized_partition_subsets(users_partitions).get_partition_keys()
    )
    failed = set(value.deserialize_failed_partition_subsets(users_partitions).get_partition_keys())
    return materialized - failed, failed


def run_range(instance: DagsterInstance, first: str, last: str, **config: object):
    return materialize(
        ASSETS,
        instance=instance,
        resources=resources(),
        tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
        run_config={"ops": {"enriched_items": {"ops": {"pending_rows": {"config": config}}}}},
        raise_on_error=False,
    )


def test_a_user_whose_rows_all_failed_is_a_failed_partition_and_the_others_stay_materialized(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, tmp_path: Path
) -> None:
    ann = items.add("ann", str(image_dir / "blue.jpg"))
    gina = [items.add("gina", str(tmp_path / f"missing{n}.png")) for n in range(3)]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["ann", "cid", "gina"])  # cid: nothing pending

    result = run_range(instance, "ann", "gina")

    # The run fails, after every write, with one line naming the user and why.
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "enriched_items.summarize"
    data = failure.step_failure_data.user_failure_data
    assert data.description.count("\n") == 0
    assert data.description.startswith(
        "user 'gina': every row the pipeline attempted failed (3 given up, 0 failing and "
        "retried; none captioned), so the partition is not materialized (the run's 2 other "
        "partition(s) are)"
    ), data.description
    assert all(i in data.metadata["failure_ledger"].value for i in gina)
    # Not an account stop: the sensor's back-off retries such a user like any failed run.
    assert "stopped_because" not in data.metadata
    (record,) = instance.get_run_records(RunsFilter(run_ids=[result.run_id]))
    assert stops(instance, [record]) == {}
    # ann and cid materialized, with their own figures; cid's run did nothing: no counters.
    md = {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("enriched_items")
    }
    assert set(md) == {"ann", "cid"}
    assert (md["ann"]["succeeded"], md["ann"]["items_captioned"]) == (1, 1)
    assert "total" not in md["cid"] and "nothing pending" in md["cid"]["this_run"]
    # Dagster's own partition status: gina failed, the others materialized.
    assert partition_status(instance) == ({"ann", "cid"}, {"gina"})
    # The checks are evaluated for every partition of the run, by the step that failed it, each
    # linked to the partition's materialization in this run (gina has none).
    evaluations = {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {(n, k) for n in CHECK_NAMES for k in ("ann", "cid", "gina")}
    assert not evaluations[("failure_share", "gina")].passed
    for key in ("ann", "cid"):
        target = evaluations[("embedding_dimensions", key)].target_materialization_data
        assert target is not None and target.run_id == result.run_id
    assert evaluations[("embedding_dimensions", "gina")].target_materialization_data is None
    # No evaluation the run planned is left without a result (the UI would say "Skipped").
    for name in CHECK_NAMES:
        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(enriched_items.key, name), limit=10
        )
        assert {h.partition for h in history} == {"ann", "cid", "gina"}
        assert AssetCheckExecutionRecordStatus.PLANNED not in {h.status for h in history}
    # In the database: ann captioned; gina's rows uncaptioned, given up in the ledger.
    assert items.row(ann)["metadata"]["caption"]
    for item in gina:
        assert "caption" not in items.row(item)["metadata"]
    assert items.execute(
        "SELECT count(*) FROM {ns}.enrich_failures WHERE user_id = 'gina' AND permanent"
    ) == [(3,)]


def test_a_failed_partition_turns_materialized_once_one_of_its_rows_is_captioned(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "later.jpg"
    item = items.add("gina", str(missing))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["gina"])
    assert not run_range(instance, "gina", "gina").success
    assert partition_status(instance) == (set(), {"gina"})
    # A plain re-run has nothing to do but the user still has only failed rows: failed again.
    assert not run_range(instance, "gina", "gina").success
    copyfile(image_dir / "blue.jpg", missing)
    again = run_range(instance, "gina", "gina", retry_failed=True)
    assert again.success
    assert partition_status(instance) == ({"gina"}, set())
    assert items.row(item)["metadata"]["caption"]
