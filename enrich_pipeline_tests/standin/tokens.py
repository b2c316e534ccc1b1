"""Tokens as the stand-in counts them: text, images, and each model's output cap.

Image tokens (https://help.aliyun.com/zh/model-studio/vision): with ``image_token_rule=
"dashscope"`` (the default), ``usage.prompt_tokens`` counts each image as
:func:`enrich_pipeline.enrichment.vision_tokens.image_tokens` for the request's model and its
``vl_high_resolution_images`` flag (32x32 or 28x28 px patches, capped, plus two special tokens).
``"legacy"`` keeps the older estimate (one token per started 28x28 patch, at least 4).

Text is counted as words and punctuation marks, each Han or kana character a token of its own
(Chinese has no spaces: counted as words, a whole sentence would be one token, where Qwen's
tokenizer spends about one token per one or two characters): not DashScope's tokenizer, but
deterministic, which is what tests of token budgets need.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from enrich_pipeline.enrichment import vision_tokens

IMAGE_TOKEN_RULES = ("legacy", "dashscope")
_LEGACY_PATCH = 28
# Largest max_tokens per model. The official model table could not be read from here: 8192 is
# what DashScope answers ("Range of max_tokens should be [1, 8192]", seen in public test
# fixtures) and the output limit a third-party scrape of the Bailian console gives for
# qwen-vl-max/plus; the same scrape gives 32K for the Qwen3-VL models. Unknown models get the
# smaller cap, the stricter choice. `max_output_tokens=` overrides per model.
DEFAULT_MAX_OUTPUT_TOKENS = 8192
_MAX_OUTPUT_BY_PREFIX = (("qwen3-vl", 32768),)


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TEXT_TOKEN = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])\\w)+|[^\\w\\s]")


def count_tokens(text: str) -> int:
    return len(_TEXT_TOKEN.findall(text))


def embedding_tokens(texts: list[str]) -> int:
    return sum(max(1, len(re.findall(r"\w+", t))) for t in texts)


def _legacy_image_tokens(width: int, height: int) -> int:
    """The estimate the stand-in used before vision_tokens: one token per started 28x28 patch."""
    return max(4, math.ceil(width / _LEGACY_PATCH) * math.ceil(height / _LEGACY_PATCH))


def image_tokens(rule: str, width: int, height: int, model: str, high_resolution: bool) -> int:
    if rule == "dashscope":
        return vision_tokens.image_tokens(width, height, model, high_resolution=high_resolution)
    return _legacy_image_tokens(width, height)


def max_output(model: str, overrides: Mapping[str, int]) -> int:
    """The largest max_tokens `model` accepts."""
    if model in overrides:
        return overrides[model]
    for prefix, cap in _MAX_OUTPUT_BY_PREFIX:
        if model.startswith(prefix):
            return cap
    return DEFAULT_MAX_OUTPUT_TOKENS


def requested_output(body: dict[str, Any]) -> int:
    """The output tokens a chat request asks for at most (0 when it does not say)."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0
