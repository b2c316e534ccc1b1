"""Image loading: sources, the SSRF guard, hostile servers and hostile bytes, vision sizing."""

from __future__ import annotations

import base64
import functools
import io
import pickle
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
import urllib3
from PIL import Image

from enrich_pipeline.enrichment import images
from enrich_pipeline.enrichment.images import (
    ImageLoadError,
    ImagePolicy,
    LoadedImage,
    blocked_address_reason,
    image_tokens,
    load_image,
    prepare_for_vision,
    redact_source,
)

LOOPBACK = ImagePolicy(allow_private_networks=True, timeout=5.0)
ONLY_LOOPBACK_EXEMPT = ImagePolicy(allowed_networks=frozenset({"127.0.0.0/8"}), timeout=5.0)


# ---------------------------------------------------------------------------------------------
# Image bytes


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid_png(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (20, 60, 200)
) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def noisy_jpeg(size: tuple[int, int] = (320, 240)) -> bytes:
    # Noise defeats compression, so the scan data is long and cutting it loses real content.
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height``: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


# ---------------------------------------------------------------------------------------------
# A loopback HTTP server with misbehaving routes


@dataclass
class ServerState:
    base: str = ""
    port: int = 0
    paths: list[str] = field(default_factory=list)
    hosts: dict[str, str] = field(default_factory=dict)
    auth: dict[str, str | None] = field(default_factory=dict)
    huge_sent: int = 0
    huge_done: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


PNG = solid_png()
_JPEG = noisy_jpeg()
TRUNCATED_JPEG = _JPEG[: int(len(_JPEG) * 0.6)]
HUGE_TOTAL = 200 * 1024 * 1024


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-body is what several tests provoke on purpose.
        pass


def make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def send_body(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: C901, N802 - one switch keeps the routes readable
            path = self.path.split("?", 1)[0]
            state.paths.append(path)
            state.hosts[path] = self.headers.get("Host", "")
            state.auth[path] = self.headers.get("Authorization")
            if path in ("/img.png", "/host", "/auth"):
                self.send_body(200, PNG, "image/png")
            elif path == "/octet":
                self.send_body(200, PNG, "application/octet-stream")
            elif path == "/missing":
                self.send_body(404, b"not here", "text/plain")
            elif path.startswith("/status/"):
                self.send_body(int(path.rsplit("/", 1)[1]), b"nope", "text/plain")
            elif path == "/page.html":
                self.send_body(200, b"<!DOCTYPE html><html><body>hi</body></html>", "text/html")
            elif path == "/lying-html":
                self.send_body(200, b"<!doctype html><html>oops</html>", "image/jpeg")
            elif path == "/logo.svg":
                self.send_body(200, b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")
            elif path == "/lying-svg":
                svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'
                self.send_body(200, svg, "image/png")
            elif path == "/truncated.jpg":
                self.send_body(200, TRUNCATED_JPEG, "image/jpeg")
            elif path == "/bomb.png":
                self.send_body(200, png_header_only(100_000, 100_000), "image/png")
            elif path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10**10))
                self.end_headers()
                self.wfile.write(b"\xff\xd8")
            elif path == "/huge":
                self.stream_huge()
            elif path == "/loop":
                self.redirect("/loop")
            elif path.startswith("/chain/"):
                self.redirect(f"/chain/{int(path.rsplit('/', 1)[1]) + 1}")
            elif path == "/hop":
                self.redirect("/img.png")
            elif path == "/to-metadata":
                self.redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/to-file":
                self.redirect("file:///etc/passwd")
            elif path == "/stall":
                state.release.wait(10)
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(100):
                    if state.release.wait(0.05):
                        break
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        break
            else:
                self.send_body(500, b"no route", "text/plain")

        def stream_huge(self) -> None:
            # No Content-Length: only the client's byte cap can stop this body.
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"\xff" * 65536
            try:
                while state.huge_sent < HUGE_TOTAL:
                    self.wfile.write(chunk)
                    state.huge_sent += len(chunk)
            except OSError:
                pass
            finally:
                state.huge_done.set()
                self.close_connection = True

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[ServerState]:
    state = ServerState()
    httpd = QuietServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.port = httpd.server_address[1]
    state.base = f"http://127.0.0.1:{state.port}"
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()


def load_error(source: str, policy: ImagePolicy = LOOPBACK) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, policy)
    return info.value


# ---------------------------------------------------------------------------------------------
# Sources


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


# ---------------------------------------------------------------------------------------------
# HTTP: success paths


def test_http_loopback_with_explicit_permission(server: ServerState) -> None:
    loaded = load_image(f"{server.base}/img.png", LOOPBACK)
    assert loaded.image.size == (64, 48)
    assert load_image(f"{server.base}/octet", LOOPBACK).image.size == (64, 48)
    assert load_image(f"{server.base}/hop", LOOPBACK).image.size == (64, 48)


def test_default_policy_refuses_loopback_before_connecting(server: ServerState) -> None:
    before = list(server.paths)
    err = load_error(f"{server.base}/img.png?never", ImagePolicy())
    assert err.code == "blocked_address" and err.permanent
    assert "127.0.0.1" in str(err) and "loopback" in str(err)
    assert server.paths == before  # no request reached the server


def test_connects_to_vetted_ip_and_keeps_host_header(
    server: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once, the IP is vetted, and the request carries the name."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake(host: str, *args: object, **kwargs: object) -> list:
        if host == "images.example.test":
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port))]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(images.socket, "getaddrinfo", fake)
    loaded = load_image(f"http://images.example.test:{server.port}/host", ONLY_LOOPBACK_EXEMPT)
    assert loaded.image.size == (64, 48)
    assert lookups == ["images.example.test"]
    assert server.hosts["/host"] == f"images.example.test:{server.port}"


def test_any_forbidden_answer_blocks_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(images.socket, "getaddrinfo", fake)
    err = load_error("https://rebind.example.test/cat.jpg", ImagePolicy())
    assert err.code == "blocked_address"
    assert "10.1.2.3" in str(err) and "private" in str(err)


def test_credentials_sent_to_origin_but_never_shown(server: ServerState) -> None:
    url = f"http://alice:s3cr3t-pw@127.0.0.1:{server.port}"
    assert load_image(f"{url}/auth", LOOPBACK).image.size == (64, 48)
    expected = "Basic " + base64.b64encode(b"alice:s3cr3t-pw").decode()
    assert server.auth["/auth"] == expected

    err = load_error(f"{url}/missing?X-Oss-Signature=sig-value-123")
    assert err.code == "not_found"
    message = str(err)
    assert "s3cr3t" not in message and "alice" not in message
    assert "sig-value-123" not in message
    assert f"127.0.0.1:{server.port}/missing" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# HTTP: hostile or broken servers


def test_http_status_codes(server: ServerState) -> None:
    err = load_error(f"{server.base}/missing")
    assert (err.code, err.permanent) == ("not_found", True)
    for status, permanent in ((503, False), (429, False), (500, False), (403, True)):
        err = load_error(f"{server.base}/status/{status}")
        assert (err.code, err.permanent) == ("http_error", permanent), status
        assert f"HTTP {status}" in str(err)


def test_html_and_svg_refused(server: ServerState) -> None:
    assert load_error(f"{server.base}/page.html").code == "not_an_image"
    assert load_error(f"{server.base}/lying-html").code == "not_an_image"
    assert load_error(f"{server.base}/logo.svg").code == "unsupported_format"
    assert load_error(f"{server.base}/lying-svg").code == "unsupported_format"


def test_truncated_jpeg(server: ServerState) -> None:
    err = load_error(f"{server.base}/truncated.jpg")
    assert err.code == "truncated" and err.permanent
    assert load_error(data_url(TRUNCATED_JPEG, "image/jpeg")).code == "truncated"


def test_declared_oversize_refused_without_reading(server: ServerState) -> None:
    err = load_error(f"{server.base}/declared-huge")
    assert err.code == "too_large" and err.permanent
    assert str(err).startswith(f"image too large: more than {LOOPBACK.max_bytes} bytes (")


def test_streamed_oversize_stops_early(server: ServerState) -> None:
    policy = ImagePolicy(allow_private_networks=True, max_bytes=1_000_000, timeout=10)
    started = time.monotonic()
    err = load_error(f"{server.base}/huge", policy)
    assert err.code == "too_large"
    assert time.monotonic() - started < 5
    assert server.huge_done.wait(5), "server kept streaming after the client gave up"
    # What the server managed to push is the cap plus kernel socket buffers, not 200 MB.
    print(f"huge body: server pushed {server.huge_sent} bytes before the client hung up")
    assert server.huge_sent < 40 * 1024 * 1024


def test_decompression_bomb_refused_from_header(server: ServerState) -> None:
    assert load_error(f"{server.base}/bomb.png").code == "too_many_pixels"
    # Above our limit but below Pillow's own: the policy check must catch it.
    err = load_error(data_url(png_header_only(8000, 7000)))
    assert err.code == "too_many_pixels" and "8000x7000" in str(err)
    err = load_error(data_url(PNG), ImagePolicy(max_pixels=1000))
    assert err.code == "too_many_pixels"


def test_redirect_loop_and_chain(server: ServerState) -> None:
    err = load_error(f"{server.base}/loop")
    assert err.code == "too_many_redirects" and "loop" in str(err)
    err = load_error(f"{server.base}/chain/0")
    assert err.code == "too_many_redirects"
    assert server.paths.count("/chain/3") == 1 and "/chain/4" not in server.paths


def test_redirect_to_metadata_service_refused(server: ServerState) -> None:
    err = load_error(f"{server.base}/to-metadata", ONLY_LOOPBACK_EXEMPT)
    assert err.code == "blocked_address"
    assert "169.254.169.254" in str(err) and "link-local" in str(err)


def test_redirect_to_file_url_refused(server: ServerState) -> None:
    assert load_error(f"{server.base}/to-file").code == "bad_source"


def test_stalled_server_times_out(server: ServerState) -> None:
    policy = ImagePolicy(allow_private_networks=True, timeout=0.4)
    started = time.monotonic()
    err = load_error(f"{server.base}/stall", policy)
    assert (err.code, err.permanent) == ("timeout", False)
    assert time.monotonic() - started < 2


def test_dripping_body_hits_total_deadline(server: ServerState) -> None:
    """Each byte arrives well within the read timeout; only the total deadline stops it."""
    policy = ImagePolicy(allow_private_networks=True, timeout=0.6)
    started = time.monotonic()
    err = load_error(f"{server.base}/drip", policy)
    assert (err.code, err.permanent) == ("timeout", False)
    assert time.monotonic() - started < 1.5


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    err = load_error(f"http://127.0.0.1:{port}/x.png")
    assert (err.code, err.permanent) == ("http_error", False)


# ---------------------------------------------------------------------------------------------
# SSRF guard and messages


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


# ---------------------------------------------------------------------------------------------
# Decoding


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
    assert max(loaded.image.size) <= images.WORK_MAX_SIDE
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


# ---------------------------------------------------------------------------------------------
# Vision sizing


def _loaded(width: int, height: int) -> LoadedImage:
    return LoadedImage(
        source="test",
        image=Image.new("RGB", (width, height), (1, 2, 3)),
        original_width=width,
        original_height=height,
        content_sha256="0" * 64,
    )


def test_image_tokens() -> None:
    assert image_tokens(28, 28) == 4  # the floor
    assert image_tokens(280, 280) == 100
    assert image_tokens(29, 280) == 20
    assert image_tokens(1, 1) == 4


def test_downscaling_saves_at_least_two_thirds_of_tokens(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (90, 140, 60)).save(path, quality=70)
    vision = prepare_for_vision(load_image(str(path)), max_side=1024)
    full = image_tokens(4000, 3000)
    assert vision.tokens == image_tokens(vision.width, vision.height)
    assert vision.tokens * 3 <= full
    assert max(vision.width, vision.height) <= 1024
    assert vision.width % 28 == 0 and vision.height % 28 == 0
    assert abs(vision.width / vision.height - 4 / 3) < 0.03

    assert vision.data_url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(vision.data_url.split(",", 1)[1])))
    assert decoded.format == "JPEG" and decoded.size == (vision.width, vision.height)


def test_vision_sizes_snap_to_the_patch_grid() -> None:
    wide = prepare_for_vision(_loaded(1500, 300), max_side=1024)
    assert (wide.width, wide.height) == (1008, 202)
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
    assert vision.width <= min(size[0], max_side) and vision.height <= min(size[1], max_side)
    assert vision.width >= 1 and vision.height >= 1


# ---------------------------------------------------------------------------------------------
# TLS to a pinned IP


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, list[str]]]:
    """An HTTPS server on loopback whose certificate names images.example.test only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.example.test"]
        + ["-addext", "subjectAltName=DNS:images.example.test"],
        check=True,
        capture_output=True,
    )
    server_names: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name or "")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1], str(cert), server_names
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_to_pinned_ip_keeps_sni_and_verifies_the_name(
    tls_server: tuple[int, str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, cert, server_names = tls_server
    real = socket.getaddrinfo

    def fake(host: str, *args: object, **kwargs: object) -> list:
        if host == "images.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(images.socket, "getaddrinfo", fake)
    url = f"https://images.example.test:{port}/x.png"

    # The test certificate is not in the system store: verification must fail, permanently.
    err = load_error(url, ONLY_LOOPBACK_EXEMPT)
    assert (err.code, err.permanent) == ("http_error", True)
    assert server_names[-1] == "images.example.test"

    # Trusting it, the same pinned-IP connection verifies against the original name.
    trusting = functools.partial(urllib3.HTTPSConnectionPool, ca_certs=cert)
    monkeypatch.setattr(images.urllib3, "HTTPSConnectionPool", trusting)
    assert load_image(url, ONLY_LOOPBACK_EXEMPT).image.size == (64, 48)
    assert server_names[-1] == "images.example.test"


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
