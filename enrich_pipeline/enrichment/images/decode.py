"""Decoding untrusted bytes into an upright RGB working copy (:class:`LoadedImage`).

The bytes may be anything: an HTML error page or SVG sent as "image/jpeg", a 100 kB file that
declares a gigapixel canvas, a truncated or corrupt file, 16-bit or transparent pixels, EXIF
orientation. Only the policy's formats reach a decoder, the canvas is checked before decoding,
and the working copy is reduced while it is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from enrich_pipeline.enrichment.images.budget import shared_budget
from enrich_pipeline.enrichment.images.policy import (
    FORMAT_ALIASES,
    ImagePolicy,
    load_error,
)
from enrich_pipeline.redaction import one_line, redact_source

# EXIF orientation value -> the transpose that makes the picture upright (same table as
# PIL.ImageOps.exif_transpose, applied to the small working copy instead of the full image).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass
class LoadedImage:
    """A decoded RGB working copy plus facts about the original.

    ``original_width``/``original_height`` are the dimensions as displayed, i.e. after EXIF
    orientation, before any reduction.
    """

    source: str
    image: Image.Image
    original_width: int
    original_height: int
    content_sha256: str
    format: str = field(default="")

    def __repr__(self) -> str:
        # The source may be a multi-megabyte data: URL or carry credentials; never echo it.
        return (
            f"LoadedImage(source={redact_source(self.source)!r}, "
            f"size={self.image.size}, original={self.original_width}x{self.original_height}, "
            f"format={self.format!r}, sha256={self.content_sha256[:12]}...)"
        )


def decode(source: str, raw: bytes, policy: ImagePolicy, display: str) -> LoadedImage:
    """The working copy of ``raw`` (read from ``source``, shown as ``display``), upright and at
    most ``policy.work_max_side`` on its longest side."""
    if not raw:
        raise load_error("not_an_image", "not an image: empty content", display)
    _refuse_markup(raw, display)
    try:
        # Only the allowed decoders are even tried: Pillow's rarer plugins are the usual home
        # of parser bugs, and untrusted bytes should never reach them.
        image = Image.open(io.BytesIO(raw), formats=_pillow_formats(policy.allowed_formats))
    except Image.DecompressionBombError:
        raise load_error("too_many_pixels", "image has too many pixels", display) from None
    except UnidentifiedImageError:
        other = _identify_any(raw)
        if other is not None:
            raise load_error(
                "unsupported_format", f"unsupported image format: {other}", display
            ) from None
        raise load_error("not_an_image", "not an image: unrecognised content", display) from None
    except Exception as exc:
        raise load_error("not_an_image", f"not an image: {type(exc).__name__}", display) from None

    image_format = FORMAT_ALIASES.get(image.format or "", image.format or "")
    if image_format not in policy.allowed_formats:
        raise load_error("unsupported_format", f"unsupported image format: {image_format}", display)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise load_error("not_an_image", "not an image: zero-sized", display)
    # The header alone gives the canvas size; refusing here means a 100 kB file that would
    # inflate to gigabytes is never decoded.
    if width * height > policy.max_pixels:
        raise load_error(
            "too_many_pixels",
            f"image has too many pixels: {width}x{height} is more than {policy.max_pixels}",
            display,
        )
    try:
        side = policy.work_max_side
        # JPEG can decode straight at 1/2, 1/4 or 1/8 scale (DCT scaling), which is both the
        # fastest resize and the biggest memory saving for camera photos.
        image.draft(None, (side, side))
        # What is decoded (after DCT scaling) is held against the process's budget until the
        # working copy is ready: the full-size pixels are gone by then.
        with _held(policy, image.size[0] * image.size[1]):
            image.load()
            # Read once decoded: a PNG's EXIF may follow its pixels, and asking for it earlier
            # decodes the whole image outside the budget.
            orientation = _orientation(image)
            image = _to_rgb_or_rgba(image)
            image.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=2.0)
            if image.mode == "RGBA":
                # Done after the reduction (Pillow resizes RGBA premultiplied, so this is
                # exact) because compositing the small copy is far cheaper.
                background = Image.new("RGB", image.size, (255, 255, 255))
                background.paste(image, mask=image.getchannel("A"))
                image = background
    except Image.DecompressionBombError:
        raise load_error("too_many_pixels", "image has too many pixels", display) from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise load_error("truncated", "image is truncated (incomplete file)", display) from None
        raise load_error("not_an_image", f"image data is corrupt: {_short(exc)}", display) from None
    except Exception as exc:
        raise load_error("not_an_image", f"image data is corrupt: {_short(exc)}", display) from None

    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
        if orientation >= 5:
            width, height = height, width
    return LoadedImage(
        source=source,
        image=image,
        original_width=width,
        original_height=height,
        content_sha256=hashlib.sha256(raw).hexdigest(),
        format=image_format,
    )


def _held(policy: ImagePolicy, pixels: int) -> AbstractContextManager[None]:
    if policy.max_pixels_in_flight <= 0:
        return contextlib.nullcontext()
    return shared_budget(policy.max_pixels_in_flight).hold(pixels)


def _short(exc: BaseException) -> str:
    # Pillow messages sometimes embed object reprs (memory addresses); keep the first clause.
    text = str(exc).split(" <", 1)[0].strip() or type(exc).__name__
    return one_line(text[:120])


def _pillow_formats(allowed: frozenset[str]) -> list[str]:
    Image.init()
    names = set(allowed)
    if "JPEG" in names:
        names.add("MPO")
    return sorted(name for name in names if name in Image.OPEN)


def _identify_any(raw: bytes) -> str | None:
    """Name the format of bytes that the allowed decoders refused, for a useful message."""
    try:
        with Image.open(io.BytesIO(raw)) as other:
            return other.format
    except Exception:
        return None


def _refuse_markup(raw: bytes, display: str) -> None:
    """Name the usual impostors: HTML error pages and SVG, both text starting with '<'."""
    head = raw[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head.startswith(b"<"):
        return
    if b"<svg" in head:
        raise load_error("unsupported_format", "unsupported image format: SVG", display)
    kind = "HTML" if b"<html" in head or b"<!doctype html" in head else "markup"
    raise load_error("not_an_image", f"not an image: got {kind}", display)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:
        # Broken EXIF is common and harmless: show the image as stored.
        return 1


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB, or RGBA when it carries transparency."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return image if image.mode == "RGBA" else image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 (a mostly white picture); scale instead.
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if peak > 255:
        values = values * (255.0 / (65535.0 if peak <= 65535 else peak))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def refuse_declared_type(content_type: str, display: str) -> None:
    """Fail fast on types that are certainly not raster images, before reading a body."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "image/svg+xml":
        raise load_error("unsupported_format", "unsupported image format: SVG", display)
    if media.startswith("text/") or media in (
        "application/json",
        "application/xhtml+xml",
        "application/xml",
        "application/javascript",
    ):
        raise load_error("not_an_image", f"not an image: content type {media}", display)
