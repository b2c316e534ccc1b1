"""Deterministic stand-ins for model output: captions from pixels, embeddings from words.

Used by the offline provider (the demo without an API key) and by the stand-in DashScope
server, so both answer the same way. Not a model: captions name the mean color and pick a
template by a stable hash, and embeddings are feature-hashed bags of words (texts that share
words are similar by cosine, which is what caption search needs to be testable).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image, ImageStat

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
    """L2-normalised feature hashing of lower-cased words, with a sign bit against collisions."""
    vec = np.zeros(dimensions, dtype=np.float64)
    for word in re.findall(r"\w+", text.lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vec[h % dimensions] += 1.0 if (h >> 40) & 1 else -1.0
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        vec[0], norm = 1.0, 1.0
    return (vec / norm).tolist()
