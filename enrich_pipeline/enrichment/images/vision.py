"""The copy of an image sent to a vision model (:class:`VisionImage`) and what it costs.

The working copy is shrunk to the model's patch grid and its per-image cap, JPEG-encoded into a
data URL, and its input tokens counted as DashScope counts them (the rules per model live in
:mod:`enrich_pipeline.enrichment.vision_tokens`).

The service refuses an image with a side of 10 px or less, or longer than 200:1
(``vision_tokens.MIN_SIDE``, ``vision_tokens.MAX_ASPECT_RATIO``), and bills the refused call. So
an image within the ratio whose shrunk copy would have a side under the minimum (2000x10 sent as
896x4, a 5x5 icon) is padded with white up to it, and its tokens are counted on the padded size;
an image beyond the ratio (a 1x100000 strip) is refused here, as the row's permanent
``too_small`` error, before any call: padding it would buy a caption of padding.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

from PIL import Image

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.images.decode import LoadedImage
from enrich_pipeline.enrichment.images.policy import ImageLoadError
from enrich_pipeline.redaction import redact_source

# Qwen-VL sees an image as patches of 32x32 px (Qwen3-VL, current qwen-vl-max/plus) or 28x28 px
# (Qwen2.5-VL era, QVQ), one token each, capped per image: see vision_tokens.
_SNAP_MIN_PATCHES = 10


@dataclass(frozen=True)
class VisionImage:
    data_url: str
    width: int
    height: int
    tokens: int


def image_tokens(
    width: int,
    height: int,
    model: str = vision_tokens.DEFAULT_MODEL,
    *,
    high_resolution: bool = False,
) -> int:
    """Input tokens ``model`` bills for a ``width`` x ``height`` image, as DashScope counts
    them (its resize to the patch grid, the per-image cap, the two special tokens)."""
    return vision_tokens.image_tokens(width, height, model, high_resolution=high_resolution)


def prepare_for_vision(
    img: LoadedImage,
    max_side: int = 896,
    quality: int = 85,
    *,
    model: str = vision_tokens.DEFAULT_MODEL,
    high_resolution: bool = False,
) -> VisionImage:
    """Downscale and JPEG-encode ``img`` for a vision request to ``model``.

    Sides are snapped to the model's patch grid (32 or 28 px) because the service resizes to
    that grid anyway: sending the grid size avoids a second resample server-side and makes the
    token estimate exact. Snapping rounds down whenever rounding up would exceed ``max_side``
    or enlarge the image. An image above the model's per-image cap is sent at the size the
    service would shrink it to: more pixels than the cap buy nothing, they are not even seen.
    """
    if max_side < 1:
        raise ValueError("max_side must be positive")
    refuse_too_narrow(img)
    image = img.image if img.image.mode == "RGB" else img.image.convert("RGB")
    width, height = image.size
    patch = vision_tokens.patch_side(model)
    target = _vision_size(width, height, max_side, patch)
    if target[0] * target[1] > vision_tokens.max_pixels(model, high_resolution):
        target = vision_tokens.resized_size(*target, model, high_resolution=high_resolution)
    if target != (width, height):
        # Area averaging (BOX) is the right filter for shrinking and a third of Lanczos' cost
        # (about 6 ms against 20 ms for 1600x1200 -> 1008x756); the model resamples anyway.
        image = image.resize(target, Image.Resampling.BOX)
    sent = padded_size(*target)
    if sent != target:
        image = _letterbox(image, sent)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return VisionImage(
        data_url=f"data:image/jpeg;base64,{encoded}",
        width=sent[0],
        height=sent[1],
        tokens=image_tokens(*sent, model, high_resolution=high_resolution),
    )


def refuse_too_narrow(img: LoadedImage) -> None:
    """Raise the row's ``too_small`` error for an image longer than the service's ratio.

    Judged on the original (upright) size: the working copy's rounding (1x100000 kept as
    1x2048) says nothing about the picture."""
    width, height = img.original_width, img.original_height
    if max(width, height) > vision_tokens.MAX_ASPECT_RATIO * min(width, height):
        raise ImageLoadError(
            "too_small",
            f"image too narrow for the model: {width}x{height} is longer than "
            f"{vision_tokens.MAX_ASPECT_RATIO}:1, the most Qwen-VL takes "
            f"({redact_source(img.source)})",
        )


def padded_size(width: int, height: int) -> tuple[int, int]:
    """``width`` x ``height`` with each side raised to the service's minimum."""
    return max(width, vision_tokens.MIN_SIDE), max(height, vision_tokens.MIN_SIDE)


def _letterbox(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # White, as transparent pixels are composited (decode): padding reads as background.
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return canvas


def _vision_size(width: int, height: int, max_side: int, patch: int = 32) -> tuple[int, int]:
    longest = max(width, height)
    scale = min(1.0, max_side / longest)
    # Snap the long side first and derive one scale from it, so both sides shrink alike and
    # the aspect ratio survives the rounding better than with two independent roundings.
    scale = _snap_to_grid(longest * scale, min(longest, max_side), patch) / longest
    return (
        _snap_to_grid(width * scale, min(width, max_side), patch),
        _snap_to_grid(height * scale, min(height, max_side), patch),
    )


def _snap_to_grid(side: float, limit: int, patch: int = 32) -> int:
    """``side`` rounded to a multiple of ``patch`` that does not exceed ``limit``.

    Sides under ten patches are left alone: there one patch is more than 10% of the side, so
    snapping would visibly distort a thumbnail, and the server pads it for a handful of tokens.
    """
    if side < _SNAP_MIN_PATCHES * patch:
        return max(1, min(limit, round(side)))
    nearest = round(side / patch) * patch
    if nearest <= limit:
        return nearest
    return max(patch, math.floor(min(side, limit) / patch) * patch)
