"""The ``embedding_dimensions`` check on vectors holding NaN or an infinity (an older version's):
it fails naming how many and the command that embeds their captions again; after that command
it passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline_tests.defs.test_asset import materialize_user
from enrich_pipeline_tests.helpers import Items


def test_the_check_names_non_finite_vectors_and_the_reembed_command_that_clears_them(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [items.add("o'brien", str(image_dir / f"{c}.jpg")) for c in ("blue", "red")]
    instance = DagsterInstance.ephemeral()
    assert materialize_user(instance, "o'brien").success
    items.execute(
        "UPDATE {ns}.enrich_embeddings SET embedding[3] = 'NaN' WHERE item_id = %s", (ids[0],)
    )

    result = materialize_user(instance, "o'brien")
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["embedding_dimensions"]
    assert not check.passed and check.severity.value == "ERROR"
    assert check.metadata["not_finite"].value == 1
    assert check.description is not None
    assert check.description.startswith("1 embedding(s) with NaN or infinite values")
    assert "`enrich-search --reembed --user-id 'o'\"'\"'brien'`" in check.description

    assert search_main(["--reembed", "--user-id", "o'brien"]) == 0
    assert capsys.readouterr().out.startswith("re-embedded 1 stored vector(s)")
    result = materialize_user(instance, "o'brien")
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["embedding_dimensions"]
    assert check.passed and check.metadata["not_finite"].value == 0
