"""What the stand-in answers a chat or embeddings request body: the checks DashScope makes on it,
the tokens it counts, and the success body (synthetic captions and vectors).

Request validation done by the server itself (the error pages in ``errors``):

- ``max_tokens`` (or ``max_completion_tokens``) outside ``[1, model's max output]``: 400 "Range of
  max_tokens should be [1, N]".
- An image sent to a model in ``text_only_models``: 400 "The provided messages input is invalid.
  The error info is [Unexpected item type in content]" (the page's "Common scenario" for
  text-only models).
- An image with a side of 10 px or less, or longer than 200:1 (Model Studio's image limits,
  ``vision_tokens.MIN_SIDE`` and ``MAX_ASPECT_RATIO``, https://help.aliyun.com/zh/model-studio/vision
  "图像限制"): 400 "The image length and width do not meet the model restrictions. [height:1 or
  width:1 must be larger than 10]", the body users met (QwenLM/qwen-code#2505). No refusal of a
  ratio has been published: it gets the same code and text, the bracket worded as Qwen-VL's open
  preprocessor words it ("absolute aspect ratio must be smaller than 200").
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.synthetic import hashed_embedding, mean_color
from enrich_pipeline_tests.standin.errors import INVALID, Reply
from enrich_pipeline_tests.standin.faults import hostile_caption, hostile_vector
from enrich_pipeline_tests.standin.scenes import Scene, scene_of_image, scene_of_key
from enrich_pipeline_tests.standin.structured import (
    TEXT,
    answer_content,
    read_request,
    reasoning_text,
)
from enrich_pipeline_tests.standin.tokens import count_tokens, embedding_tokens, image_tokens

EMBEDDING_DIMENSIONS = (64, 128, 256, 512, 768, 1024, 1536, 2048)
DEFAULT_DIMENSIONS = 1024
MAX_EMBEDDING_BATCH = 10

# Parsed request: image mean colours and texts (for rules), and a builder of the success body
# given the fault to serve (None, or a caption/embedding fault that mangles the content).
Parsed = tuple[list[tuple[float, float, float]], list[str], Callable[[str | None], dict[str, Any]]]


def dumps(content: Any) -> bytes:
    """JSON as Python writes it by default: NaN/Infinity as bare tokens and non-ASCII escaped,
    so a lone surrogate travels as the escape \\ud800 (Starlette's JSONResponse refuses both)."""
    return json.dumps(content, separators=(",", ":")).encode()


def parse_chat(
    body: dict[str, Any],
    entry: dict[str, Any],
    *,
    max_output: int,
    text_only: bool,
    image_token_rule: str,
    response_formats: Mapping[str, Iterable[str]] | None = None,
) -> Parsed:
    """Check a chat body for a model taking at most `max_output` tokens (and no image when
    `text_only`), and its response_format and thinking (``structured``, `response_formats`
    overriding which model takes what); fill `entry`'s counts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reply(400, "messages must be a non-empty list.")
    model = entry["model"]
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_output
        ):
            # The error page: "Range of max_tokens should be [1, xxx]", xxx the model's cap.
            raise Reply(400, f"{INVALID}Range of max_tokens should be [1, {max_output}]")
    # vl_high_resolution_images is not an OpenAI parameter: the SDK sends it from extra_body
    # at the top level of the body (the API reference: extra_body={"vl_high_resolution_images":
    # xxx}); it raises the per-image cap to 16384 tokens.
    high_resolution = body.get("vl_high_resolution_images") is True
    text_tokens = 0
    images: list[Image.Image] = []
    means: list[tuple[float, float, float]] = []
    keys: list[str] = []
    texts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise Reply(400, "message content must be a string or a list of parts.")
        for part in parts:
            if not isinstance(part, dict):
                raise Reply(400, "content parts must be objects.")
            if part.get("type") == "text":
                text_tokens += count_tokens(str(part.get("text", "")))
                keys.append(str(part.get("text", "")))
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                if text_only:
                    raise Reply("no_image_support", model=model)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise Reply("bad_image")
                if url.startswith("data:"):
                    image = _decode_data_url(url)
                    _refuse_shape(image)
                    images.append(image)
                    means.append(mean_color(image))
                    entry["image_tokens"] += image_tokens(
                        image_token_rule, image.width, image.height, model, high_resolution
                    )
                elif url.startswith(("http://", "https://")):
                    keys.insert(0, url)  # not fetched: no tokens, but a stable caption
                else:
                    raise Reply("bad_image")
                entry["n_inputs"] += 1
    request = read_request(body, model, texts, response_formats)
    prompt_tokens = text_tokens + request.schema_tokens + entry["image_tokens"]
    entry["prompt_tokens"] = prompt_tokens

    def respond(fault: str | None) -> dict[str, Any]:
        scene = scene_of_image(images[0]) if images else scene_of_key("|".join(keys))
        if request.kind == TEXT:
            content = hostile_caption(fault, answer_content(scene, request, fault))
        else:  # a hostile caption travels inside the answer, where the client reads it
            hostile = {k: hostile_caption(fault, v) for k, v in scene.captions.items()}
            scene = Scene(hostile, scene.styles, scene.objects)
            content = answer_content(scene, request, fault)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        completion = count_tokens(content)
        usage: dict[str, Any] = {}
        if request.thinking:
            reasoning = reasoning_text(scene, request)
            message["reasoning_content"] = reasoning
            thought = count_tokens(reasoning)
            completion += thought
            usage["completion_tokens_details"] = {"reasoning_tokens": thought}
        return {
            "id": f"chatcmpl-{uuid.uuid4()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                **usage,
            },
            "system_fingerprint": None,
        }

    return means, [], respond


def parse_embeddings(body: dict[str, Any], entry: dict[str, Any]) -> Parsed:
    """Check an embeddings body; fill `entry`'s counts."""
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise Reply(400, "input must be a string or a non-empty list of strings.")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise Reply(400, "input contents must be non-empty strings.")
    entry["n_inputs"] = len(texts)
    if len(texts) > MAX_EMBEDDING_BATCH:
        raise Reply(400, "batch size is invalid, it should not be larger than 10.")
    dims = body.get("dimensions", DEFAULT_DIMENSIONS)
    if isinstance(dims, bool) or dims not in EMBEDDING_DIMENSIONS:
        allowed = ", ".join(map(str, EMBEDDING_DIMENSIONS))
        raise Reply(400, f"dimensions is invalid, it should be one of {allowed}.")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise Reply(400, "encoding_format should be float or base64.")
    model = entry["model"]
    tokens = embedding_tokens(texts)
    entry["prompt_tokens"] = tokens

    def respond(fault: str | None) -> dict[str, Any]:
        data = []
        for i, text in enumerate(texts):
            vector: list[float] | str = hostile_vector(fault, hashed_embedding(text, dims))
            if encoding == "base64":
                # The SDK decodes base64 as little-endian float32 (numpy.frombuffer); NaN
                # and infinities survive the trip as IEEE 754 bit patterns.
                vector = base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": str(uuid.uuid4()),
        }

    return [], texts, respond


def _decode_data_url(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise Reply("bad_image")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Reply("bad_image") from exc
    return image.convert("RGB")


_SHAPE = "The image length and width do not meet the model restrictions. "


def _refuse_shape(image: Image.Image) -> None:
    """The service's refusal of an image it cannot take, whatever the model (module docstring)."""
    width, height = image.size
    if min(width, height) < vision_tokens.MIN_SIDE:
        limit = vision_tokens.MIN_SIDE - 1
        raise Reply(
            400, f"{INVALID}{_SHAPE}[height:{height} or width:{width} must be larger than {limit}]"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > vision_tokens.MAX_ASPECT_RATIO:
        raise Reply(
            400,
            f"{INVALID}{_SHAPE}[absolute aspect ratio must be smaller than "
            f"{vision_tokens.MAX_ASPECT_RATIO}, got {ratio:g}]",
        )
