"""Through a real loopback server and the real command line: with
``ENRICH_ALLOW_PRIVATE_NETWORKS=true`` an image URL that reaches a cloud-metadata endpoint
through an IPv6 form of its address, directly or by a redirect, is refused before any
connection to it, recorded as ``blocked_address`` (permanent), and costs no model call."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

import pytest

from enrich_pipeline.enrichment.images import ImageLoadError, ImagePolicy, load_image
from enrich_pipeline_tests.helpers import Items, png, run_cli
from enrich_pipeline_tests.standin import StandIn
from enrich_pipeline_tests.unit.test_ssrf_ipv6 import forms

OPEN = ImagePolicy(allow_private_networks=True, timeout=3.0)
# One form of each kind (all of them are covered by the unit tier).
KINDS = (
    "IPv4-mapped",
    "IPv4-compatible",
    "IPv4-translated (SIIT)",
    "NAT64 well-known",
    "NAT64 local-use /96",
    "6to4",
    "Teredo client",
    "ISATAP, global prefix, u bit",
)


class Redirector:
    """``/to/<url>`` answers 302 to ``<url>``; ``/ok.png`` is an image; every path is logged."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                state.paths.append(self.path)
                if self.path.startswith("/to/"):
                    self.send_response(302)
                    self.send_header("Location", unquote(self.path.removeprefix("/to/")))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = png((40, 80, 200))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def to(self, url: str) -> str:
        return f"{self.base}/to/{quote(url, safe='')}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def redirector() -> Iterator[Redirector]:
    server = Redirector()
    yield server
    server.close()


def metadata_urls() -> dict[str, str]:
    return {
        f"{kind} of {address}": f"http://[{forms(address)[kind]}]/latest/meta-data/"
        for address in ("169.254.169.254", "100.100.100.200")
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_redirect_to_an_ipv6_form_of_the_metadata_endpoint_is_refused(
    redirector: Redirector, kind: str
) -> None:
    target = f"http://[{forms('169.254.169.254')[kind]}]/latest/meta-data/iam/"
    with pytest.raises(ImageLoadError) as info:
        load_image(redirector.to(target), OPEN)
    message = str(info.value)
    assert info.value.code == "blocked_address" and info.value.permanent, message
    assert "cloud metadata" in message and "169.254.169.254" in message, message
    assert "redirected from" in message, message
    # The loopback server (private networks are open) was asked; the target never was.
    assert len(redirector.paths) == 1 and redirector.paths[0].startswith("/to/")
    # Private networks are open: the same server's own image loads.
    assert load_image(f"{redirector.base}/ok.png", OPEN).original_width == 48


def test_cli_with_private_networks_open_refuses_every_ipv6_form_of_metadata(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, redirector: Redirector
) -> None:
    env.setenv("ENRICH_ALLOW_PRIVATE_NETWORKS", "true")
    good = items.add("alice", f"{redirector.base}/ok.png")
    refused: dict[str, str] = {}
    for what, url in metadata_urls().items():
        refused[items.add("alice", url)] = f"direct {what}"
        refused[items.add("alice", redirector.to(url))] = f"redirect to {what}"

    code, report = run_cli(["--user-id", "alice", "--max-items", "0"])

    assert code == 0, report
    assert items.row(good)["metadata"].get("caption"), report
    ledger = {
        r[0]: r[1:]
        for r in items.execute(
            "SELECT item_id, error_code, permanent, last_error FROM {ns}.enrich_failures"
        )
    }
    for item_id, what in refused.items():
        assert item_id in ledger, (what, report)
        code_, permanent, error = ledger[item_id]
        assert (code_, permanent) == ("blocked_address", True), (what, error)
        assert "cloud metadata" in error, (what, error)
        assert "caption" not in items.row(item_id)["metadata"], what
    assert standin.count("chat") == 1  # only the good row cost a call
    # Each redirect was asked once (a permanent refusal is not retried); no other path.
    hops = [p for p in redirector.paths if p.startswith("/to/")]
    assert len(hops) == len(refused) // 2 and len(set(hops)) == len(hops)
