"""Stale rows (image changed since the pipeline captioned it) in the Dagster layer: the sensor
requests runs for them as ENRICH_ON_IMAGE_CHANGE says, a materialization re-captions them and
counts them beside the pending ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason

from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.defs.test_asset import materialize_user
from enrich_pipeline_tests.defs.test_sensors import tick
from enrich_pipeline_tests.helpers import Items


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def captioned_from(items: Items, user: str, image: str, captioned: str) -> str:
    """A row the pipeline captioned from ``captioned`` whose image is now ``image``."""
    return items.add(
        user,
        image,
        metadata={
            "caption": "A blue square.",
            "caption_model": "qwen3-vl-plus",
            "caption_image_digest": md5(captioned),
        },
    )


def test_the_sensor_requests_a_run_for_a_user_with_only_stale_rows(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    captioned_from(items, "alice", red, captioned=blue)  # stale
    captioned_from(items, "bob", blue, captioned=blue)  # up to date
    items.add("carol", red, metadata={"caption": "By hand."})  # a person's: never stale

    result = tick(DagsterInstance.ephemeral())
    assert isinstance(result, SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["alice"]

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "ignore")
    ignored = tick(DagsterInstance.ephemeral())
    assert isinstance(ignored, SkipReason) and "no pending rows" in ignored.skip_message

    # Flag mode: a run flags them (no call); once flagged they are no longer work.
    env.setenv("ENRICH_ON_IMAGE_CHANGE", "flag")
    instance = DagsterInstance.ephemeral()
    flag = tick(instance)
    assert isinstance(flag, SensorResult)
    assert [r.partition_key for r in flag.run_requests] == ["alice"]
    with Store(items.settings) as store:
        store.setup()
        assert store.items.flag_stale("alice") == (1, 0)
    after = tick(instance, flag.cursor)
    assert isinstance(after, SkipReason) and "no pending rows" in after.skip_message


def test_a_materialization_recaptions_stale_rows_and_counts_them(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    stale = captioned_from(items, "alice", red, captioned=blue)
    pending = items.add("alice", str(image_dir / "green.jpg"))
    instance = DagsterInstance.ephemeral()

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "ignore")  # what the checks read
    ignored = materialize_user(instance, "alice", on_image_change="ignore")
    assert ignored.success
    md = {
        k: v.value
        for k, v in ignored.asset_materializations_for_node("enriched_items")[0].metadata.items()
    }
    assert (md["succeeded"], md["items_pending"], md["items_stale"]) == (1, 0, 1)
    assert items.row(pending)["metadata"]["caption"]
    assert items.row(stale)["metadata"]["caption"] == "A blue square."
    checks = {c.check_name: c for c in ignored.get_asset_check_evaluations()}
    check = checks["no_unrecorded_pending_rows"]
    assert check.passed  # stale rows are no left-over work in ignore mode, but counted
    assert check.metadata["stale_unrecorded"].value == 1

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "recaption")
    done = materialize_user(instance, "alice", on_image_change="recaption")
    assert done.success
    md = {
        k: v.value
        for k, v in done.asset_materializations_for_node("enriched_items")[0].metadata.items()
    }
    assert (md["succeeded"], md["items_pending"], md["items_stale"]) == (1, 0, 0)
    row = items.row(stale)["metadata"]
    assert row["caption"] != "A blue square." and row["caption_image_digest"] == md5(red)
