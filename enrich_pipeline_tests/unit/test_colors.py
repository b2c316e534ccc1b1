"""Dominant colors: K-Means on a small sample, named in CIELAB."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from enrich_pipeline.enrichment.colors import color_name, dominant_colors


def split_image(
    top: tuple[int, int, int], bottom: tuple[int, int, int], top_share: float = 0.6
) -> Image.Image:
    pixels = np.empty((200, 300, 3), dtype=np.uint8)
    cut = int(200 * top_share)
    pixels[:cut] = top
    pixels[cut:] = bottom
    return Image.fromarray(pixels)


def photo_like(seed: int = 1) -> Image.Image:
    """1600x1200: white wall, gray floor, blue sofa, with sensor noise."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((1200, 1600, 3), dtype=np.float32)
    pixels[:] = (235, 235, 230)
    pixels[700:] = (120, 120, 125)
    pixels[400:900, 300:1300] = (40, 70, 180)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def test_blue_and_white_in_order_of_coverage() -> None:
    assert dominant_colors(split_image((30, 60, 200), (255, 255, 255))) == ["blue", "white"]
    assert dominant_colors(split_image((30, 60, 200), (255, 255, 255), 0.4)) == ["white", "blue"]


def test_single_color_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dominant_colors(Image.new("RGB", (640, 480), (200, 20, 30))) == ["red"]
        # Fewer distinct colors than k, as in logos and flat illustrations.
        three = split_image((0, 128, 0), (255, 255, 0))
        three.paste((0, 0, 0), (0, 0, 300, 20))
        assert dominant_colors(three, k=5) == ["green", "yellow", "black"]


def test_gray_detection_with_noise() -> None:
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 10, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert dominant_colors(Image.fromarray(pixels)) == ["gray"]


def test_photo_like_image_and_determinism() -> None:
    image = photo_like()
    first = dominant_colors(image)
    assert first == ["white", "gray", "blue"]
    assert dominant_colors(image) == first
    assert dominant_colors(image, max_names=2) == ["white", "gray"]


def test_transparent_pixels_ignored() -> None:
    cutout = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    cutout.paste((250, 130, 0, 255), (30, 30, 70, 70))
    assert dominant_colors(cutout) == ["orange"]
    assert dominant_colors(Image.new("RGBA", (10, 10), (0, 0, 0, 0))) == []


def test_other_modes_accepted() -> None:
    assert dominant_colors(Image.new("L", (50, 50), 250)) == ["white"]
    assert dominant_colors(Image.new("RGB", (1, 1), (0, 0, 0))) == ["black"]


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((0, 0, 0), "black"),
        ((25, 25, 25), "black"),
        ((255, 255, 255), "white"),
        ((245, 245, 245), "white"),
        ((128, 128, 128), "gray"),
        ((200, 200, 200), "gray"),
        ((120, 125, 135), "gray"),
        ((255, 0, 0), "red"),
        ((255, 165, 0), "orange"),
        ((255, 255, 0), "yellow"),
        ((0, 128, 0), "green"),
        ((0, 0, 255), "blue"),
        ((135, 206, 235), "blue"),
        ((0, 0, 128), "navy"),
        ((128, 0, 128), "purple"),
        ((255, 192, 203), "pink"),
        ((139, 69, 19), "brown"),
        ((245, 245, 220), "beige"),
        ((0, 128, 128), "teal"),
        ((212, 175, 55), "gold"),
    ],
)
def test_color_name(rgb: tuple[int, int, int], name: str) -> None:
    assert color_name(rgb) == name
