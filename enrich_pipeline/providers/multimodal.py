"""Image vectors: DashScope's native multimodal embedding API (images and texts in one space).

The OpenAI-compatible API embeds no images: "Multimodal independent embedding requires the
DashScope SDK or API. OpenAI-compatible endpoints are not supported"
(https://docs.qwencloud.com/developer-guides/embeddings/multimodal-embedding). So these calls go
to the native endpoint of the same host, ``POST {host}/api/v1/services/embeddings/
multimodal-embedding/multimodal-embedding`` (Beijing: https://help.aliyun.com/zh/dashscope/
developer-reference/one-peace-multimodal-embedding-api-details; Singapore:
https://docs.qwencloud.com/api-reference/multimodal-embedding/dashscope-multimodal-embedding),
with the same key as a Bearer token, through the same HTTP client (answer size cap, total
deadline) and the same classification, governor, pacing and retries as every other call
(``dashscope.DashScopeProvider._call``).

Request (the API reference above): ``{"model", "input": {"contents": [{"image": data-URI} |
{"text": ...}]}, "parameters": {"dimension": N, "output_type": "dense"}}``; one content object
per input gives one independent vector each (``embeddings[i].index`` is its place in
``contents``). multimodal-embedding-v1 takes no ``dimension`` (always 1024). Usage: the tongyi
models answer ``input_tokens_details.{image_tokens, text_tokens}``; the others
``input_tokens`` (text) and ``image_tokens`` (https://docs.qwencloud.com/... above; the CN
reference's example ``"usage":{"input_tokens":10,"image_tokens":896}``). Tokens per image are
not documented; what the answer says is counted.

What one image's problem costs: a request refused for an image (a 400 about the image, one too
large) costs that image's vector only. A request of several images that is refused as the row's
is asked again one image at a time, so that one bad image never costs its neighbours their
vectors. An image over the documented byte cap (``image_models.MAX_IMAGE_BYTES``) is not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.providers.answers import read_usage
from enrich_pipeline.providers.base import (
    SCOPE_ROW,
    FatalProviderError,
    ProviderError,
    Usage,
    usable_vector,
)
from enrich_pipeline.providers.transport import ForeignAnswer
from enrich_pipeline.settings.image_models import (
    MAX_IMAGE_BYTES,
    MAX_REQUEST_IMAGE_BYTES,
    ImageModel,
)

log = logging.getLogger(__name__)

NATIVE_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
_COMPATIBLE_SUFFIX = "/compatible-mode/v1"


def native_url(base_url: str) -> str:
    """The native multimodal embedding URL beside a compatible-mode base URL: DashScope's
    ``.../compatible-mode/v1`` becomes ``.../api/v1/...`` on the same host (workspace domains
    too); any other base URL (a local server, a proxy) is asked at its host's root."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    prefix = path[: -len(_COMPATIBLE_SUFFIX)] if path.endswith(_COMPATIBLE_SUFFIX) else ""
    return urlunsplit((parts.scheme, parts.netloc, prefix + NATIVE_PATH, parts.query, ""))


def image_bytes(image: VisionImage) -> int:
    """The decoded size of the image a data URI carries (what the byte cap is about)."""
    payload = image.data_url.partition(",")[2]
    return len(payload) * 3 // 4 - payload[-2:].count("=")


def request_body(model: ImageModel, dimensions: int, contents: list[dict[str, str]]) -> dict:
    parameters: dict[str, Any] = {"output_type": "dense"}
    if model.sends_dimension:
        parameters["dimension"] = dimensions
    return {"model": model.name, "input": {"contents": contents}, "parameters": parameters}


def image_requests(images: Sequence[VisionImage], model: ImageModel) -> list[list[int]]:
    """The images' indexes grouped into requests: at most the model's images per request and
    ``MAX_REQUEST_IMAGE_BYTES`` of images each; images over the byte cap are left out."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, image in enumerate(images):
        n = image_bytes(image)
        if n > MAX_IMAGE_BYTES:
            continue
        if current and (
            len(current) >= model.images_per_request or size + n > MAX_REQUEST_IMAGE_BYTES
        ):
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        groups.append(current)
    return groups


def _field(value: object, name: str) -> Any:
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def read_answer(answer: object, count: int, dimensions: int, usage: Usage) -> list[list[float]]:
    """The ``count`` vectors of an answer, in input order, each ``[]`` unless finite and of
    ``dimensions``; its tokens counted into ``usage``. Raises ``ForeignAnswer`` for an answer
    that is not the API's (no ``output.embeddings`` list) and ``ValueError`` for one of another
    length (both the service's failure)."""
    output = _field(answer, "output")
    embeddings = _field(output, "embeddings") if output is not None else None
    if not isinstance(embeddings, list):
        raise ForeignAnswer("HTTP 200: the answer has no output.embeddings, not an embedding")
    by_index: dict[int, Any] = {}
    for item in embeddings:
        index = _field(item, "index")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count:
            by_index[index] = _field(item, "embedding")
    if len(by_index) != count:
        raise ValueError(f"asked for {count} embeddings, got {len(embeddings)}")
    raw = _field(answer, "usage")
    details = _field(raw, "input_tokens_details") if raw is not None else None
    if details is not None:
        counts, known = read_usage(details, ("image_tokens", "text_tokens"))
        image, text = counts.get("image_tokens", 0), counts.get("text_tokens", 0)
    else:
        counts, known = read_usage(raw, ("input_tokens",))
        image_counts, _ = read_usage(raw, ("image_tokens",))
        image, text = image_counts.get("image_tokens", 0), counts.get("input_tokens", 0)
    usage.add(
        image_embedding_calls=1,
        image_embedding_tokens=image,
        image_embedding_text_tokens=text,
        unknown_token_calls=0 if known else 1,
    )
    vectors = [by_index[i] for i in range(count)]
    return [
        [float(v) for v in vector] if usable_vector(vector, dimensions) else []
        for vector in vectors
    ]


def refused_for_the_row(error: ProviderError) -> bool:
    """An answer that is the request's own (an image it could not use), not the account's or
    the service's: asked again image by image when the request held several."""
    return (
        error.permanent and error.scope == SCOPE_ROW and not isinstance(error, FatalProviderError)
    )


def embed_images(
    images: Sequence[VisionImage],
    model: ImageModel,
    call: Callable[[list[dict[str, str]]], list[list[float]]],
) -> list[list[float]]:
    """One vector per image (``[]`` for one refused or too large), by ``call`` (one request
    of content objects, classified and retried by the caller). A stop, or a service error past
    its retries, is raised: the caller's stage decides what the chunk loses."""
    vectors: list[list[float]] = [[] for _ in images]
    for group in image_requests(images, model):
        try:
            got = call([{"image": images[i].data_url} for i in group])
        except ProviderError as error:
            if not refused_for_the_row(error):
                raise
            if len(group) == 1:
                log.warning("image embedding refused for one image: %s", error)
                continue
            for i in group:  # one bad image must not cost its neighbours their vectors
                try:
                    vectors[i] = call([{"image": images[i].data_url}])[0]
                except ProviderError as alone:
                    if not refused_for_the_row(alone):
                        raise
                    log.warning("image embedding refused for one image: %s", alone)
            continue
        for i, vector in zip(group, got, strict=True):
            vectors[i] = vector
    return vectors


def embed_texts(
    texts: Sequence[str],
    model: ImageModel,
    call: Callable[[list[dict[str, str]]], list[list[float]]],
) -> list[list[float]]:
    """One vector per text, by the image model (the query side of image search)."""
    vectors: list[list[float]] = []
    step = model.texts_per_request
    for start in range(0, len(texts), step):
        vectors.extend(call([{"text": t} for t in texts[start : start + step]]))
    return vectors
