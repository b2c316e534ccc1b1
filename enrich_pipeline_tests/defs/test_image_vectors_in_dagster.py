"""Image vectors in a Dagster run: the caption_embeddings op embeds the chunk's images with the
image model and write_results stores them in the chunk's transaction, labelled with the model
that made them (the offline demo's own label, never the configured model's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.providers.offline import OFFLINE_IMAGE_EMBEDDING_MODEL
from enrich_pipeline_tests.defs.test_runs import resources
from enrich_pipeline_tests.helpers import Items
from enrich_pipeline_tests.standin import StandIn

MODEL = "tongyi-embedding-vision-plus"


def _run(items: Items, tmp_path: Path) -> list[tuple]:
    for n, color in enumerate(((200, 30, 30), (40, 80, 200))):
        path = tmp_path / f"chair-{n}.png"
        draw_sample("chair", color, (240, 240, 240)).save(path)
        items.add("alice", str(path))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    result = materialize(
        [enriched_items], partition_key="alice", instance=instance, resources=resources()
    )
    assert result.success
    return items.execute(
        "SELECT model, dimensions, image_digest = md5(i.image) FROM {ns}.enrich_image_embeddings e"
        " JOIN {items} i ON i.id::text = e.item_id ORDER BY e.item_id"
    )


def test_a_dagster_run_stores_image_vectors_beside_the_captions(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    env.setenv("ENRICH_IMAGE_EMBEDDING_DIMENSIONS", "128")
    assert _run(items, tmp_path) == [(MODEL, 128, True)] * 2
    assert standin.count("multimodal") == 1


def test_the_offline_demo_labels_its_image_vectors_as_its_own(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path
) -> None:
    env.setenv("ENRICH_OFFLINE", "true")
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    assert _run(items, tmp_path) == [(OFFLINE_IMAGE_EMBEDDING_MODEL, 1152, True)] * 2
