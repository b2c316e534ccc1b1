"""The offline demo in Dagster: its materializations and its stored vectors name the offline
embedding model, never the real one configured beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.providers.offline import OFFLINE_EMBEDDING_MODEL
from enrich_pipeline_tests.defs.test_runs import metadata_by_partition, resources
from enrich_pipeline_tests.helpers import Items


def test_offline_materialization_and_vectors_name_the_offline_embedding_model(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    env.setenv("ENRICH_OFFLINE", "true")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    result = materialize(
        [enriched_items], partition_key="alice", instance=instance, resources=resources()
    )
    assert result.success
    md = metadata_by_partition(result)["alice"]
    assert md["embedding_model"] == OFFLINE_EMBEDDING_MODEL
    assert items.execute("SELECT model, dimensions FROM {ns}.enrich_embeddings") == [
        (OFFLINE_EMBEDDING_MODEL, 1024)
    ]
