"""Deterministic stand-ins for model output, and the demo's sample drawings.

Two kinds of caption live here, for two different jobs:

- ``offline_caption`` (the offline provider, the demo without an API key) says only what can be
  known without a model: the subject of one of the project's own sample drawings, recognised by
  its outline (the project drew it, see ``draw_sample``), and the colors measured in the pixels.
  Any other image gets its measured colors only. It never invents a subject.
- ``synthetic_caption`` (the stand-in DashScope server) pretends to be a model on purpose: a
  catalogue-like sentence from templates with style and object words, so that tag extraction
  and search have something to find in tests. It is not shown to users as a description.

Embeddings are feature-hashed bags of words (texts that share words are similar by cosine,
which is what caption search needs to be testable).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageStat

from enrich_pipeline.enrichment.colors import color_name, dominant_colors
from enrich_pipeline.enrichment.words import words_and_bigrams

_PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "red": (200, 30, 30),
    "orange": (240, 140, 30),
    "yellow": (230, 210, 50),
    "green": (40, 160, 60),
    "teal": (30, 140, 140),
    "blue": (40, 80, 200),
    "purple": (130, 50, 160),
    "pink": (240, 150, 180),
    "brown": (120, 75, 40),
    "beige": (220, 200, 160),
}

# Style and object words on purpose, so that tag extraction has something to find.
_TEMPLATES = (
    "A modern {color} chair in a minimalist living room with natural light.",
    "A vintage {color} leather sofa beside a wooden table in a cozy room.",
    "A {color} ceramic vase with flowers on a rustic kitchen shelf.",
    "A sleek {color} laptop on an industrial metal desk in a bright office.",
    "A minimalist {color} lamp standing next to a bookshelf in a scandinavian bedroom.",
    "A rustic {color} wooden cabinet with brass handles in a farmhouse kitchen.",
    "A modern {color} armchair with a wool throw near a large window.",
    "An industrial {color} pendant light hanging over a concrete dining table.",
)


def _stable_index(key: str, n: int) -> int:
    # Python's hash() is salted per process; captions must not change between runs.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def mean_color(image: Image.Image) -> tuple[float, float, float]:
    r, g, b = ImageStat.Stat(image.convert("RGB")).mean
    return (r, g, b)


def color_word(rgb: tuple[float, float, float]) -> str:
    """Nearest palette word for a mean color."""
    return min(
        _PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(rgb, _PALETTE[n], strict=True))
    )


def synthetic_caption(image: Image.Image) -> str:
    mean = mean_color(image)
    key = f"{image.width}x{image.height}:" + ",".join(str(round(c)) for c in mean)
    return _TEMPLATES[_stable_index(key, len(_TEMPLATES))].format(color=color_word(mean))


def synthetic_caption_for_key(key: str) -> str:
    """No pixels to look at (remote URL, text only): still deterministic per key."""
    color = list(_PALETTE)[_stable_index("color:" + key, len(_PALETTE))]
    return _TEMPLATES[_stable_index(key, len(_TEMPLATES))].format(color=color)


def hashed_embedding(text: str, dimensions: int = 1024) -> list[float]:
    """L2-normalised feature hashing of lower-cased words, with a sign bit against collisions.

    Han and kana text counts by overlapping character pairs (``words.words_and_bigrams``), so a
    Chinese query shares terms with a Chinese caption ("蓝色椅子" and "一把蓝色的椅子" share
    蓝色 and 椅子); text without them hashes exactly as before."""
    vec = np.zeros(dimensions, dtype=np.float64)
    for word in words_and_bigrams(text.lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vec[h % dimensions] += 1.0 if (h >> 40) & 1 else -1.0
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        vec[0], norm = 1.0, 1.0
    return (vec / norm).tolist()


# --- the demo's sample drawings ------------------------------------------------------------------

SAMPLE_SIZE = (640, 480)
SAMPLE_SUBJECTS = ("chair", "lamp", "vase", "sofa", "laptop")


def draw_sample(
    shape: str,
    fg: tuple[int, int, int],
    bg: tuple[int, int, int],
    size: tuple[int, int] = SAMPLE_SIZE,
) -> Image.Image:
    """One of the demo's drawings: a flat silhouette of ``shape`` in ``fg`` on ``bg``."""
    if shape not in SAMPLE_SUBJECTS:
        raise ValueError(f"unknown sample subject {shape!r}")
    img = Image.new("RGB", SAMPLE_SIZE, bg)
    d = ImageDraw.Draw(img)
    if shape == "chair":
        d.rectangle((220, 120, 300, 330), fill=fg)
        d.rectangle((220, 260, 420, 300), fill=fg)
        d.rectangle((400, 300, 420, 420), fill=fg)
        d.rectangle((220, 300, 240, 420), fill=fg)
    elif shape == "lamp":
        d.polygon([(250, 100), (390, 100), (430, 220), (210, 220)], fill=fg)
        d.rectangle((312, 220, 328, 400), fill=fg)
        d.ellipse((260, 390, 380, 430), fill=fg)
    elif shape == "vase":
        d.ellipse((230, 180, 410, 420), fill=fg)
        d.rectangle((290, 100, 350, 200), fill=fg)
    elif shape == "sofa":
        d.rectangle((120, 200, 520, 360), fill=fg)
        d.rectangle((100, 240, 160, 380), fill=fg)
        d.rectangle((480, 240, 540, 380), fill=fg)
    else:  # laptop
        d.rectangle((180, 120, 460, 300), fill=fg)
        d.polygon([(140, 320), (500, 320), (540, 370), (100, 370)], fill=fg)
    return img if size == SAMPLE_SIZE else img.resize(size, Image.Resampling.BOX)


_MASK_SIZE = (64, 48)
# How far (RGB distance) a pixel must be from the background to count as the subject, and how
# much a silhouette must overlap a known one (intersection over union) to be recognised.
_FOREGROUND_DISTANCE = 60.0
_MIN_OVERLAP = 0.8


def _mask(image: Image.Image) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    small = np.asarray(image.convert("RGB").resize(_MASK_SIZE, Image.Resampling.BOX), float)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(small - background, axis=2) > _FOREGROUND_DISTANCE
    bg = tuple(int(round(v)) for v in background)
    return mask, small, bg  # type: ignore[return-value]


def _reference_masks() -> Mapping[str, np.ndarray]:
    """The known silhouettes, built once per process on first use (captioning threads call this
    together: a table filled in place was read half-built, and drawings it did not hold yet came
    out unknown). Published whole and read-only, so readers never need the lock."""
    global _REFERENCE
    reference = _REFERENCE
    if reference is None:
        with _REFERENCE_LOCK:
            if _REFERENCE is None:
                masks = {
                    shape: _mask(draw_sample(shape, (0, 0, 0), (255, 255, 255)))[0]
                    for shape in SAMPLE_SUBJECTS
                }
                for mask in masks.values():
                    mask.setflags(write=False)
                _REFERENCE = MappingProxyType(masks)
            reference = _REFERENCE
    return reference


_REFERENCE: Mapping[str, np.ndarray] | None = None
_REFERENCE_LOCK = threading.Lock()


def recognize_sample(
    image: Image.Image,
) -> tuple[str, tuple[int, int, int], tuple[int, int, int]] | None:
    """``(subject, foreground, background)`` when ``image`` is one of the demo's drawings (at
    any size, in any two colors), else None. Only the project's own silhouettes are known."""
    if abs(image.width / image.height - SAMPLE_SIZE[0] / SAMPLE_SIZE[1]) > 0.05:
        return None
    mask, pixels, bg = _mask(image)
    if not mask.any():
        return None
    best, overlap = None, 0.0
    for shape, reference in _reference_masks().items():
        union = np.logical_or(mask, reference).sum()
        score = np.logical_and(mask, reference).sum() / union if union else 0.0
        if score > overlap:
            best, overlap = shape, float(score)
    if best is None or overlap < _MIN_OVERLAP:
        return None
    fg = tuple(int(round(v)) for v in np.median(pixels[mask], axis=0))
    return best, fg, bg  # type: ignore[return-value]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def offline_caption(image: Image.Image) -> str:
    """What can be said of ``image`` without a model: a known sample's subject and colors, or
    the measured colors alone. Honest by construction: no subject is ever guessed."""
    known = recognize_sample(image)
    if known is not None:
        shape, fg, bg = known
        fg_name, bg_name = color_name(fg), color_name(bg)
        ground = f"a {bg_name} background" if bg_name != fg_name else "a background of that color"
        article = "An" if fg_name[:1] in "aeiou" else "A"
        return f"{article} {fg_name} {shape} drawn as a flat silhouette on {ground}."
    colors = dominant_colors(image, k=3) or ["unknown"]
    return f"An image whose main colors are {_join(colors)}; its subject is not known offline."
