"""End to end: ``enrich-search --serve``, the search page, in Chromium.

One page server per module (the real command, ``python -m enrich_pipeline.cli.search --serve
--port 0``) over a namespace the pipeline itself captioned: the demo's sample drawings for two
users, captioned by ``enrich-captions`` through the stand-in DashScope server in English and
Chinese. One more row of alice's has a caption but an image URL on a private address (a
listener of this test on 127.0.0.1, counting who calls): its caption was written by the
pipeline's own stages, as a run allowed to reach that network would have written it.

A person types a query, filters by color, clicks "more like this"; the private row shows a
placeholder naming the guard's refusal, and neither the browser nor the server ever asked that
address for anything. Screenshots: ``artifacts/search_page_*.png`` (look at them).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from enrich_pipeline.cli import captions
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.pipeline import stages
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline_tests.e2e.browser import UI_TIMEOUT_MS, Screenshots, chromium
from enrich_pipeline_tests.helpers import API_KEY, Items, cli_env, standin_settings
from enrich_pipeline_tests.standin import StandIn

# (user, subject, foreground) on a light background: the demo's drawings.
SAMPLES = [
    ("alice", "chair", (200, 40, 40)),
    ("alice", "chair", (40, 80, 200)),
    ("alice", "lamp", (200, 40, 40)),
    ("alice", "vase", (50, 160, 70)),
    ("alice", "sofa", (235, 215, 50)),
    ("alice", "laptop", (40, 80, 200)),
    ("bob", "vase", (200, 40, 40)),
]
PRIVATE_CAPTIONS = {
    "en": "A purple armchair photographed on an office intranet.",
    "zh": "在办公室内网上拍摄的一把紫色扶手椅。",
}
STARTUP_TIMEOUT = 120.0  # a deadline, not an expectation: a loaded 2-core machine is slow


class Trap(http.server.ThreadingHTTPServer):
    """A listener on 127.0.0.1 standing for a private service: it records every request."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        trap = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                trap.hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/secret/picture.jpg"


@dataclass
class PageServer:
    url: str
    proc: subprocess.Popen
    log: Path
    items: Items
    ids: dict[str, str]  # "alice red chair" -> id; "private" -> the private row's id
    trap: Trap
    before: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": content_type}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def _name(user: str, subject: str, rgb: tuple[int, int, int]) -> str:
    color = {(200, 40, 40): "red", (40, 80, 200): "blue", (50, 160, 70): "green"}.get(rgb, "yellow")
    return f"{user} {color} {subject}"


def _write_private_row(items: Items, standin: StandIn, item_id: str) -> None:
    """The private row's caption and caption vector, written by the pipeline's own stages
    (claimed, embedded by the stand-in's model, written back) without loading its image."""
    provider = DashScopeProvider(standin_settings(standin))
    store = Store(items.settings)
    try:
        store.setup()
        chunk = stages.claim_chunk(
            store, "alice", [item_id], worker="w1", lease_seconds=60, max_attempts=3
        )
        (work,) = chunk.items
        work.captions = dict(PRIVATE_CAPTIONS)
        work.caption = work.captions["en"]
        work.dominant_colors = ["purple", "white"]
        stages.embed_chunk(chunk, provider)
        result = stages.write_chunk(
            store,
            chunk,
            provenance=Provenance("qwen3-vl-plus", "v1", languages=("en", "zh")),
            embedding_model=provider.embedding_model,
        )
        assert result.stats.succeeded == 1
    finally:
        store.close()
        provider.close()


@pytest.fixture(scope="module")
def server(
    pg_conninfo: str, _standin_server: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PageServer]:
    folder = tmp_path_factory.mktemp("search_page")
    namespace = f"t_page_{uuid.uuid4().hex[:8]}"
    items = Items(pg_conninfo, namespace)
    trap = Trap()
    ids: dict[str, str] = {}
    env = cli_env(
        items,
        _standin_server,
        ENRICH_CAPTION_LANGUAGES="en,zh",
        ENRICH_ANSWER_FORMAT="json_object",
        # Image vectors too (the stand-in's multimodal embedding): the page ranks by both.
        ENRICH_IMAGE_EMBEDDING_MODEL="tongyi-embedding-vision-flash",
        ENRICH_IMAGE_EMBEDDING_DIMENSIONS="256",
    )
    _standin_server.clear_faults()
    proc = None
    try:
        ids["private"] = items.add("alice", trap.url)
        _write_private_row(items, _standin_server, ids["private"])
        for n, (user, subject, rgb) in enumerate(SAMPLES):
            path = folder / f"{n}_{subject}.png"
            draw_sample(subject, rgb, (245, 245, 245)).save(path)
            ids[_name(user, subject, rgb)] = items.add(user, str(path))
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                if key.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_")):
                    mp.delenv(key)
            for key, value in env.items():
                mp.setenv(key, value)
            for user in ("alice", "bob"):
                code = captions.main(["--user-id", user], out=(report := io.StringIO()))
                assert code == 0, report.getvalue()
        assert trap.hits == [], "the pipeline itself fetched the private address"

        log = folder / "page.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "enrich_pipeline.cli.search", "--serve", "--port", "0"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = _wait_for_url(proc, log)
        page = PageServer(url, proc, log, items, ids, trap, before=items.all())
        yield page
        # The page only reads: every row is as the pipeline left it.
        assert items.all() == page.before
        # Ctrl-C stops it cleanly (the runtime closed, exit 0).
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert log.read_text().rstrip().endswith("search page stopped")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        trap.shutdown()
        with psycopg.connect(pg_conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
            )


def _wait_for_url(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"search page: (http://127\.0\.0\.1:\d+)/", log.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            pytest.fail(f"enrich-search --serve exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"enrich-search --serve printed no address in {STARTUP_TIMEOUT:.0f} s")


@pytest.fixture(scope="module")
def browser(server: PageServer) -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(
    browser: Any, server: PageServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """A fresh page of the search page, with every request the browser makes recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)
    tab.requests = []
    tab.on("request", lambda r: tab.requests.append(r.url))
    tab.errors = []
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    # A thumbnail refused (422) is logged by Chromium as a failed resource: that is the
    # placeholder's case, checked by the tests; any other console error is the script's.
    tab.on(
        "console",
        lambda m: (
            tab.errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    tab.shots = Screenshots(tmp_path, prefix="search_page")
    try:
        tab.goto(server.url + "/")
        tab.wait_for_selector("body[data-ready='1']", state="attached")
        yield tab
    except BaseException:
        print("page errors:", *tab.errors, sep="\n  ")
        tab.shots(tab, f"{request.node.name}_failure")
        raise
    finally:
        context.close()
    assert tab.errors == []
    # The browser asked this server for everything it showed, and nothing else.
    # (blob: URLs are the thumbnails it fetched from here, shown from memory.)
    mine = (server.url + "/", f"blob:{server.url}/")
    assert all(url.startswith(mine) for url in tab.requests), tab.requests


def _search(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")
    page.wait_for_selector("body[data-state='done']")


def _hit_ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("#hits > li", "nodes => nodes.map(n => n.dataset.itemId)")


def _settled(page: Any) -> None:
    """Every thumbnail of the shown hits is either shown or a placeholder."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('#hits .thumb')]"
        ".every(t => t.dataset.state === 'shown' || t.dataset.state === 'failed')"
    )


def test_a_query_then_a_color_then_more_like_this(page: Any, server: PageServer) -> None:
    ids = server.ids
    _search(page, "red chair")
    _settled(page)
    found = _hit_ids(page)
    assert found[0] == ids["alice red chair"], found
    # Every user by default: bob's red vase is among the hits.
    assert ids["bob red vase"] in found
    first = page.locator("#hits > li").first
    assert first.locator(".user-id").inner_text() == "alice"
    assert first.locator(".item-id").inner_text() == ids["alice red chair"]
    # Both caption languages, the colors, tags and the signal's score and rank.
    assert first.locator(".captions dt").all_text_contents() == ["en", "zh"]
    assert re.search(r"[\u4e00-\u9fff]", first.locator(".captions dd[lang=zh]").inner_text())
    assert "red" in first.locator(".colors").inner_text()
    assert first.locator(".tags .tag").count() > 0
    scores = first.locator(".scores").inner_text()
    assert re.search(r"fused score \(RRF\) 0\.\d{4}", scores), scores
    assert re.search(r"caption #1 · 0\.\d{3} \(text-embedding-v4, 1024 dims\)", scores), scores
    assert re.search(r"image #1 · 0\.\d{3} \(tongyi-embedding-vision-flash, 256", scores), scores
    assert first.locator(".thumb img").count() == 1
    page.shots(page, "query")

    page.locator("label.color-choice", has_text=re.compile(r"^\s*red\s*$")).click()
    page.wait_for_selector("body[data-state='done']")
    page.wait_for_function(
        "ids => !ids.some(id => [...document.querySelectorAll('#hits > li')]"
        ".map(n => n.dataset.itemId).includes(id))",
        arg=[ids["alice blue chair"], ids["alice blue laptop"]],
    )
    _settled(page)
    filtered = _hit_ids(page)
    assert set(filtered) == {ids["alice red chair"], ids["alice red lamp"], ids["bob red vase"]}
    for card in page.locator("#hits > li").all():
        assert "red" in card.locator(".colors").inner_text().split()
        assert "color red" in card.locator(".filters-met").inner_text()
    page.shots(page, "color")

    page.locator(
        "#hits > li", has=page.locator(f".item-id:text-is('{ids['alice red chair']}')")
    ).locator("button.more").click()
    page.wait_for_selector("#like:not([hidden])")
    page.wait_for_function(
        "id => !document.querySelector(`#hits > li[data-item-id='${id}']`)",
        arg=ids["alice red chair"],
    )
    page.wait_for_selector("body[data-state='done']")
    _settled(page)
    liked = _hit_ids(page)
    assert ids["alice red chair"] not in liked and liked, liked
    assert page.locator("#like-id").inner_text() == ids["alice red chair"]
    # Without the color filter, the nearest is the other chair: same subject, another color.
    page.locator("label.color-choice", has_text=re.compile(r"^\s*red\s*$")).click()
    page.wait_for_function(
        "id => document.querySelector('#hits > li')?.dataset.itemId === id"
        " && document.body.dataset.state === 'done'",
        arg=ids["alice blue chair"],
    )
    _settled(page)
    liked = _hit_ids(page)
    assert ids["alice red chair"] not in liked, liked
    first = page.locator("#hits > li").first
    assert [s.get_attribute("data-signal") for s in first.locator(".signal").all()] == [
        "caption",
        "image",
    ]
    page.shots(page, "like")


def test_a_private_image_address_is_a_placeholder_the_browser_never_asks(
    page: Any, server: PageServer
) -> None:
    _search(page, "purple armchair on an office intranet")
    _settled(page)
    card = page.locator(f"#hits > li[data-item-id='{server.ids['private']}']")
    assert card.locator(".thumb").get_attribute("data-state") == "failed"
    assert card.locator(".placeholder .reason").inner_text() == "blocked_address"
    assert "127.0.0.1:" + str(server.trap.server_address[1]) not in page.content()
    assert any("/thumbnail?" in url for url in page.requests)
    page.shots(page, "private_address")
    assert server.trap.hits == []


def test_the_page_answers_only_its_own_host_and_json_searches(server: PageServer) -> None:
    status, headers, _ = server.get("/", headers={"Host": "attacker.example"})
    assert status == 400
    status, headers, body = server.get("/")
    assert status == 200 and b"enrich-search" in body
    assert "img-src 'self' blob:" in headers["content-security-policy"]
    # A form post from another site is not a search (no embedding call is spent).
    status, answer = server.post("/api/search", b"text=chair", "application/x-www-form-urlencoded")
    assert status == 415 and answer["error"] == "bad_request"
    status, answer = server.post(
        "/api/search", json.dumps({"text": " "}).encode(), "application/json"
    )
    assert status == 400 and "type what to look for" in answer["message"]
    status, answer = server.post(
        "/api/search", json.dumps({"text": "chair", "top_k": 10_000}).encode(), "application/json"
    )
    assert status == 400 and "top_k" in answer["message"]
    status, _, body = server.get("/thumbnail?user=alice&id=999999999")
    assert status == 404 and json.loads(body)["error"] == "no_such_item"
    status, _, body = server.get("/thumbnail?user=bob&id=" + server.ids["alice red chair"])
    assert status == 404 and json.loads(body)["error"] == "no_such_item"
    status, headers, body = server.get("/thumbnail?user=alice&id=" + server.ids["alice red chair"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, _, body = server.get("/thumbnail?user=alice&id=" + server.ids["private"])
    assert status == 422 and json.loads(body) == {"error": "blocked_address", "message": ""}
    assert server.trap.hits == []
    assert API_KEY not in server.log.read_text()
