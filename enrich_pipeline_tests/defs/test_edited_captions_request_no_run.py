"""In the Dagster layer, a caption a person edited is no work: the sensor requests no run for a
user whose only changed image has an edited caption, and a materialization leaves the row alone
and counts it neither stale nor pending."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from dagster import DagsterInstance, SkipReason

from enrich_pipeline_tests.defs.test_asset import materialize_user
from enrich_pipeline_tests.defs.test_sensors import tick
from enrich_pipeline_tests.helpers import Items


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.mark.parametrize("mode", ["recaption", "flag"])
def test_an_edited_caption_whose_image_changed_requests_no_run(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, mode: str
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    metadata = {
        "caption": "Edited by a person.",
        "caption_model": "qwen3-vl-plus",
        "caption_image_digest": md5(blue),
        "caption_text_digest": md5("A blue square."),
    }
    row = items.add("alice", red, metadata=metadata)
    env.setenv("ENRICH_ON_IMAGE_CHANGE", mode)

    result = tick(DagsterInstance.ephemeral())
    assert isinstance(result, SkipReason) and "no pending rows" in result.skip_message

    done = materialize_user(DagsterInstance.ephemeral(), "alice", on_image_change=mode)
    assert done.success
    md = {
        k: v.value
        for k, v in done.asset_materializations_for_node("enriched_items")[0].metadata.items()
    }
    assert (md["items_pending"], md["items_stale"]) == (0, 0)
    assert items.row(row)["metadata"] == metadata
