"""Dominant colors of an image as plain color names.

K-Means runs on a small sample of the decoded pixels (a 64x64 resize is plenty to find the few
colors that cover an image and keeps the cost at a few milliseconds), and each cluster centre is
named by its nearest prototype in CIELAB, where Euclidean distance roughly follows perceived
difference (in RGB, dark blues and blacks sit deceptively far apart).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

_openmp_limited = False


def _single_threaded_openmp() -> None:
    """K-Means on a few thousand pixels gains nothing from OpenMP threads, and the pipeline
    already works on many images at once: there the threads spin-wait for a busy core (one
    measured run: 232 ms a call instead of 3 ms). Limited once, for the process."""
    global _openmp_limited
    if not _openmp_limited:
        threadpool_limits(limits=1, user_api="openmp")
        _openmp_limited = True


__all__ = ["COLOR_PROTOTYPES", "color_name", "dominant_colors", "rgb_to_lab"]

# Several prototypes per name: one RGB point per name would carve the space badly (light blue
# would fall to white, olive to gold). Black, white and gray are decided by the chroma rule in
# color_name() before prototypes are consulted.
COLOR_PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((220, 20, 35), (255, 0, 0), (178, 34, 34), (139, 0, 0), (255, 80, 70)),
    "orange": ((255, 140, 0), (255, 165, 0), (240, 110, 30), (255, 127, 80), (210, 105, 30)),
    "yellow": ((255, 255, 0), (255, 230, 40), (250, 220, 90), (255, 250, 150), (240, 230, 140)),
    "gold": ((212, 175, 55), (218, 165, 32), (184, 134, 11), (200, 160, 40)),
    "green": (
        (0, 128, 0),
        (34, 139, 34),
        (50, 205, 50),
        (0, 255, 0),
        (124, 200, 80),
        (144, 238, 144),
        (85, 107, 47),
        (128, 128, 0),
        (0, 100, 0),
        (46, 139, 87),
        (154, 205, 50),
    ),
    "teal": ((0, 128, 128), (32, 178, 170), (64, 224, 208), (0, 206, 209), (0, 255, 255)),
    "blue": (
        (0, 0, 255),
        (30, 80, 220),
        (65, 105, 225),
        (30, 144, 255),
        (70, 130, 180),
        (100, 149, 237),
        (135, 206, 235),
        (173, 216, 230),
        (0, 90, 160),
    ),
    "navy": ((0, 0, 128), (25, 25, 112), (20, 30, 80), (30, 45, 100), (0, 0, 90)),
    "purple": (
        (128, 0, 128),
        (120, 60, 170),
        (148, 0, 211),
        (75, 0, 130),
        (147, 112, 219),
        (186, 140, 220),
        (230, 190, 250),
    ),
    "pink": (
        (255, 192, 203),
        (255, 105, 180),
        (255, 20, 147),
        (255, 0, 255),
        (219, 112, 147),
        (250, 160, 180),
        (199, 21, 133),
    ),
    "brown": (
        (139, 69, 19),
        (160, 82, 45),
        (101, 67, 33),
        (120, 70, 50),
        (80, 50, 30),
        (165, 110, 60),
        (110, 80, 60),
    ),
    "beige": (
        (245, 245, 220),
        (225, 205, 170),
        (210, 180, 140),
        (222, 196, 160),
        (240, 225, 200),
        (200, 175, 140),
    ),
}

_WHITE_POINT_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
# Below this chroma a color reads as a shade of gray whatever its hue angle, and hue-based
# prototype matching would be noise (JPEG tints, white balance).
_ACHROMATIC_CHROMA = 12.0
_BLACK_MAX_L = 22.0
_WHITE_MIN_L = 88.0
# Very dark colors look black unless they are strongly colored (navy keeps its name).
_DARK_L = 12.0
_DARK_MAX_CHROMA = 25.0

_SAMPLE_SIDE = 64
# Names covering less than this share of the sampled pixels are noise (edges, highlights),
# not something a person would call a dominant color.
_MIN_SHARE = 0.05


def rgb_to_lab(rgb: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.float64]:
    """sRGB (0-255, shape ``(..., 3)``) to CIELAB under D65."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _WHITE_POINT_D65
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], axis=-1)


_PROTOTYPE_NAMES: tuple[str, ...] = tuple(
    name for name, protos in COLOR_PROTOTYPES.items() for _ in protos
)
_PROTOTYPE_LAB = rgb_to_lab(np.array([p for protos in COLOR_PROTOTYPES.values() for p in protos]))


# The color names in Chinese, for captions said in Chinese without a model (the offline
# provider) and for the stand-in's Chinese answers; a name missing here is said in English.
COLOR_NAMES_ZH = {
    "black": "黑色",
    "gray": "灰色",
    "white": "白色",
    "red": "红色",
    "orange": "橙色",
    "yellow": "黄色",
    "gold": "金色",
    "green": "绿色",
    "teal": "青色",
    "blue": "蓝色",
    "navy": "藏青色",
    "purple": "紫色",
    "pink": "粉色",
    "brown": "棕色",
    "beige": "米色",
}


def color_name(rgb: tuple[int, int, int]) -> str:
    """The common name (black, white, gray, red, blue, navy, beige, ...) nearest to ``rgb``."""
    lightness, a, b = rgb_to_lab(np.array(rgb, dtype=np.float64))
    chroma = math.hypot(a, b)
    if chroma < _ACHROMATIC_CHROMA or (lightness < _DARK_L and chroma < _DARK_MAX_CHROMA):
        if lightness < _BLACK_MAX_L:
            return "black"
        if lightness > _WHITE_MIN_L:
            return "white"
        return "gray"
    distances = np.linalg.norm(_PROTOTYPE_LAB - np.array([lightness, a, b]), axis=1)
    return _PROTOTYPE_NAMES[int(np.argmin(distances))]


def dominant_colors(
    image: Image.Image,
    k: int = 5,
    max_names: int = 3,
    sample_pixels: int = 4096,
    seed: int = 0,
) -> list[str]:
    """Names of the main colors of ``image``, most covering first, without duplicates.

    Fully transparent pixels are ignored (a cut-out product photo is about the product, not its
    background). Returns ``[]`` for an image with no visible pixel.
    """
    if k < 1 or max_names < 1 or sample_pixels < 1:
        raise ValueError("k, max_names and sample_pixels must be positive")
    pixels = _sample_pixels(image, sample_pixels)
    if len(pixels) == 0:
        return []
    centres, weights = _cluster(pixels, k, seed)

    shares: dict[str, float] = {}
    for centre, weight in zip(centres, weights, strict=True):
        rgb = tuple(int(round(v)) for v in centre)
        name = color_name((rgb[0], rgb[1], rgb[2]))
        # Several clusters often get one name (two shades of a blue sofa): their coverage adds
        # up, so the merged name is ranked by its total share.
        shares[name] = shares.get(name, 0.0) + float(weight)
    total = sum(shares.values())
    # sorted() is stable: equal shares keep the order of the larger first cluster.
    ranked = sorted(shares.items(), key=lambda item: -item[1])
    names = [name for name, share in ranked if share / total >= _MIN_SHARE]
    return (names or [ranked[0][0]])[:max_names]


def _sample_pixels(image: Image.Image, sample_pixels: int) -> NDArray[np.float32]:
    side = max(1, min(_SAMPLE_SIDE, math.isqrt(sample_pixels)))
    width, height = image.size
    if width == 0 or height == 0:
        return np.empty((0, 3), dtype=np.float32)
    target = (min(width, side), min(height, side))
    # NEAREST picks real pixels: averaging filters would blend a red-and-white stripe into a pink
    # that is nowhere in the picture. K-Means does the averaging where it belongs.
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    small = image.resize(target, Image.Resampling.NEAREST)
    if has_alpha:
        rgba = np.asarray(small.convert("RGBA")).reshape(-1, 4)
        return rgba[rgba[:, 3] >= 128, :3].astype(np.float32)
    rgb = small if small.mode == "RGB" else small.convert("RGB")
    return np.asarray(rgb, dtype=np.float32).reshape(-1, 3)


def _cluster(
    pixels: NDArray[np.float32], k: int, seed: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Cluster centres and their pixel counts, largest cluster first."""
    # Pack RGB into one integer so distinct colors are counted with a fast 1-D unique.
    packed = (
        (pixels[:, 0].astype(np.uint32) << 16)
        | (pixels[:, 1].astype(np.uint32) << 8)
        | pixels[:, 2].astype(np.uint32)
    )
    distinct, counts = np.unique(packed, return_counts=True)
    if len(distinct) <= k:
        # Flat images and logos: the distinct colors are the exact answer, and KMeans would warn
        # about finding fewer clusters than requested.
        centres = np.stack([(distinct >> 16) & 255, (distinct >> 8) & 255, distinct & 255], axis=1)
        order = np.argsort(-counts, kind="stable")
        return centres[order].astype(np.float64), counts[order].astype(np.float64)
    # One k-means++ initialisation is enough at this size and keeps the call in the low
    # milliseconds; a fixed random_state makes the same picture give the same names.
    model = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100)
    _single_threaded_openmp()
    labels = model.fit_predict(pixels)
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    order = np.argsort(-sizes, kind="stable")
    return model.cluster_centers_[order].astype(np.float64), sizes[order]
