"""Image fetching against loopback servers that misbehave: HTTP, redirects, limits, TLS."""

from __future__ import annotations

import base64
import functools
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from enrich_pipeline.enrichment.images import (
    ImagePolicy,
    fetch,
    load_image,
)
from enrich_pipeline_tests.helpers import (
    LOOPBACK,
    ONLY_LOOPBACK_EXEMPT,
    PNG,
    data_url,
    load_error,
    noisy_jpeg,
    png_header_only,
)


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
                for _ in range(400):  # 20 s of drip: far past any deadline of the tests
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

    monkeypatch.setattr(fetch.socket, "getaddrinfo", fake)
    loaded = load_image(f"http://images.example.test:{server.port}/host", ONLY_LOOPBACK_EXEMPT)
    assert loaded.image.size == (64, 48)
    assert lookups == ["images.example.test"]
    assert server.hosts["/host"] == f"images.example.test:{server.port}"


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
    # The proof is the byte count below; the time only says the client did not hang on.
    assert time.monotonic() - started < 15
    assert server.huge_done.wait(15), "server kept streaming after the client gave up"
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
    assert time.monotonic() - started < 5  # the server stalls 10 s: room for a busy machine


def test_dripping_body_hits_total_deadline(server: ServerState) -> None:
    """Each byte arrives well within the read timeout; only the total deadline stops it."""
    policy = ImagePolicy(allow_private_networks=True, timeout=0.6)
    started = time.monotonic()
    err = load_error(f"{server.base}/drip", policy)
    assert (err.code, err.permanent) == ("timeout", False)
    assert time.monotonic() - started < 10  # long before the drip's 20 s


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    err = load_error(f"http://127.0.0.1:{port}/x.png")
    assert (err.code, err.permanent) == ("http_error", False)


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

    monkeypatch.setattr(fetch.socket, "getaddrinfo", fake)
    url = f"https://images.example.test:{port}/x.png"

    # The test certificate is not in the system store: verification must fail, permanently.
    err = load_error(url, ONLY_LOOPBACK_EXEMPT)
    assert (err.code, err.permanent) == ("http_error", True)
    assert server_names[-1] == "images.example.test"

    # Trusting it, the same pinned-IP connection verifies against the original name.
    trusting = functools.partial(urllib3.HTTPSConnectionPool, ca_certs=cert)
    monkeypatch.setattr(fetch.urllib3, "HTTPSConnectionPool", trusting)
    assert load_image(url, ONLY_LOOPBACK_EXEMPT).image.size == (64, 48)
    assert server_names[-1] == "images.example.test"
