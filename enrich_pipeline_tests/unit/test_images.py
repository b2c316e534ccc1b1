"""Image loading from data URLs and files, decoding, the SSRF verdicts, vision sizing."""

from __future__ import annotations

import base64
import io
import pickle
import socket
from pathlib import Path
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
from PIL import Image

from enrich_pipeline.enrichment.images import (
    WORK_MAX_SIDE,
    ImageLoadError,
    ImagePolicy,
    LoadedImage,
    blocked_address_reason,
    fetch,
    image_tokens,
    load_image,
    prepare_for_vision,
)
from enrich_pipeline.enrichment.vision_tokens import MIN_SIDE
from enrich_pipeline.redaction import redact_source
from enrich_pipeline_tests.helpers import PNG, data_url, encode, load_error


def test_data_url_base64_and_percent_encoded() -> None:
    loaded = load_image(data_url(PNG))
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (64, 48)
    assert (loaded.original_width, loaded.original_height) == (64, 48)
    assert loaded.image.getpixel((5, 5)) == (20, 60, 200)
    assert loaded.format == "PNG"

    percent = "data:image/png," + quote_from_bytes(PNG)
    assert load_image(percent).content_sha256 == loaded.content_sha256

    import hashlib

    assert loaded.content_sha256 == hashlib.sha256(PNG).hexdigest()


def test_data_url_errors_are_short_and_typed() -> None:
    huge = "data:image/png;base64," + "A" * 200_000
    err = load_error(huge, ImagePolicy(max_bytes=1000))
    assert err.code == "too_large" and err.permanent
    assert len(str(err)) < 300 and "AAAAAAAAAAAAAAAAAAAAAAAAA" not in str(err)

    assert load_error("data:image/png;base64,@@@not base64@@@").code == "bad_source"
    assert load_error("data:image/png;base64").code == "bad_source"
    assert load_error(data_url(b"<svg/>", "image/svg+xml")).code == "unsupported_format"
    assert load_error(data_url(b"hello", "text/plain")).code == "not_an_image"


def test_local_path_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    assert load_image(str(path)).image.size == (64, 48)
    assert load_image(path.as_uri()).image.size == (64, 48)

    err = load_error(str(path), ImagePolicy(allow_local_files=False))
    assert err.code == "bad_source"
    err = load_error(path.as_uri(), ImagePolicy(allow_local_files=False))
    assert err.code == "bad_source"

    err = load_error(str(tmp_path / "absent.png"))
    assert err.code == "not_found" and err.permanent
    assert load_error(str(tmp_path)).code == "bad_source"

    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 5000)
    assert load_error(str(big), ImagePolicy(max_bytes=4096)).code == "too_large"


@pytest.mark.parametrize("source", ["", "   ", "ftp://example.com/a.png", "gopher://x/"])
def test_bad_sources(source: str) -> None:
    assert load_error(source).code == "bad_source"


def test_any_forbidden_answer_blocks_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(fetch.socket, "getaddrinfo", fake)
    err = load_error("https://rebind.example.test/cat.jpg", ImagePolicy())
    assert err.code == "blocked_address"
    assert "10.1.2.3" in str(err) and "private" in str(err)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.8", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2002:0a00:0001::", "private"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_blocked_address_reason(address: str, reason: str | None) -> None:
    assert blocked_address_reason(address) == reason


def test_exempt_networks_are_narrow() -> None:
    policy = ImagePolicy(allowed_networks=frozenset({"10.20.0.0/16"}))
    exempt = policy.exempt_networks()
    assert blocked_address_reason("10.20.3.4", exempt) is None
    assert blocked_address_reason("10.21.3.4", exempt) == "private"
    with pytest.raises(ValueError):
        ImagePolicy(allowed_networks=frozenset({"not-a-network"}))


def test_redact_source() -> None:
    assert redact_source("https://u:p@h.example/a.jpg?X-Amz-Signature=abc&w=3") == (
        "https://h.example/a.jpg?X-Amz-Signature=REDACTED&w=3"
    )
    shown = redact_source("data:image/png;base64," + "A" * 10_000)
    assert shown.startswith("data:image/png;base64,") and len(shown) < 120
    assert "\n" not in redact_source("http://h.example/a\nInjected: yes")


def test_error_pickles_with_its_flags() -> None:
    err = ImageLoadError("timeout", "image fetch timed out", permanent=False)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.permanent, str(copy)) == ("timeout", False, "image fetch timed out")


def test_alpha_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    loaded = load_image(data_url(encode(rgba, "PNG")))
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((10, 5)) == (255, 255, 255)
    assert loaded.image.getpixel((0, 0)) == (255, 0, 0)

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 1), 1)
    gif = encode(palette, "GIF", transparency=0)
    loaded = load_image(data_url(gif, "image/gif"))
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.image.getpixel((1, 1)) == (0, 255, 0)


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.new("L", (16, 16), 128), "PNG"),
        (Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"),
        (Image.new("1", (16, 16), 1), "BMP"),
        (Image.new("RGB", (16, 16), (10, 20, 30)), "WEBP"),
        (Image.new("RGB", (16, 16), (10, 20, 30)), "TIFF"),
    ],
)
def test_modes_become_rgb(image: Image.Image, fmt: str) -> None:
    loaded = load_image(data_url(encode(image, fmt), "application/octet-stream"))
    assert loaded.image.mode == "RGB" and loaded.image.size == (16, 16)


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    deep = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    loaded = load_image(data_url(encode(deep, "PNG")))
    red, green, blue = loaded.image.getpixel((0, 0))
    assert 120 <= red <= 135 and red == green == blue


def test_exif_orientation_applied() -> None:
    wide = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(data_url(encode(wide, "JPEG", exif=exif.tobytes()), "image/jpeg"))
    assert loaded.image.size == (20, 40)
    assert (loaded.original_width, loaded.original_height) == (20, 40)


def test_large_image_reduced_for_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (90, 140, 60)).save(path, quality=70)
    loaded = load_image(str(path))
    assert max(loaded.image.size) <= WORK_MAX_SIDE
    assert (loaded.original_width, loaded.original_height) == (4000, 3000)


def test_format_allow_list() -> None:
    ico = encode(Image.new("RGB", (16, 16), "red"), "ICO")
    err = load_error(data_url(ico, "image/x-icon"))
    assert err.code == "unsupported_format" and "ICO" in str(err)
    err = load_error(data_url(PNG), ImagePolicy(allowed_formats=frozenset({"jpeg"})))
    assert err.code == "unsupported_format"
    assert load_error(data_url(b"\x00\x01garbage" * 10, "image/png")).code == "not_an_image"
    assert load_error(data_url(b"", "image/png")).code == "not_an_image"


def test_loaded_image_repr_hides_source() -> None:
    loaded = load_image(data_url(PNG))
    assert len(repr(loaded)) < 300


def _loaded(width: int, height: int) -> LoadedImage:
    return LoadedImage(
        source="test",
        image=Image.new("RGB", (width, height), (1, 2, 3)),
        original_width=width,
        original_height=height,
        content_sha256="0" * 64,
    )


def test_image_tokens() -> None:
    # As DashScope counts them (vision_tokens): patches of the model's grid, at least 4, plus
    # <vision_bos>/<vision_eos>, capped. The default model, qwen3-vl-plus, has 32-px patches.
    assert image_tokens(28, 28) == 4 + 2  # the floor
    assert image_tokens(320, 320) == 100 + 2
    assert image_tokens(280, 280, "qvq-max") == 100 + 2  # a 28-px model
    assert image_tokens(29, 280, "qvq-max") == 10 + 2
    assert image_tokens(1, 1) == 4 + 2
    assert image_tokens(4000, 3000) == 58 * 43 + 2  # the 2,560-token cap: 1856x1376


def test_downscaling_saves_at_least_two_thirds_of_tokens(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (90, 140, 60)).save(path, quality=70)
    vision = prepare_for_vision(load_image(str(path)), max_side=1024)
    full = image_tokens(4000, 3000)
    assert vision.tokens == image_tokens(vision.width, vision.height)
    assert vision.tokens * 3 <= full
    assert max(vision.width, vision.height) <= 1024
    assert vision.width % 32 == 0 and vision.height % 32 == 0  # qwen3-vl-plus's grid
    assert abs(vision.width / vision.height - 4 / 3) < 0.03

    assert vision.data_url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(vision.data_url.split(",", 1)[1])))
    assert decoded.format == "JPEG" and decoded.size == (vision.width, vision.height)


def test_vision_sizes_snap_to_the_patch_grid() -> None:
    wide = prepare_for_vision(_loaded(1500, 300), max_side=1024)
    assert (wide.width, wide.height) == (1024, 205)  # 32-px grid (the short side is < 10 patches)
    old_grid = prepare_for_vision(_loaded(1500, 300), max_side=1024, model="qvq-max")
    assert (old_grid.width, old_grid.height) == (1008, 202)
    # Small images keep their size: snapping 100x50 would distort it for no saving.
    small = prepare_for_vision(_loaded(100, 50))
    assert (small.width, small.height) == (100, 50)
    assert small.tokens == image_tokens(100, 50) == 8


@pytest.mark.parametrize(
    ("size", "max_side"),
    [
        ((100, 50), 1024),
        ((20, 10), 1024),
        ((1500, 300), 1024),
        ((1024, 1024), 1024),
        ((999, 10), 500),
    ],
)
def test_vision_never_upscales_nor_exceeds_max_side(size: tuple[int, int], max_side: int) -> None:
    vision = prepare_for_vision(_loaded(*size), max_side=max_side)
    # A side under the model's minimum is padded up to it (20x10 is sent as 20x11): padding, not
    # upscaling (test_image_shapes.py).
    assert vision.width <= max(min(size[0], max_side), MIN_SIDE)
    assert vision.height <= max(min(size[1], max_side), MIN_SIDE)
    assert vision.width >= MIN_SIDE and vision.height >= MIN_SIDE


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/",
        "http://[fd00:ec2::254]/",
    ],
)
def test_metadata_endpoints_stay_refused_with_private_networks_open(url: str) -> None:
    policy = ImagePolicy(allow_private_networks=True)
    with pytest.raises(ImageLoadError) as err:
        load_image(url, policy)
    # Refused before any connection is attempted: nothing leaves this machine.
    assert err.value.code == "blocked_address" and "cloud metadata" in str(err.value)
