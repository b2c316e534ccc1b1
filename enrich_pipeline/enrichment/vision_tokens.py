"""How many input tokens a Qwen-VL model bills for one image, by DashScope's documented rule.

Source: Model Studio "Image and video understanding", section on image tokens and "处理高分辨率图像"
(https://help.aliyun.com/zh/model-studio/vision; older URL
https://help.aliyun.com/zh/model-studio/user-guide/vision; English
https://www.alibabacloud.com/help/en/model-studio/vision). The Model Studio billing page repeats
the formula under "计算图像与视频的Token":

    image tokens = h_bar * w_bar / token_pixels + 2

where ``h_bar`` x ``w_bar`` is the image after the model's resize and the 2 are the
``<vision_bos>``/``<vision_eos>`` tokens every image carries. The resize, as the docs' estimator
code does it:

1. round each side to the nearest multiple of the patch side (``round(side / p) * p``);
2. above ``max_pixels``: scale both sides by ``sqrt(H*W / max_pixels)`` and floor each to a
   multiple of ``p``;
3. below ``min_pixels`` (4 tokens' worth, ``4 * p * p``): scale up and ceil each to a multiple.

The docs call this an estimate ("实际计费请以API响应为准": the response's ``usage`` is what is
billed). Pure functions, no I/O: safe to call from the pipeline, the stand-in and tests alike.
"""

from __future__ import annotations

import math
import re
from datetime import date

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MAX_TOKENS_28",
    "DEFAULT_MAX_TOKENS_32",
    "HIGH_RESOLUTION_MAX_TOKENS",
    "MAX_ASPECT_RATIO",
    "MIN_SIDE",
    "MIN_TOKENS",
    "VISION_SPECIAL_TOKENS",
    "image_tokens",
    "max_image_tokens",
    "max_pixels",
    "patch_side",
    "resized_size",
]

DEFAULT_MODEL = "qwen3-vl-plus"
"""The pipeline's default vision model (``DASHSCOPE_VISION_MODEL``)."""

MIN_TOKENS = 4
"""Floor of the resize, in patches: the docs' ``min_pixels = 4 * factor * factor``."""

VISION_SPECIAL_TOKENS = 2
"""``<vision_bos>`` and ``<vision_eos>``, one token each, added to every image."""

# What the service accepts at all, before any resize: "图片的宽度和高度均应大于10像素，
# 宽高比不应超过200:1或1:200" (width and height both above 10 px, aspect ratio at most 200:1).
# Quoted from the Qwen-Omni page's image input rules
# (https://help.aliyun.com/zh/model-studio/qwen-omni, "图片+文本输入"), which share the vision
# page's image limits (https://help.aliyun.com/zh/model-studio/vision, "图像限制"; English
# https://www.alibabacloud.com/help/en/model-studio/vision). The refusal, as users met it
# (QwenLM/qwen-code#2505): 400 "<400> InternalError.Algo.InvalidParameter: The image length and
# width do not meet the model restrictions. [height:1 or width:1 must be larger than 10]".
MIN_SIDE = 11
"""The shortest side, in pixels, the service takes ("大于10像素": more than 10)."""

MAX_ASPECT_RATIO = 200
"""The longest side over the shortest the service takes ("不应超过200:1")."""

DEFAULT_MAX_TOKENS_28 = 1280
"""Default cap for the 28-px (Qwen2.5-VL era) models: the docs' older estimator sets
``max_pixels = 1280 * 28 * 28`` unless ``vl_high_resolution_images`` is on."""

DEFAULT_MAX_TOKENS_32 = 2560
"""Default cap for the 32-px models. The docs' per-model defaults table could not be read; their
estimator example passes ``max_pixels=2560 * 32 * 32`` and a worked example bills 2,560 image tokens
for one qwen3-vl-plus image, so 2,560 is used. Not confirmed for the current qwen-vl-max/plus, which
may still cap at 1,280; the larger cap bills more, which is the safe side for a budget."""

HIGH_RESOLUTION_MAX_TOKENS = 16384
"""Cap with ``vl_high_resolution_images=true``, for every model: the API reference says the flag
raises the per-image limit "至 16384 Token 对应的像素值" and ignores ``max_pixels``."""

# qwen-vl-max / qwen-vl-plus snapshots moved to 32-px patches with these dates: the vision page
# names qwen-vl-max-2025-08-13, qwen-vl-plus-2025-08-15 and qwen-vl-plus-2025-07-10 as 32x32, and
# the earlier snapshots (qwen-vl-max-2025-04-08, qwen-vl-plus-2025-05-07, ...) stay 28x28.
_FIRST_32PX_SNAPSHOT = {"max": date(2025, 8, 13), "plus": date(2025, 7, 10)}
_VL_SNAPSHOT = re.compile(r"^qwen-vl-(max|plus)-(\d{4})-(\d{2})-(\d{2})$")
# The vision page: "qwen3.7系列、qwen3.6系列、qwen3.5系列、Qwen3-VL、qwen-vl-max、qwen-vl-plus:
# 每个Token对应32x32像素".
_QWEN3_SERIES = re.compile(r"^qwen3(\.\d+)?-vl\b|^qwen3\.\d+-")


def patch_side(model: str) -> int:
    """Pixels per side of one vision token for `model`: 32 or 28.

    32 for Qwen3-VL (``qwen3-vl-*``), the Qwen3.5/3.6/3.7 series, and qwen-vl-max / qwen-vl-plus as
    their stable and ``-latest`` aliases now serve (2025-07/08 snapshots and later); 28 for QVQ,
    the open Qwen2.5-VL models and older qwen-vl-max/plus snapshots. Names the docs do not cover
    get 28: the smaller patch bills more tokens per pixel, the safe side for a budget.
    """
    name = model.strip().lower()
    if _QWEN3_SERIES.match(name):
        return 32
    if name in ("qwen-vl-max", "qwen-vl-plus", "qwen-vl-max-latest", "qwen-vl-plus-latest"):
        return 32
    snapshot = _VL_SNAPSHOT.match(name)
    if snapshot is not None:
        family, year, month, day = snapshot.groups()
        try:
            released = date(int(year), int(month), int(day))
        except ValueError:
            return 28
        return 32 if released >= _FIRST_32PX_SNAPSHOT[family] else 28
    return 28


def _cap_tokens(model: str, high_resolution: bool) -> int:
    if high_resolution:
        return HIGH_RESOLUTION_MAX_TOKENS
    return DEFAULT_MAX_TOKENS_32 if patch_side(model) == 32 else DEFAULT_MAX_TOKENS_28


def max_pixels(model: str, high_resolution: bool = False) -> int:
    """The largest image (in pixels, after the resize) `model` looks at: above it the service
    shrinks the image, so sending more buys nothing."""
    p = patch_side(model)
    return _cap_tokens(model, high_resolution) * p * p


def max_image_tokens(model: str, high_resolution: bool = False) -> int:
    """The most tokens one image can cost on `model`: the pixel cap in patches plus the two
    special tokens."""
    return _cap_tokens(model, high_resolution) + VISION_SPECIAL_TOKENS


def resized_size(
    width: int, height: int, model: str, *, high_resolution: bool = False
) -> tuple[int, int]:
    """``(width, height)`` of the image as `model` sees it, per the docs' estimator code.

    Python's ``round`` (half to even) is kept on purpose: it is what the documented code does.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, not {width}x{height}")
    p = patch_side(model)
    min_pixels = MIN_TOKENS * p * p
    max_pixels = _cap_tokens(model, high_resolution) * p * p
    h_bar = round(height / p) * p
    w_bar = round(width / p) * p
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        # The docs' code can floor a side of an extreme panorama to 0; one patch is the least a
        # side can be (the video estimator on the same page guards with max(factor, ...)).
        h_bar = max(p, math.floor(height / beta / p) * p)
        w_bar = max(p, math.floor(width / beta / p) * p)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / p) * p
        w_bar = math.ceil(width * beta / p) * p
    return w_bar, h_bar


def image_tokens(width: int, height: int, model: str, *, high_resolution: bool = False) -> int:
    """Input tokens `model` bills for one `width` x `height` image (resized patches + 2).

    `high_resolution` is the request's ``vl_high_resolution_images`` flag.
    """
    w_bar, h_bar = resized_size(width, height, model, high_resolution=high_resolution)
    p = patch_side(model)
    return (w_bar * h_bar) // (p * p) + VISION_SPECIAL_TOKENS
