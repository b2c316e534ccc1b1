"""The image model's documented limits, where its calls go, and the spaces its vectors live in.

- a model or a size its documentation does not list is one line naming the variable;
- the native endpoint sits beside the compatible-mode base URL (workspace domains too);
- a chunk's images are split by the model's images per request and the body's byte cap, and an
  image over the documented 3 MB is never sent;
- the native error bodies are classified as every call's are (key, throttling, bad image);
- the stand-in's and the offline provider's vectors put an image and the words for it near each
  other, in English and Chinese.
"""

from __future__ import annotations

import base64
import io

import httpx2
import numpy as np
import openai
import pytest

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.providers.errors import CallContext, classify
from enrich_pipeline.providers.multimodal import image_requests, native_url
from enrich_pipeline.providers.offline import OFFLINE_IMAGE_EMBEDDING_MODEL, OfflineProvider
from enrich_pipeline.settings import ConfigError, DashScopeSettings
from enrich_pipeline.settings.image_models import IMAGE_MODELS, MAX_IMAGE_BYTES
from enrich_pipeline_tests.standin.concepts import image_vector, text_vector

pytestmark = pytest.mark.unit

RED, BLUE, WHITE = (200, 30, 30), (40, 80, 200), (240, 240, 240)


def _image(subject: str, color: tuple[int, int, int]) -> VisionImage:
    buffer = io.BytesIO()
    draw_sample(subject, color, WHITE).resize((448, 336)).save(buffer, "JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    return VisionImage(url, 448, 336, 100)


def _sized(n: int) -> VisionImage:
    return VisionImage("data:image/jpeg;base64," + "A" * (n * 4 // 3), 1, 1, 1)


def test_image_model_settings_take_documented_sizes_only() -> None:
    off = DashScopeSettings.from_env({})
    assert (off.image_embedding_model, off.image_embedding_dimensions) == ("", None)
    flash = DashScopeSettings.from_env(
        {"ENRICH_IMAGE_EMBEDDING_MODEL": "tongyi-embedding-vision-flash"}
    )
    assert flash.image_embedding_dimensions == 768  # the model's default
    with pytest.raises(ConfigError) as bad:
        DashScopeSettings.from_env(
            {
                "ENRICH_IMAGE_EMBEDDING_MODEL": "tongyi-embedding-vision-plus",
                "ENRICH_IMAGE_EMBEDDING_DIMENSIONS": "768",
            }
        )
    message = str(bad.value)
    assert message.startswith("ENRICH_IMAGE_EMBEDDING_DIMENSIONS:") and "\n" not in message
    assert "64, 128, 256, 512, 1024, 1152" in message
    with pytest.raises(ConfigError, match="^ENRICH_IMAGE_EMBEDDING_MODEL: not a documented"):
        DashScopeSettings.from_env({"ENRICH_IMAGE_EMBEDDING_MODEL": "text-embedding-v4"})


def test_the_native_endpoint_is_beside_the_compatible_base_url() -> None:
    path = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
    assert native_url("https://dashscope-intl.aliyuncs.com/compatible-mode/v1") == (
        "https://dashscope-intl.aliyuncs.com" + path
    )
    assert native_url("https://ws1.ap-southeast-1.maas.aliyuncs.com/compatible-mode/v1/") == (
        "https://ws1.ap-southeast-1.maas.aliyuncs.com" + path
    )
    assert native_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000" + path


def test_requests_follow_the_models_image_count_and_byte_caps() -> None:
    flash, v1 = (
        IMAGE_MODELS["tongyi-embedding-vision-flash"],
        IMAGE_MODELS["multimodal-embedding-v1"],
    )
    small = [_sized(100_000)] * 10
    assert [len(g) for g in image_requests(small, flash)] == [8, 2]
    assert [len(g) for g in image_requests(small, v1)] == [1] * 10
    big = [_sized(2_000_000)] * 3 + [_sized(MAX_IMAGE_BYTES + 10)]
    groups = image_requests(big, flash)
    assert groups == [[0, 1], [2]]  # the body cap splits; the image over 3 MB is not sent


def _status_error(status: int, body: dict) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://x/api/v1/services/embeddings")
    response = httpx2.Response(status, json=body, request=request)
    return openai.APIStatusError(body["message"], response=response, body=body)


def test_native_error_bodies_are_classified_like_every_call() -> None:
    settings = DashScopeSettings.from_env(
        {"ENRICH_IMAGE_EMBEDDING_MODEL": "multimodal-embedding-v1", "DASHSCOPE_API_KEY": "k"}
    )
    ctx = CallContext.of(settings, "image_embedding")
    url = classify(
        _status_error(
            400, {"code": "InvalidParameter", "message": "url error, please check url！"}
        ),
        ctx,
    )
    assert (url.code, url.permanent, url.scope) == ("bad_image", True, "row")
    throttled = classify(
        _status_error(
            429, {"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded"}
        ),
        ctx,
    )
    assert (throttled.code, throttled.permanent) == ("rate_limited", False)
    missing = classify(
        _status_error(404, {"code": "ModelNotFound", "message": "Model not exist."}), ctx
    )
    assert missing.code == "model_not_found" and "ENRICH_IMAGE_EMBEDDING_MODEL" in str(missing)


def _nearest(query: list[float], vectors: dict[str, list[float]]) -> list[str]:
    return sorted(vectors, key=lambda k: -float(np.dot(query, vectors[k])))


def test_stand_in_vectors_put_a_drawing_near_the_words_for_it() -> None:
    images = {
        "red chair": draw_sample("chair", RED, WHITE),
        "blue chair": draw_sample("chair", BLUE, WHITE),
        "red lamp": draw_sample("lamp", RED, WHITE),
    }
    vectors = {k: image_vector(v, k, 256) for k, v in images.items()}
    for words in ("red chair", "a red armchair on white", "红色的椅子"):
        ranked = _nearest(text_vector(words, 256), vectors)
        assert ranked == ["red chair", "blue chair", "red lamp"], (words, ranked)
    assert _nearest(text_vector("蓝色台灯", 256), vectors)[0] != "red chair"


def test_offline_image_vectors_are_labelled_and_findable_by_words() -> None:
    offline = OfflineProvider(1024, 128)
    assert offline.image_embedding_model == OFFLINE_IMAGE_EMBEDDING_MODEL
    assert OfflineProvider(1024).image_embedding_model is None
    names = ["red chair", "blue chair", "red lamp"]
    images = [_image("chair", RED), _image("chair", BLUE), _image("lamp", RED)]
    vectors = dict(zip(names, offline.embed_images(images), strict=True))
    assert all(len(v) == 128 for v in vectors.values())
    for words in ("red chair", "红色 椅子"):
        assert _nearest(offline.embed_image_texts([words])[0], vectors)[0] == "red chair"
