"""Hostile and broken input through the real pipeline (command line or Engine + store).

Every bad row must end as a clear per-row error, in the report and in the failure ledger
(code, message, permanent or transient), without crashing the run, without touching the row,
without paying a model call for it, while the other rows of the same run are captioned.

`test_images.py` unit-tests ``load_image``; here the same faults go through claim -> load ->
caption -> write, against the real PostgreSQL, the stand-in DashScope server and a loopback
HTTP server of our own that misbehaves on purpose.
"""

from __future__ import annotations

import functools
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from enrich_pipeline.db.pending_index import INDEX_SUFFIX
from enrich_pipeline.db.samples import create_sample_table, insert_sample_items
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings, DbSettings, RunSettings
from enrich_pipeline_tests.helpers import Items, data_url, png, run_cli, truncated_jpeg
from enrich_pipeline_tests.standin import StandIn

PATCH_KEYS = [
    "caption",
    "dominant_colors",
    "style_tags",
    "object_tags",
    "caption_generated_at",
    "caption_model",
    "caption_prompt_version",
    # What a caption records of what made it (see records.metadata_patch).
    "caption_i18n",
    "tags_source",
    "answer_format",
    "caption_image_digest",
    "caption_text_digest",
    "caption_content_sha256",
]
HUGE_TOTAL = 100 * 1024 * 1024
IMAGE_TIMEOUT = 1.5  # ENRICH_IMAGE_TIMEOUT for the runs that meet the stalling server

# ---------------------------------------------------------------------------------------------
# Small images


@functools.cache
def deflate_bomb() -> bytes:
    """A real 62 kB PNG that inflates to 8000x8000 gray pixels (64 MP, over the 50 MP limit).

    Under Pillow's own bomb threshold (89 MP), so only the pipeline's pixel limit stops it.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    side = 8000
    row = b"\x00" * (side + 1)  # filter byte + one gray byte per pixel
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 500) for _ in range(side // 500)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# A loopback HTTP server that misbehaves on purpose


# How long the stalling image server holds a request (the test's end releases it at once): long,
# so that a fetch ended by its timeout is told from one that waited, however busy the machine.
STALL = 60.0


@dataclass
class Hostile:
    port: int = 0
    paths: list[str] = field(default_factory=list)
    huge_sent: int = 0
    huge_done: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def ok(self, color: tuple[int, int, int], host: str = "127.0.0.1") -> str:
        return self.url("/ok/{}-{}-{}.png".format(*color), host)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is what the tests provoke


def _handler(state: Hostile) -> type[BaseHTTPRequestHandler]:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    html = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    truncated = truncated_jpeg()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def body(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: C901, N802 - one switch keeps the routes readable
            path = self.path.split("?", 1)[0]
            state.paths.append(path)
            routes = {
                "/missing.png": lambda: self.body(404, b"not found", "text/plain"),
                "/unavailable.png": lambda: self.body(503, b"try later", "text/plain"),
                "/page.html": lambda: self.body(200, html, "text/html; charset=utf-8"),
                "/lying-html.jpg": lambda: self.body(200, html, "image/jpeg"),
                "/truncated.jpg": lambda: self.body(200, truncated, "image/jpeg"),
                "/bomb.png": lambda: self.body(200, deflate_bomb(), "image/png"),
                "/logo.svg": lambda: self.body(200, svg, "image/svg+xml"),
                "/lying-svg.png": lambda: self.body(
                    200, b'<?xml version="1.0"?>\n' + svg, "image/png"
                ),
                "/loop.png": lambda: self.redirect("/loop.png"),
                "/ping.png": lambda: self.redirect("/pong.png"),
                "/pong.png": lambda: self.redirect(f"http://localhost:{state.port}/ping.png"),
                "/to-metadata": lambda: self.redirect("http://169.254.169.254/latest/meta-data/"),
                "/to-alibaba-metadata": lambda: self.redirect(
                    "http://100.100.100.200/latest/meta-data/ram/security-credentials/"
                ),
                "/to-private": lambda: self.redirect("http://10.0.0.1/admin/photo.png"),
                "/to-mapped": lambda: self.redirect("http://[::ffff:169.254.169.254]/latest/"),
                "/to-localhost": lambda: self.redirect(
                    f"http://localhost:{state.port}/ok/200-120-40.png"
                ),
            }
            if path in routes:
                routes[path]()
            elif path.startswith("/ok/"):
                rgb = tuple(int(v) for v in path[4:].removesuffix(".png").split("-"))
                self.body(200, png(rgb), "image/png")  # type: ignore[arg-type]
            elif path == "/stall.png":
                state.release.wait(STALL)  # never answers within the image timeout
            elif path == "/huge.jpg":
                self.stream_huge()
            else:
                self.body(500, b"no route", "text/plain")

        def stream_huge(self) -> None:
            # 100 MB without Content-Length: only the client's byte cap can stop it.
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            block = b"\xff\xd8" + b"\x00" * (64 * 1024 - 2)
            try:
                while state.huge_sent < HUGE_TOTAL:
                    self.wfile.write(block)
                    state.huge_sent += len(block)
            except OSError:
                pass
            finally:
                state.huge_done.set()
                self.close_connection = True

    return Handler


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    deflate_bomb()  # built once, before any timed run
    state = Hostile()
    httpd = _QuietServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------------------------
# Helpers


_ITEM = re.compile(r"^\[\d+\] item (\S+) \(user (.*)\): (OK|FAILED|SKIPPED)$")


def report_items(report: str) -> dict[str, tuple[str, str]]:
    """item id -> (OK/FAILED/SKIPPED, reason) from the legacy per-item report."""
    found: dict[str, tuple[str, str]] = {}
    current: str | None = None
    for line in report.splitlines():
        match = _ITEM.match(line)
        if match:
            current = match.group(1)
            found[current] = (match.group(3), "")
        elif current and line.startswith("    Reason:  "):
            found[current] = (found[current][0], line.removeprefix("    Reason:  "))
    return found


def stat(report: str, name: str) -> str:
    match = re.search(rf"^  {name}:\s+(\S+)", report, re.M)
    assert match, f"{name} not in report:\n{report}"
    return match.group(1)


@dataclass(frozen=True)
class Entry:
    user_id: str
    code: str
    permanent: bool
    attempts: int
    message: str


def ledger(items: Items) -> dict[str, Entry]:
    rows = items.execute(
        "SELECT item_id, user_id, error_code, permanent, attempts, last_error"
        " FROM {ns}.enrich_failures"
    )
    return {r[0]: Entry(*r[1:]) for r in rows}


def snapshot(items: Items, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {i: items.row(i) for i in ids}


def metadata_text(items: Items, item_id: str) -> str:
    (row,) = items.execute("SELECT metadata::text FROM {items} WHERE id::text = %s", (item_id,))
    return row[0]


@dataclass(frozen=True)
class Bad:
    """A hostile row and what the user must be told about it."""

    image: str
    code: str
    permanent: bool
    says: tuple[str, ...]


def check_bad_rows(
    items: Items,
    report: str,
    bad: dict[str, Bad],
    before: dict[str, dict[str, Any]],
    user: str = "alice",
) -> None:
    shown = report_items(report)
    book = ledger(items)
    problems = []
    for item_id, want in bad.items():
        mark, reason = shown.get(item_id, ("missing", ""))
        entry = book.get(item_id)
        got = (mark, entry and (entry.code, entry.permanent, entry.attempts, entry.user_id))
        expected = ("FAILED", (want.code, want.permanent, 1, user))
        if got != expected or reason != entry.message:  # type: ignore[union-attr]
            problems.append(f"{want.image[:70]}: got {got} {reason!r}, want {expected}")
            continue
        missing = [s for s in want.says if s.lower() not in reason.lower()]
        if missing:
            problems.append(f"{want.image[:70]}: message {reason!r} does not say {missing}")
        if items.row(item_id) != before[item_id]:
            problems.append(f"{want.image[:70]}: row changed")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# The SSRF guard through the command line


BLUE, RED, GREEN, YELLOW, CYAN, ORANGE = (
    (40, 80, 200),
    (200, 40, 40),
    (50, 160, 70),
    (235, 215, 50),
    (0, 200, 220),
    (230, 130, 30),
)


def test_internal_addresses_are_refused_by_default_with_blocked_address(
    env: pytest.MonkeyPatch, items: Items, hostile: Hostile, standin: StandIn
) -> None:
    # Production defaults: no private networks, no local files.
    env.delenv("ENRICH_ALLOW_LOCAL_FILES")
    port = hostile.port
    secret = f"sig-{uuid.uuid4().hex}"
    blocked = {
        hostile.ok(YELLOW): "loopback",
        hostile.ok(CYAN, host="localhost"): "localhost resolves to 127.0.0.1 (loopback)",
        f"http://[::1]:{port}/ok/1-2-3.png": "loopback",
        f"http://[::ffff:127.0.0.1]:{port}/ok/1-2-3.png": "loopback",
        f"http://2130706433:{port}/ok/1-2-3.png": "loopback",
        f"http://0x7f.0.0.1:{port}/ok/1-2-3.png": "loopback",
        f"http://0.0.0.0:{port}/ok/1-2-3.png": "unspecified",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/": "link-local",
        "http://100.100.100.200/latest/meta-data/": "non-public",  # Alibaba Cloud metadata
        "http://10.0.0.1/photo.png": "private",
        "http://172.16.5.4/photo.png": "private",
        "http://192.168.1.1/photo.png": "private",
        f"http://user:{secret}@127.0.0.1:{port}/ok/1-2-3.png?X-Amz-Signature={secret}": "loopback",
    }
    bad = {
        items.add("alice", url, metadata={"src": "web"}): Bad(
            url,
            "blocked_address",
            True,
            (
                "blocked address",
                why,
            ),
        )
        for url, why in blocked.items()
    }
    for path in ("/etc/passwd", "file:///etc/passwd"):
        bad[items.add("alice", path)] = Bad(path, "bad_source", True, ("local files",))
    good = [
        items.add("alice", data_url(png(c)), metadata={"n": i}) for i, c in enumerate((BLUE, RED))
    ]
    before = snapshot(items, list(bad))
    served_before = len(hostile.paths)

    code, report = run_cli(["--user-id", "alice", "--concurrent", "4"])

    assert code == 0, report
    assert (stat(report, "Total"), stat(report, "Succeeded"), stat(report, "Failed")) == (
        str(len(bad) + 2),
        "2",
        str(len(bad)),
    )
    check_bad_rows(items, report, bad, before)
    # Refused before connecting: not one request reached the server.
    assert len(hostile.paths) == served_before
    assert secret not in report and all(secret not in e.message for e in ledger(items).values())
    for i in good:
        assert items.row(i)["metadata"]["caption"]
    assert standin.count("chat") == 2  # only the good rows cost a call
    # Permanent: nothing of it is pending any more.
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures WHERE NOT permanent") == [(0,)]


def test_loopback_is_fetched_only_when_private_networks_are_allowed(
    env: pytest.MonkeyPatch, items: Items, hostile: Hostile, standin: StandIn
) -> None:
    urls = [
        hostile.ok(YELLOW),
        hostile.ok(CYAN, host="localhost"),
        hostile.ok(ORANGE, "2130706433"),
    ]
    ids = [items.add("alice", u) for u in urls]
    env.setenv("ENRICH_ALLOW_PRIVATE_NETWORKS", "true")

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert stat(report, "Succeeded") == "3", report
    for i in ids:
        assert items.row(i)["metadata"]["caption"]
    assert ledger(items) == {}


# ---------------------------------------------------------------------------------------------
# Hostile servers and hostile bytes through the command line


def test_hostile_servers_and_bytes_fail_per_row_and_the_run_goes_on(
    env: pytest.MonkeyPatch, items: Items, hostile: Hostile, standin: StandIn
) -> None:
    env.setenv("ENRICH_ALLOW_PRIVATE_NETWORKS", "true")
    env.setenv("ENRICH_IMAGE_TIMEOUT", str(IMAGE_TIMEOUT))
    url = hostile.url
    cases = [
        Bad(url("/missing.png"), "not_found", True, ("HTTP 404",)),
        Bad(url("/unavailable.png"), "http_error", False, ("HTTP 503",)),
        Bad(url("/stall.png"), "timeout", False, ("timed out",)),
        Bad(url("/loop.png"), "too_many_redirects", True, ("redirect loop",)),
        Bad(url("/ping.png"), "too_many_redirects", True, ("redirect loop",)),
        Bad(url("/page.html"), "not_an_image", True, ("text/html",)),
        Bad(url("/lying-html.jpg"), "not_an_image", True, ("HTML",)),
        Bad(url("/truncated.jpg"), "truncated", True, ("truncated",)),
        Bad(url("/huge.jpg"), "too_large", True, ("too large",)),
        Bad(url("/bomb.png"), "too_many_pixels", True, ("too many pixels", "8000x8000")),
        Bad(url("/logo.svg"), "unsupported_format", True, ("SVG",)),
        Bad(url("/lying-svg.png"), "unsupported_format", True, ("SVG",)),
        Bad(data_url(deflate_bomb()), "too_many_pixels", True, ("too many pixels",)),
        Bad(data_url(b"<svg/>", "image/svg+xml"), "unsupported_format", True, ("SVG",)),
        Bad("   ", "bad_source", True, ("empty",)),
        Bad("ftp://example.com/a.png", "bad_source", True, ("scheme",)),
    ]
    bad = {items.add("alice", c.image, metadata={"keep": c.code}): c for c in cases}
    good = {
        items.add("alice", data_url(png(GREEN)), metadata={"n": 1}): "data: URL",
        items.add("alice", hostile.ok(BLUE), metadata={"n": 2}): "loopback",
        items.add("alice", url("/to-localhost"), metadata={"n": 3}): "redirect",
    }
    bystander = items.add("bob", url("/missing.png"))
    before = snapshot(items, [*bad, bystander])

    started = time.monotonic()
    code, report = run_cli(["--user-id", "alice", "--batch-size", "8"])
    elapsed = time.monotonic() - started

    assert code == 0, report
    assert stat(report, "Total") == str(len(cases) + len(good))
    assert stat(report, "Succeeded") == str(len(good)), report
    assert stat(report, "Failed") == str(len(cases))
    check_bad_rows(items, report, bad, before)
    for item_id, what in good.items():
        md = items.row(item_id)["metadata"]
        assert md["caption"] and md["n"], what
    assert standin.count("chat") == len(good)  # no call for any row whose image failed
    assert items.row(bystander) == before[bystander]
    # The stalled fetch cost about one image timeout, not the server's stall.
    assert elapsed < STALL / 2, elapsed
    # The 100 MB body was cut off near the 20 MiB cap, and the server saw the hang-up.
    assert hostile.huge_done.wait(15), "the server kept streaming after the client gave up"
    assert hostile.huge_sent < 40 * 1024 * 1024, hostile.huge_sent
    # Transient failures stay pending for later runs; permanent ones are out.
    transient = {i for i, c in bad.items() if not c.permanent}
    pending = items.execute(
        "SELECT id::text FROM {items} WHERE user_id = 'alice'"
        " AND coalesce(metadata->>'caption', '') = ''"
    )
    assert {r[0] for r in pending} == set(bad)
    store = Store(items.settings)
    try:
        store.setup()
        assert set(store.items.pending_ids("alice", limit=None, max_attempts=3)) == transient
    finally:
        store.close()


def test_redirects_into_internal_networks_are_refused_when_only_loopback_is_exempt(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    hostile: Hostile,
    standin: StandIn,
) -> None:
    """``ImagePolicy.allowed_networks`` opens one network; a redirect out of it is refused."""
    policy = ImagePolicy(allowed_networks=frozenset({"127.0.0.0/8"}), timeout=5.0)
    cases = {
        "/to-metadata": ("169.254.169.254", "link-local"),
        "/to-alibaba-metadata": ("100.100.100.200", "non-public"),
        "/to-private": ("10.0.0.1", "private"),
        "/to-mapped": ("169.254.169.254", "link-local"),
    }
    bad = {
        items.add("alice", hostile.url(path)): Bad(
            hostile.url(path),
            "blocked_address",
            True,
            ("blocked address", ip, why, "redirected from"),
        )
        for path, (ip, why) in cases.items()
    }
    direct = "http://169.254.169.254/latest/meta-data/"
    bad[items.add("alice", direct)] = Bad(direct, "blocked_address", True, ("link-local",))
    good = [items.add("alice", hostile.ok(GREEN)), items.add("alice", hostile.url("/to-localhost"))]
    before = snapshot(items, list(bad))
    outcomes: dict[str, Any] = {}
    engine = Engine(
        store, DashScopeProvider(api_settings), api_settings, RunSettings(), image_policy=policy
    )

    stats = engine.enrich("alice", on_outcome=lambda _u, o: outcomes.setdefault(o.item_id, o))

    assert (stats.total, stats.succeeded, stats.failed) == (len(bad) + 2, 2, len(bad))
    report = "\n".join(
        f"[{n}] item {i} (user 'alice'): "
        + {"succeeded": "OK", "failed": "FAILED", "skipped": "SKIPPED"}[o.status]
        + (f"\n    Reason:  {o.error}" if o.error else "")
        for n, (i, o) in enumerate(outcomes.items(), 1)
    )
    check_bad_rows(items, report, bad, before)
    assert all(items.row(i)["metadata"]["caption"] for i in good)
    assert standin.count("chat") == 2


def test_cli_can_exempt_one_network_without_opening_all_private_ones(
    env: pytest.MonkeyPatch, items: Items, hostile: Hostile, standin: StandIn
) -> None:
    """An internal image CDN must not require opening 169.254.169.254 and 10/8 as well."""
    env.setenv("ENRICH_ALLOWED_NETWORKS", "127.0.0.0/8, 192.0.2.0/24")
    cdn = items.add("alice", hostile.ok(GREEN))
    via_name = items.add("alice", hostile.url("/to-localhost"))
    bad = {
        items.add("alice", hostile.url(path)): Bad(
            hostile.url(path), "blocked_address", True, ("blocked address", why)
        )
        for path, why in (("/to-metadata", "link-local"), ("/to-private", "private"))
    }
    direct = "http://10.1.2.3/photo.png"
    bad[items.add("alice", direct)] = Bad(direct, "blocked_address", True, ("private",))
    before = snapshot(items, list(bad))

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert items.row(cdn)["metadata"].get("caption"), report
    assert items.row(via_name)["metadata"].get("caption"), report
    check_bad_rows(items, report, bad, before)
    assert standin.count("chat") == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENRICH_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("ENRICH_ALLOWED_NETWORKS", "intranet"),
        ("ENRICH_IMAGE_TIMEOUT", "0"),
        ("ENRICH_IMAGE_MAX_BYTES", "-1"),
    ],
)
def test_broken_image_policy_settings_name_the_variable(
    env: pytest.MonkeyPatch,
    items: Items,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    item = items.add("alice", data_url(png(BLUE)))
    env.setenv(variable, value)
    code, report = run_cli(["--user-id", "alice"])
    err = capsys.readouterr().err
    assert code == 2, report
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert variable in err, err
    assert items.row(item)["metadata"] == {}


# ---------------------------------------------------------------------------------------------
# Hostile identifiers and values: user ids, metadata keys, namespace and table names

ODD_USERS = [
    "o'brien\"; DROP TABLE items;--",
    "ユーザー",
    "%s",
    "{}",
    "%(user)s",
    "Robert'); DROP TABLE {items};--",
    "' OR '1'='1",
    "back\\slash",
    "%",
    "_",
    "🙂 user ",
]
SIBLINGS = ["o'brien", "ユーザ", "Robert", "", "x"]  # near misses that must never be touched

ODD_METADATA: dict[str, Any] = {
    "o'brien\"; DROP TABLE items;--": "value'\"; DELETE FROM items;--",
    "ユーザー": "説明 ✓",
    "%s": "%s %(user)s {} {items} $1 ?",
    "{}": {"nested": ["a", 1, None, True, {"'": '"'}]},
    "café": "composed",
    "cafe\u0301": "decomposed, a different key",
    "line\nbreak\ttab\u2028": "control-ish",
    "emoji 🪑\u200d": "zero width joiner",
    "\\": "backslash",
    "Caption": "not the caption key",
    " caption": "leading space, not the caption key",
    "big": 2**70,
    "tenth": 0.1,
    "": "empty key",
}


def test_odd_user_ids_and_metadata_are_written_to_exactly_their_own_rows(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, tmp_path: Path
) -> None:
    odd_file = tmp_path / 'o\'brien "x"; DROP TABLE items;-- ユーザー %s {}.jpg'
    odd_file.write_bytes((image_dir / "blue.jpg").read_bytes())
    mine = {u: items.add(u, str(odd_file), metadata=ODD_METADATA) for u in ODD_USERS}
    failing = items.add(ODD_USERS[0], data_url(b"\x89PNG broken"), metadata=ODD_METADATA)
    siblings = {u: items.add(u, str(odd_file), metadata=ODD_METADATA) for u in SIBLINGS}
    text_before = {i: metadata_text(items, i) for i in [*mine.values(), failing]}
    before = snapshot(items, [*siblings.values(), failing])

    # One odd user at a time: only that user's rows move.
    for user in ODD_USERS[:3]:
        code, report = run_cli(["--user-id", user, "--no-caption-embedding"])
        assert code == 0, report
        assert f"(user {user!r})" in report
    assert items.row(mine[ODD_USERS[3]])["metadata"] == ODD_METADATA
    assert snapshot(items, list(siblings.values())) == {i: before[i] for i in siblings.values()}
    # Then everybody else with pending rows (the siblings too, which are pending as well).
    code, report = run_cli(["--max-items", "0"])
    assert code == 0, report

    for user, item_id in mine.items():
        row = items.row(item_id)
        assert row["user_id"] == user and row["image"] == str(odd_file)
        assert row["metadata"]["caption"], user
        # Every key the row had, byte for byte, and only the pipeline's keys added.
        # (jsonb_each and json_object_agg: the SQL every target server has, unlike jsonb -)
        (kept,) = items.execute(
            "SELECT (SELECT json_object_agg(key, value) FROM jsonb_each(metadata)"
            " WHERE NOT key = ANY(%s::text[]))::jsonb::text FROM {items} WHERE id::text = %s",
            (list(PATCH_KEYS), item_id),
        )
        assert kept[0] == text_before[item_id], user
        assert set(row["metadata"]) == set(ODD_METADATA) | set(PATCH_KEYS)
    # The failing row of the odd user: recorded under exactly that user, row untouched.
    entry = ledger(items)[failing]
    assert (entry.user_id, entry.code, entry.permanent) == (ODD_USERS[0], "not_an_image", True)
    assert items.row(failing) == before[failing]
    assert metadata_text(items, failing) == text_before[failing]
    # Siblings were captioned by their own (later) run, with their own user id untouched.
    for user, item_id in siblings.items():
        assert items.row(item_id)["user_id"] == user
    # Nothing executed from data: the items table and the pipeline's tables are all there.
    tables = {
        r[0]
        for r in items.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (items.namespace,),
        )
    }
    assert {"items", "enrich_failures", "enrich_claims", "enrich_embeddings"} <= tables
    assert items.execute("SELECT count(*) FROM {items}") == [(len(ODD_USERS) + len(SIBLINGS) + 1,)]


@pytest.fixture
def odd_table(pg_conninfo: str) -> Iterator[Items]:
    namespace = f'we"ird ns {uuid.uuid4().hex[:6]}'
    table = "it'ems; drop"
    with psycopg.connect(pg_conninfo) as conn:
        create_sample_table(conn, namespace, table)
    yield Items(pg_conninfo, namespace, table)
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace)))


def _all_tables(conninfo: str) -> set[tuple[str, str]]:
    with psycopg.connect(conninfo) as conn:
        return {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
        }


def test_namespace_and_table_with_odd_characters(
    odd_table: Items,
    api_settings: DashScopeSettings,
    standin: StandIn,
    env: pytest.MonkeyPatch,
) -> None:
    ns, table = odd_table.namespace, odd_table.table
    with psycopg.connect(odd_table.conninfo) as conn:
        ids = insert_sample_items(
            conn,
            ns,
            table,
            [
                ("alice", data_url(png(BLUE)), "active", {"k": "v"}),
                ("alice", data_url(png(RED)), "active", None),
                ("alice", "http://169.254.169.254/latest/", "active", {"k": "bad"}),
                ("bob", data_url(png(GREEN)), "active", {}),
            ],
        )
    others_before = _all_tables(odd_table.conninfo) - {(ns, table)}

    settings = DbSettings(conninfo=odd_table.conninfo, namespace=ns, table=table)
    with Store(settings) as store:
        store.setup()
        engine = Engine(
            store,
            DashScopeProvider(api_settings),
            api_settings,
            RunSettings(),
            image_policy=ImagePolicy(),
        )
        stats = engine.enrich("alice")
    assert (stats.total, stats.succeeded, stats.failed) == (3, 2, 1)
    assert odd_table.row(ids[0])["metadata"]["k"] == "v"
    assert odd_table.row(ids[1])["metadata"]["caption"]
    assert odd_table.row(ids[2])["metadata"] == {"k": "bad"}
    assert odd_table.row(ids[3])["metadata"] == {}
    ((source, code),) = odd_table.execute(
        "SELECT source_table, error_code FROM {ns}.enrich_failures"
    )
    assert (source, code) == (f"{ns}.{table}", "blocked_address")

    # The command line takes the same names from its flags.
    env.setenv("ADBPG_URL", odd_table.conninfo)
    code, report = run_cli(["--namespace", ns, "--table", table])
    assert code == 0, report
    assert f"({ns}.{table})" in report and stat(report, "Succeeded") == "1"
    assert odd_table.row(ids[3])["metadata"]["caption"]

    # Nothing executed from the names: the items table and the pipeline's tables are there,
    # and nothing appeared or vanished anywhere else (the namespace's own tables aside).
    mine = {name for schema, name in _all_tables(odd_table.conninfo) if schema == ns}
    assert {
        table,
        "enrich_failures",
        "enrich_claims",
        "enrich_embeddings",
        "enrich_answer_cache",
        "enrich_schema_migrations",
    } <= mine
    assert _all_tables(odd_table.conninfo) - {(ns, n) for n in mine} == others_before - {
        (ns, n) for n in mine
    }
    assert odd_table.execute(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
        (ns, f"{table}{INDEX_SUFFIX}"),
    ) == [(1,)]


# ---------------------------------------------------------------------------------------------
# Metadata that is not a JSON object


def test_metadata_that_is_not_an_object(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn
) -> None:
    not_objects = {
        "array": ["a", "list"],
        "string": "just a string",
        "number": 42,
        "boolean": True,
    }
    bad = {
        items.add("alice", data_url(png((10 * n, 20, 30))), metadata=value): kind
        for n, (kind, value) in enumerate(not_objects.items())
    }
    text_before = {i: metadata_text(items, i) for i in bad}
    before = snapshot(items, list(bad))
    fine = {
        items.add("alice", data_url(png(BLUE)), metadata=None): None,
        items.add("alice", data_url(png(RED)), metadata={"caption": None, "x": 1}): "x",
        items.add("alice", data_url(png(GREEN)), metadata={"caption": "", "y": 2}): "y",
    }

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert (stat(report, "Succeeded"), stat(report, "Failed")) == ("3", "4"), report
    shown = report_items(report)
    book = ledger(items)
    for item_id, kind in bad.items():
        entry = book[item_id]
        assert (entry.code, entry.permanent) == ("metadata_not_object", True), kind
        assert shown[item_id] == ("FAILED", entry.message)
        assert "not an object" in entry.message and "unchanged" in entry.message
        assert items.row(item_id) == before[item_id]
        assert metadata_text(items, item_id) == text_before[item_id]
    for item_id, key in fine.items():
        md = items.row(item_id)["metadata"]
        assert isinstance(md, dict) and md["caption"]
        assert key is None or key in md
    assert standin.count("chat") == len(fine)  # nothing paid for a row that cannot be written


def test_json_null_metadata_is_captioned_like_sql_null(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn
) -> None:
    ((item_id,),) = items.execute(
        "INSERT INTO {items} (user_id, image, metadata) VALUES (%s, %s, 'null'::jsonb)"
        " RETURNING id::text",
        ("alice", data_url(png(CYAN))),
    )
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert report_items(report)[item_id] == ("OK", ""), report
    md = items.row(item_id)["metadata"]
    assert isinstance(md, dict) and md.get("caption"), (md, report)
    assert ledger(items) == {}
    assert items.execute("SELECT jsonb_typeof(metadata) FROM {items}") == [("object",)]
