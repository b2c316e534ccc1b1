"""The native multimodal embedding endpoint, as the stand-in serves it:
``POST /api/v1/services/embeddings/multimodal-embedding/multimodal-embedding``.

Body, answer and error shapes from https://docs.qwencloud.com/api-reference/multimodal-embedding/
dashscope-multimodal-embedding and the CN reference (RESEARCH20 §1.3, §1.4): ``{"model", "input":
{"contents": [{"text"} | {"image"}]}, "parameters": {"dimension", "output_type"}}`` answered
``{"output": {"embeddings": [{"index", "embedding", "type"}]}, "usage", "request_id"}``; errors
``{"code", "message", "request_id"}`` with DashScope's native codes (InvalidApiKey,
InvalidParameter, Throttling.RateQuota, ...: https://help.aliyun.com/en/model-studio/
error-code-start).

What it refuses, as documented per model (``settings.image_models``, the same table the client
reads): a model it does not know (404 ModelNotFound), a ``dimension`` the model does not make
(multimodal-embedding-v1 takes none), more images or texts than the model takes in a request, an
image over 3 MB, a text over the model's tokens, an image it cannot decode; all 400
InvalidParameter. An image URL is not fetched: it gets the "url error" 400 users met when
DashScope could not fetch one (langgenius/dify#29747). ``video`` and ``multi_images`` are
documented inputs the pipeline never sends; the stand-in refuses them (its own choice).

Vectors come from ``concepts`` (images and texts in one space). Usage: the tongyi models answer
``input_tokens_details``, the others ``input_tokens`` (texts) and ``image_tokens``; tokens per
image are not documented, so an image counts as Qwen-VL counts it (``vision_tokens``).
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from typing import Any

from PIL import Image

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.synthetic import mean_color
from enrich_pipeline.settings.image_models import MAX_IMAGE_BYTES, image_model
from enrich_pipeline_tests.standin.answers import Parsed
from enrich_pipeline_tests.standin.concepts import image_vector, text_vector
from enrich_pipeline_tests.standin.errors import Reply
from enrich_pipeline_tests.standin.faults import hostile_vector
from enrich_pipeline_tests.standin.tokens import count_tokens

PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
INVALID_PARAMETER = "InvalidParameter"
# Compatible-mode codes (``errors.ERRORS``) -> the native protocol's, for the same faults.
NATIVE_CODES = {
    "invalid_api_key": "InvalidApiKey",
    "limit_requests": "Throttling.RateQuota",
    "insufficient_quota": "Throttling.AllocationQuota",
    "internal_error": "InternalError",
    "data_inspection_failed": "DataInspectionFailed",
    "invalid_parameter_error": INVALID_PARAMETER,
    "model_not_found": "ModelNotFound",
}
_FORMATS = ("jpeg", "jpg", "png", "bmp")


def native_error_body(reply: Reply, request_id: str) -> dict[str, Any]:
    code = NATIVE_CODES.get(reply.code, reply.code)
    message = reply.message.removeprefix("<400> InternalError.Algo.InvalidParameter: ")
    return {"code": code, "message": message, "request_id": request_id}


def _invalid(message: str) -> Reply:
    return Reply(400, message, code=INVALID_PARAMETER)


def _image(value: str) -> Image.Image:
    if value.startswith(("http://", "https://")):
        raise _invalid("url error, please check url！")
    header, _, payload = value.partition(",")
    kind = header.removeprefix("data:image/").split(";")[0].lower()
    if not header.startswith("data:image/") or ";base64" not in header or kind not in _FORMATS:
        raise _invalid("The image format is illegal and cannot be opened")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("The image format is illegal and cannot be opened") from exc
    if len(raw) > MAX_IMAGE_BYTES:
        raise _invalid(f"The image is too large: {len(raw)} bytes, at most {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _invalid("The image format is illegal and cannot be opened") from exc
    return image.convert("RGB")


def parse_multimodal(body: dict[str, Any], entry: dict[str, Any]) -> Parsed:
    """Check a native multimodal embedding body; fill ``entry``'s counts."""
    model = image_model(entry["model"])
    if model is None:
        raise Reply("model_not_found", model=entry["model"])
    contents = (body.get("input") or {}).get("contents") if isinstance(body, dict) else None
    if not isinstance(contents, list) or not contents:
        raise _invalid("input.contents must be a non-empty list.")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _invalid("parameters must be an object.")
    dims = parameters.get("dimension")
    if not model.sends_dimension and dims is not None:
        raise _invalid(f"dimension is invalid: {model.name} does not take this parameter.")
    dims = model.default_dimensions if dims is None else dims
    if isinstance(dims, bool) or dims not in model.dimensions:
        allowed = ", ".join(map(str, model.dimensions))
        raise _invalid(f"dimension is invalid, it should be one of {allowed}.")
    if parameters.get("output_type", "dense") != "dense":
        raise _invalid("output_type is invalid: only dense is supported.")
    inputs: list[tuple[str, Image.Image | str]] = []
    for item in contents:
        if not isinstance(item, dict) or len(item) != 1:
            raise _invalid("each content must be one object with one of text or image.")
        ((kind, value),) = item.items()
        if kind not in ("text", "image") or not isinstance(value, str) or not value.strip():
            raise _invalid(f"content type {kind!r} is not supported here.")
        inputs.append((kind, value))
    images = [v for k, v in inputs if k == "image"]
    texts = [v for k, v in inputs if k == "text"]
    entry["n_inputs"] = len(inputs)
    if len(images) > model.images_per_request:
        raise _invalid(f"at most {model.images_per_request} images per request for {model.name}.")
    if len(texts) > model.texts_per_request:
        raise _invalid(f"at most {model.texts_per_request} texts per request for {model.name}.")
    decoded: list[tuple[str, Image.Image | str]] = []
    image_tokens = text_tokens = 0
    for kind, value in inputs:
        if kind == "image":
            assert isinstance(value, str)
            image = _image(value)
            image_tokens += vision_tokens.image_tokens(
                image.width, image.height, vision_tokens.DEFAULT_MODEL
            )
            decoded.append((value, image))
        else:
            assert isinstance(value, str)
            tokens = count_tokens(value)
            if tokens > model.max_text_tokens:
                raise _invalid(f"text is too long: at most {model.max_text_tokens} tokens.")
            text_tokens += tokens
            decoded.append((value, value))
    entry["image_tokens"] = image_tokens
    entry["prompt_tokens"] = image_tokens + text_tokens
    means = [mean_color(image) for _, image in decoded if isinstance(image, Image.Image)]

    def respond(fault: str | None) -> dict[str, Any]:
        embeddings = []
        for i, (key, value) in enumerate(decoded):
            if isinstance(value, Image.Image):
                vector, kind = image_vector(value, key[-64:], dims), "image"
            else:
                vector, kind = text_vector(value, dims), "text"
            embeddings.append(
                {"index": i, "embedding": hostile_vector(fault, vector), "type": kind}
            )
        if model.name.startswith("tongyi-"):
            usage: dict[str, Any] = {
                "input_tokens": image_tokens + text_tokens,
                "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
                "output_tokens": 0,
                "total_tokens": image_tokens + text_tokens,
                "image_tokens": image_tokens,
            }
        else:
            usage = {
                "input_tokens": text_tokens,
                "image_tokens": image_tokens,
                "image_count": len(images),
            }
        return {
            "output": {"embeddings": embeddings},
            "usage": usage,
            "request_id": str(uuid.uuid4()),
        }

    return means, texts, respond
