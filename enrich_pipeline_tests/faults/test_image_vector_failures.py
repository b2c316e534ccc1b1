"""What the image model's failures cost: a row's problem costs that row's image vector (never
its paid caption), the account's stops the run as a caption call's does.

- one image the multimodal endpoint refuses (400 InvalidParameter) in a request of several: the
  request is asked again image by image, so its neighbours still get their vectors; every
  caption is written; the report counts the row without a vector;
- a vector that is not finite: refused for its row alone;
- a 429 on the image call: retried, and the vectors are stored;
- the key rejected on the image call (401): the run stops (exit 3, one line), the chunk's paid
  captions are written without the vectors, and no row is charged.
"""

from __future__ import annotations

import pytest
from PIL import Image

from enrich_pipeline_tests.helpers import Items, run_cli, stat
from enrich_pipeline_tests.standin import StandIn

MODEL = "tongyi-embedding-vision-flash"
RED, BLUE, GREEN = (200, 30, 30), (40, 80, 200), (40, 160, 60)


@pytest.fixture
def three(env: pytest.MonkeyPatch, items: Items, tmp_path) -> dict[tuple[int, int, int], str]:
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    env.setenv("ENRICH_IMAGE_EMBEDDING_DIMENSIONS", "64")
    ids = {}
    for color in (RED, BLUE, GREEN):
        path = tmp_path / f"{color[0]}-{color[1]}.png"
        Image.new("RGB", (320, 240), color).save(path)
        ids[color] = items.add("alice", str(path))
    return ids


def _with_vectors(items: Items) -> set[str]:
    return {r[0] for r in items.execute("SELECT item_id FROM {ns}.enrich_image_embeddings")}


def _captioned(items: Items, ids: dict) -> set[str]:
    return {i for i in ids.values() if (items.row(i)["metadata"] or {}).get("caption")}


def test_an_image_the_model_refuses_costs_its_vector_only(
    items: Items, standin: StandIn, three: dict
) -> None:
    # The green vase's image is refused by the image model only (its caption call is fine).
    standin.add_rule("bad_image", color=GREEN, endpoint="multimodal")
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert _captioned(items, three) == set(three.values())
    assert _with_vectors(items) == {three[RED], three[BLUE]}
    # One request for the three images, refused; then one per image.
    assert standin.count("multimodal") == 4
    assert standin.count("multimodal", status=400) == 2
    assert stat(report, "Image vectors") == "2;"
    assert "1 without (enrich-captions --embed-images fills them in)" in report
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures")[0][0] == 0


def test_a_vector_that_is_not_finite_is_refused_for_its_row(
    items: Items, standin: StandIn, three: dict
) -> None:
    standin.inject("nan_embedding", endpoint="multimodal")
    # One image a chunk, so one request each: the first answer's vector is not finite.
    code, report = run_cli(["--user-id", "alice", "--batch-size", "1", "--concurrent", "1"])
    assert code == 0, report
    assert len(_with_vectors(items)) == 2
    assert _captioned(items, three) == set(three.values())
    assert "1 without" in report


def test_a_throttled_image_call_is_retried_and_the_vectors_stored(
    items: Items, standin: StandIn, three: dict
) -> None:
    standin.inject("429", endpoint="multimodal")
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert standin.count("multimodal", status=429) == 1
    assert _with_vectors(items) == set(three.values())


def test_a_key_the_image_endpoint_rejects_stops_the_run_after_writing_paid_captions(
    items: Items, standin: StandIn, three: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.inject("unauthorized", endpoint="multimodal", times=10)
    code, report = run_cli(["--user-id", "alice"])
    assert code == 3, report
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DASHSCOPE_API_KEY" in err[0], err
    assert standin.count("multimodal") == 1  # a stop is not retried
    # The captions were paid: written, without image vectors; nobody is charged an attempt.
    assert _captioned(items, three) == set(three.values())
    assert _with_vectors(items) == set()
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures")[0][0] == 0
