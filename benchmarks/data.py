"""Benchmark inputs: many small distinct JPEGs, and a few photo-like large ones.

Every small image has its own content (random shapes plus its index drawn as a bit pattern), so
no two rows share a content hash and the caption cache cannot merge them: each row costs one
model call, as in a table of real photos.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw


def small_image(index: int, size: tuple[int, int]) -> Image.Image:
    rng = random.Random(index)
    width, height = size
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randint(width // 6, width // 2))
        y1 = min(height, y0 + rng.randint(height // 6, height // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
    # The index as 2x2 black/white blocks along the bottom edge: distinct pixels for sure.
    block = max(1, min(2, height // 24))
    for bit in range(20):
        colour = (255, 255, 255) if (index >> bit) & 1 else (0, 0, 0)
        x = bit * block
        if x + block <= width:
            draw.rectangle((x, height - block, x + block - 1, height - 1), fill=colour)
    return img


def write_small_images(
    folder: Path, count: int, size: tuple[int, int], start: int = 0
) -> list[Path]:
    """``count`` distinct JPEGs ``folder/NNNNNN.jpg`` (existing files are reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[str] = set()
    for index in range(start, start + count):
        path = folder / f"{index:06d}.jpg"
        if not path.exists():
            buffer = io.BytesIO()
            small_image(index, size).save(buffer, "JPEG", quality=85)
            data = buffer.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:  # never seen in practice; keep the promise anyway
                data += index.to_bytes(4, "big")
            seen.add(digest)
            path.write_bytes(data)
        paths.append(path)
    return paths


def photo_like(seed: int, size: tuple[int, int]) -> Image.Image:
    """A camera-like picture: smooth gradients, a few soft objects and sensor noise.

    Noise matters: flat synthetic drawings decode, resize and cluster much faster than photos.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    small_w, small_h = max(8, width // 16), max(6, height // 16)
    xs = np.linspace(0.0, 1.0, small_w, dtype=np.float32)[None, :, None]
    ys = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None, None]
    c0, cx, cy = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    base = c0 * (1 - xs) * (1 - ys) + cx * xs + cy * ys * (1 - xs)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    pyrng = random.Random(seed)
    for _ in range(pyrng.randint(3, 7)):
        x0, y0 = pyrng.randrange(small_w), pyrng.randrange(small_h)
        x1, y1 = x0 + pyrng.randint(2, small_w // 2), y0 + pyrng.randint(2, small_h // 2)
        fill = tuple(pyrng.randrange(256) for _ in range(3))
        (draw.ellipse if pyrng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.resize(size, Image.Resampling.BICUBIC)
    noise = Image.effect_noise(size, 10).convert("RGB")
    return ImageChops.add(img, noise, scale=1.0, offset=-128)


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"photo_{size[0]}x{size[1]}_{seed + n:03d}.jpg"
        if not path.exists():
            photo_like(seed + n, size).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths
