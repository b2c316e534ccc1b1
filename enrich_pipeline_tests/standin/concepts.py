"""The stand-in's multimodal vectors: images and texts in one space, built from concepts.

A real multimodal model puts a picture of a red chair and the words "red chair" near each other.
The stand-in does the same for what it can know: an image's concepts are a sample drawing's
subject and its foreground and background color names (``synthetic.recognize_sample``,
``colors.color_name``), or its measured colors for any other picture; a text's concepts are the
subjects and colors it names, in English or Chinese. A vector is the normalized weighted sum of
one fixed pseudo-random unit vector per concept (subject above foreground above background)
plus a small per-input jitter, at the requested length. So "red chair" is nearest the red chair
drawing, a blue chair is nearer it than a red lamp is, and 红色椅子 finds the same drawing.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image

from enrich_pipeline.enrichment.colors import COLOR_NAMES_ZH, color_name, dominant_colors
from enrich_pipeline.enrichment.synthetic import recognize_sample

SUBJECT_WEIGHT = 1.0
FOREGROUND_WEIGHT = 0.6
BACKGROUND_WEIGHT = 0.3
JITTER = 0.05

# The sample subjects' words. English matches whole words (plurals too); Chinese by substring.
SUBJECT_WORDS: dict[str, tuple[str, ...]] = {
    "chair": ("chair", "armchair", "椅子", "椅"),
    "lamp": ("lamp", "灯", "台灯"),
    "vase": ("vase", "花瓶"),
    "sofa": ("sofa", "couch", "沙发"),
    "laptop": ("laptop", "notebook computer", "笔记本电脑", "笔记本"),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {
    name: (name, "grey", zh) if name == "gray" else (name, zh)
    for name, zh in COLOR_NAMES_ZH.items()
}


def _unit(key: str, dimensions: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    vector = np.random.default_rng(seed).standard_normal(dimensions)
    return vector / np.linalg.norm(vector)


def vector_of(concepts: list[tuple[str, float]], jitter_key: str, dimensions: int) -> list[float]:
    """The normalized weighted sum of the concepts' unit vectors and the input's jitter."""
    total = JITTER * _unit("jitter:" + jitter_key, dimensions)
    for concept, weight in concepts:
        total = total + weight * _unit("concept:" + concept, dimensions)
    return (total / np.linalg.norm(total)).tolist()


def image_concepts(image: Image.Image) -> list[tuple[str, float]]:
    """A sample drawing's subject and colors, or the measured colors of any other image."""
    known = recognize_sample(image)
    if known is None:
        colors = dominant_colors(image, k=2)
        weights = (FOREGROUND_WEIGHT, BACKGROUND_WEIGHT)
        return [(f"color:{c}", w) for c, w in zip(colors, weights, strict=False)]
    subject, fg, bg = known[0], color_name(known[1]), color_name(known[2])
    concepts = [(f"subject:{subject}", SUBJECT_WEIGHT), (f"color:{fg}", FOREGROUND_WEIGHT)]
    if bg != fg:
        concepts.append((f"color:{bg}", BACKGROUND_WEIGHT))
    return concepts


def _found(word: str, text: str) -> int | None:
    """Where ``word`` first occurs in ``text`` (lower-cased), or None."""
    if word.isascii():
        hit = re.search(rf"\b{re.escape(word)}(?:e?s)?\b", text)
        return hit.start() if hit else None
    at = text.find(word)
    return at if at >= 0 else None


def _first(table: dict[str, tuple[str, ...]], text: str) -> list[tuple[int, str]]:
    found = []
    for name, words in table.items():
        places = [p for p in (_found(w, text) for w in words) if p is not None]
        if name == "teal" and "藏青色" in text:  # 藏青色 (navy) holds 青色 (teal)
            places = [p for p in places if text[max(0, p - 1) : p] != "藏"]
        if places:
            found.append((min(places), name))
    return sorted(found)


def text_concepts(text: str) -> list[tuple[str, float]]:
    """The subjects and colors ``text`` names: subjects at the subject's weight, the first color
    named as a foreground, the next as a background (as "a red chair on white" reads)."""
    lowered = text.lower()
    concepts = [(f"subject:{name}", SUBJECT_WEIGHT) for _, name in _first(SUBJECT_WORDS, lowered)]
    colors = [name for _, name in _first(COLOR_WORDS, lowered)]
    weights = (FOREGROUND_WEIGHT, BACKGROUND_WEIGHT)
    concepts += [(f"color:{c}", w) for c, w in zip(colors, weights, strict=False)]
    return concepts


def image_vector(image: Image.Image, key: str, dimensions: int) -> list[float]:
    return vector_of(image_concepts(image), "image:" + key, dimensions)


def text_vector(text: str, dimensions: int) -> list[float]:
    return vector_of(text_concepts(text), "text:" + text, dimensions)
