"""Images the model would refuse for their shape: padded up to its minimum side, or refused
before any call (the row's ``too_small``), with the token estimate counted on what is sent."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.images import (
    ImageLoadError,
    LoadedImage,
    image_tokens,
    load_image,
    prepare_for_vision,
)
from enrich_pipeline.enrichment.vision_tokens import MAX_ASPECT_RATIO, MIN_SIDE
from enrich_pipeline_tests.helpers import data_url, encode


def sent_size(data: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))) as img:
        return img.size


def loaded(size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 30)) -> LoadedImage:
    return load_image(data_url(encode(Image.new("RGB", size, color), "PNG")))


@pytest.mark.parametrize(
    ("size", "sent"),
    [
        ((2000, 10), (896, 11)),  # was sent as 896x4
        ((10, 2000), (11, 896)),
        ((999, 10), (896, 11)),
        ((5, 5), (11, 11)),
        ((1, 100), (11, 100)),
        ((1, 200), (11, 200)),  # exactly the documented ratio: taken
        ((20, 10), (20, 11)),
    ],
)
def test_a_side_under_the_minimum_is_padded_and_billed_as_sent(
    size: tuple[int, int], sent: tuple[int, int]
) -> None:
    vision = prepare_for_vision(loaded(size))
    assert (vision.width, vision.height) == sent
    # What the service receives is what the estimate counted.
    assert sent_size(vision.data_url) == sent
    assert (
        vision.tokens == image_tokens(*sent) == vision_tokens.image_tokens(*sent, "qwen3-vl-plus")
    )
    assert min(sent) >= MIN_SIDE and max(sent) <= MAX_ASPECT_RATIO * min(sent)


def test_padding_is_white_around_the_picture() -> None:
    vision = prepare_for_vision(loaded((2000, 10), (200, 30, 30)))
    with Image.open(io.BytesIO(base64.b64decode(vision.data_url.split(",", 1)[1]))) as img:
        rgb = img.convert("RGB")
        top, middle = rgb.getpixel((448, 0)), rgb.getpixel((448, 5))
    assert min(top) > 235  # the padding (JPEG: nearly white)
    assert middle[0] > 150 and middle[1] < 90  # the picture, centred


@pytest.mark.parametrize("size", [(1, 100000), (100000, 1), (1, 201), (2000, 9), (4020, 20)])
def test_an_image_longer_than_the_documented_ratio_is_the_rows_too_small(
    size: tuple[int, int],
) -> None:
    with pytest.raises(ImageLoadError) as err:
        prepare_for_vision(loaded(size))
    assert err.value.code == "too_small" and err.value.permanent
    text = str(err.value)
    assert f"{size[0]}x{size[1]}" in text and "200:1" in text
    assert len(text) < 300  # the data: URL shown shortened, as in every image error


def test_the_ratio_is_judged_on_the_original_not_the_working_copy() -> None:
    # 1x5000 is kept as 1x2048 for work; the original's 5000:1 is what decides.
    img = loaded((1, 5000))
    assert img.image.size == (1, 2048)
    with pytest.raises(ImageLoadError) as err:
        prepare_for_vision(img)
    assert "1x5000" in str(err.value)


def test_an_image_exactly_at_the_ratio_after_exif_rotation_is_taken() -> None:
    # Upright 10x2000 (stored 2000x10, orientation 6): padded across, not refused.
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = encode(Image.new("RGB", (2000, 10), (0, 0, 255)), "JPEG", exif=exif.tobytes())
    img = load_image(data_url(raw, "image/jpeg"))
    assert (img.original_width, img.original_height) == (10, 2000)
    vision = prepare_for_vision(img)
    assert (vision.width, vision.height) == (11, 896)
