"""Image vectors made in the caption run (``ENRICH_IMAGE_EMBEDDING_MODEL``), end to end.

``enrich-captions`` embeds each image it captions with the image model, in the same chunk, from
the image it already loaded: one multimodal request for a chunk's few images, the vectors stored
beside the caption vectors with their model, length and the digest of the image value; the
report counts them and their tokens. Paid once: a run that re-captions the same images pays no
image call, and an image that changed gets a new vector with its new caption. The stand-in's
vectors put an image and the words for what it shows near each other, so the stored vectors can
be checked for meaning. Batch mode makes none and says so; ``--embed-images`` fills in rows
captioned before (or in batch mode), without a caption call.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest

from enrich_pipeline.cli import batch as batch_mode
from enrich_pipeline.cli.batch import NO_BATCH_IMAGE_VECTORS
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline_tests.helpers import Items, run_cli, standin_settings, stat
from enrich_pipeline_tests.standin import StandIn

MODEL = "tongyi-embedding-vision-flash"
RED, BLUE, WHITE = (200, 30, 30), (40, 80, 200), (240, 240, 240)
DRAWINGS = {"red chair": ("chair", RED), "blue chair": ("chair", BLUE), "red lamp": ("lamp", RED)}


@pytest.fixture
def drawings(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, (subject, color) in DRAWINGS.items():
        path = tmp_path / f"{name.replace(' ', '-')}.png"
        draw_sample(subject, color, WHITE).save(path)
        paths[name] = path
    return paths


def _vectors(items: Items) -> dict[str, tuple]:
    rows = items.execute(
        "SELECT item_id, model, dimensions, embedding, image_digest, content_sha256"
        " FROM {ns}.enrich_image_embeddings"
    )
    return {r[0]: r[1:] for r in rows}


def test_the_run_embeds_each_image_once_beside_its_caption_and_words_find_it(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, drawings: dict[str, Path]
) -> None:
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    env.setenv("ENRICH_IMAGE_EMBEDDING_DIMENSIONS", "256")
    ids = {name: items.add("alice", str(path)) for name, path in drawings.items()}

    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    # What the user sees: three vectors made by one call, and its tokens.
    assert stat(report, "Image vectors") == "3"
    assert "Image calls:      1 call(s)" in report
    # Three images, one request (flash takes 8 a request), no second download.
    assert standin.count("multimodal") == 1
    stored = _vectors(items)
    assert set(stored) == set(ids.values())
    for name, item_id in ids.items():
        model, dims, vector, digest, sha = stored[item_id]
        assert (model, dims, len(vector)) == (MODEL, 256, 256), name
        image = items.row(item_id)["image"]
        assert digest == hashlib.md5(image.encode()).hexdigest(), name
        assert sha, name
        assert items.row(item_id)["metadata"]["caption"], name

    # The words for a drawing find it: the query side is the same model (embed_image_texts).
    provider = DashScopeProvider(
        standin_settings(standin, image_embedding_model=MODEL, image_embedding_dimensions=256)
    )
    try:
        query = provider.embed_image_texts(["a red chair", "红色的椅子"])
    finally:
        provider.close()
    by_name = {name: np.asarray(stored[i][2]) for name, i in ids.items()}
    for q in query:
        scores = {name: float(np.dot(q, v)) for name, v in by_name.items()}
        assert max(scores, key=scores.__getitem__) == "red chair", scores
        assert scores["blue chair"] > scores["red lamp"], scores

    # Re-captioned with the same images (another prompt version): no image call is paid again.
    standin.reset_log()
    env.setenv("ENRICH_PROMPT_VERSION", "v2")
    code, report = run_cli(["--user-id", "alice", "--recaption"])
    assert code == 0, report
    assert standin.count("chat") == 3
    assert standin.count("multimodal") == 0
    assert _vectors(items) == stored
    assert "already had one (not paid again)" in report

    # An image that changed gets a new vector with its new caption; the others stay as they were.
    standin.reset_log()
    moved = drawings["red lamp"].with_name("moved-lamp.png")
    draw_sample("lamp", BLUE, WHITE).save(moved)
    items.execute(
        "UPDATE {items} SET image = %s WHERE id::text = %s", (str(moved), ids["red lamp"])
    )
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert standin.count("multimodal") == 1
    after = _vectors(items)
    lamp = after[ids["red lamp"]]
    assert lamp[3] == hashlib.md5(str(moved).encode()).hexdigest()
    assert lamp[2] != stored[ids["red lamp"]][2]
    assert after[ids["red chair"]] == stored[ids["red chair"]]


def test_embed_images_fills_in_rows_captioned_before_the_model_was_set(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, drawings: dict[str, Path]
) -> None:
    ids = {name: items.add("alice", str(path)) for name, path in drawings.items()}
    other = items.add("bob", str(drawings["red chair"]))
    code, report = run_cli([])
    assert code == 0, report
    assert stat(report, "Image model") == "off"
    assert _vectors(items) == {}

    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    standin.reset_log()
    code, report = run_cli(["--embed-images", "--user-id", "alice"])
    assert code == 0, report
    assert standin.count("chat") == 0 and standin.count("multimodal") == 1
    assert stat(report, "Embedded") == "3"
    stored = _vectors(items)
    assert set(stored) == set(ids.values())  # alice's rows only
    assert {v[0] for v in stored.values()} == {MODEL} and {v[1] for v in stored.values()} == {768}

    # Every user: bob's row is the same picture as one of alice's, but his own row is embedded
    # (vectors are copied within a user only); a second pass finds nothing left to pay for.
    code, report = run_cli(["--embed-images"])
    assert code == 0, report
    assert set(_vectors(items)) == {*ids.values(), other}
    standin.reset_log()
    code, report = run_cli(["--embed-images"])
    assert code == 0, report
    assert standin.count("multimodal") == 0
    assert stat(report, "Rows without one") == "0"


def test_batch_mode_says_it_makes_no_image_vectors_and_embed_images_fills_them_in(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, drawings: dict[str, Path]
) -> None:
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    standin.reset_batches()
    ids = [items.add("alice", str(path)) for path in drawings.values()]
    out = io.StringIO()
    assert batch_mode.main(["submit", "--user-id", "alice"], out=out) == 0, out.getvalue()
    assert NO_BATCH_IMAGE_VECTORS in out.getvalue()
    deadline = time.monotonic() + 30
    while not all((items.row(i)["metadata"] or {}).get("caption") for i in ids):
        assert time.monotonic() < deadline, "the batch was not collected"
        batch_mode.main(["collect"], out=io.StringIO())
        time.sleep(0.05)
    standin.reset_batches()
    assert _vectors(items) == {} and standin.count("multimodal") == 0
    code, report = run_cli(["--embed-images"])
    assert code == 0, report
    assert set(_vectors(items)) == set(ids)
