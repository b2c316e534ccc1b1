"""Deterministic stand-ins for model output: captions from pixels, embeddings from words.

Used by the offline provider (the demo without an API key) and by the stand-in DashScope
server, so both answer the same way. Not a model: the captions describe color and layout only,
and the embeddings are feature-hashed bags of words, similar exactly when texts share words.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
from PIL import Image

_TEMPLATES = (
    "A modern {color} chair in a minimalist living room with natural light.",
    "A vintage {color} leather sofa beside a wooden table in a cozy room.",
    "A {color} ceramic vase with flowers on a rustic kitchen shelf.",
    "A sleek {color} laptop on an industrial metal desk in a bright office.",
    "A minimalist {color} lamp next to a bookshelf in a scandinavian bedroom.",
    "A classic {color} dress hanging on a rack in an elegant boutique.",
    "A pair of sporty {color} running shoes on a concrete floor.",
    "A bohemian {color} rug under a rattan armchair with a green plant.",
)

_NAMED = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 70),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "pink": (240, 150, 190),
    "brown": (120, 80, 40),
}

_WORD = re.compile(r"[\w']+", re.UNICODE)


def mean_color(image: Image.Image) -> tuple[int, int, int]:
    pixels = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float64)
    r, g, b = (round(float(v)) for v in pixels.reshape(-1, 3).mean(axis=0))
    return r, g, b


def nearest_name(rgb: tuple[int, int, int]) -> str:
    return min(
        _NAMED, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, _NAMED[name], strict=True))
    )


def synthetic_caption(image: Image.Image) -> str:
    rgb = mean_color(image)
    key = f"{image.size}{rgb}".encode()
    template = _TEMPLATES[int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % len(_TEMPLATES)]
    return template.format(color=nearest_name(rgb))


def hashed_embedding(text: str, dimensions: int = 1024) -> list[float]:
    """L2-normalised feature hashing of lower-cased words, with a sign hash to spread collisions."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "big") % dimensions
        vector[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0:
        vector[0] = 1.0
        return vector
    return [v / norm for v in vector]
