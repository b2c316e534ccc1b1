"""``enrich-search --serve``: a small web page on 127.0.0.1 to look at search results.

A search box, the filters (color, tag, language, user, ranking mode), and the hits as
thumbnails with every language's caption, tags, colors, each signal's score and rank, and the
row's user and id, each with a "more like this" button. The page calls the same ``search``
as the command line (``pipeline/search.py``).

What a browser may reach is kept small, because the page runs beside the database credentials
and the API key:

- it binds 127.0.0.1 only, and answers only requests addressed to 127.0.0.1 or localhost
  (``TrustedHostMiddleware``: a DNS-rebinding page elsewhere cannot read it);
- a search is a POST of ``application/json``: a form or image tag on another site cannot
  send one without a CORS preflight, which the page never grants, so nobody else spends the
  query's embedding call;
- images are thumbnails this server makes from the row's image reference with the run's
  SSRF-guarded loader (``enrichment/images``, the run's ``ImagePolicy``); the browser never
  receives a row's image URL, and the Content-Security-Policy lets it load nothing but this
  origin and the thumbnails it fetched (``blob:``). A failed image is a placeholder naming the
  loader's error code (``blocked_address``, ``not_found``...), never the reference itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import socket
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, get_args
from urllib.parse import urlencode

import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enrich_pipeline.bootstrap import open_runtime
from enrich_pipeline.db.item_images import ItemImageRows
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.colors import COLOR_NAMES_ZH
from enrich_pipeline.enrichment.images import ImageLoadError, ImagePolicy
from enrich_pipeline.enrichment.images.thumbnail import thumbnail_jpeg
from enrich_pipeline.pipeline.image_vectors import image_model_name
from enrich_pipeline.pipeline.search import (
    MAX_FILTER_CHARS,
    MAX_FILTERS,
    MAX_QUERY_CHARS,
    Hit,
    Mode,
    SearchQuery,
    SearchResult,
    search,
)
from enrich_pipeline.providers.base import FatalProviderError, Provider, ProviderError
from enrich_pipeline.redaction import scrub_secrets
from enrich_pipeline.settings import ConfigError, Settings

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# The page asks for at most this many hits; the command line allows more, a page of
# thumbnails does not need them.
PAGE_MAX_TOP_K = 100
MAX_BODY_BYTES = 64 * 1024
THUMBNAILS_KEPT = 256  # about 15 kB each: a few MB of memory at most

STATIC = {
    "/": ("search_page.html", "text/html; charset=utf-8"),
    "/search_page.js": ("search_page.js", "text/javascript; charset=utf-8"),
    "/search_page.css": ("search_page.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass
class ThumbnailCache:
    """The last thumbnails made, by row and image reference (a changed reference is a new
    entry): scrolling back or searching again does not load every image again."""

    size: int = THUMBNAILS_KEPT
    _kept: OrderedDict[tuple[str, str, str], bytes] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: tuple[str, str, str]) -> bytes | None:
        with self._lock:
            found = self._kept.get(key)
            if found is not None:
                self._kept.move_to_end(key)
            return found

    def put(self, key: tuple[str, str, str], jpeg: bytes) -> None:
        with self._lock:
            self._kept[key] = jpeg
            self._kept.move_to_end(key)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)


@dataclass
class Page:
    """What the page's routes share: the store, the provider, the run's image policy."""

    store: Store
    provider: Provider
    image_policy: ImagePolicy
    languages: tuple[str, ...]
    max_image_side: int = 896
    thumbnails: ThumbnailCache = field(default_factory=ThumbnailCache)

    def options(self) -> dict[str, Any]:
        return {
            "languages": list(self.languages),
            "colors": list(COLOR_NAMES_ZH),
            "modes": list(get_args(Mode)),
            "caption_model": self.provider.embedding_model,
            "image_model": image_model_name(self.provider),
            "max_top_k": PAGE_MAX_TOP_K,
        }

    def search(self, query: SearchQuery) -> SearchResult:
        return search(
            self.store,
            self.provider,
            query,
            image_policy=self.image_policy,
            max_image_side=self.max_image_side,
        )

    def thumbnail(self, user_id: str, item_id: str) -> bytes:
        """The row's thumbnail; ``ImageLoadError`` says why there is none."""
        row = ItemImageRows(self.store.db).image_of(user_id, item_id)
        if row is None:
            raise ImageLoadError("no_such_item", "no such item")
        if row.image is None or not row.image.strip():
            raise ImageLoadError("no_image", "the row has no image")
        key = (user_id, item_id, hashlib.sha256(row.image.encode()).hexdigest())
        jpeg = self.thumbnails.get(key)
        if jpeg is None:
            jpeg = thumbnail_jpeg(row.image, self.image_policy)
            self.thumbnails.put(key, jpeg)
        return jpeg


# --- requests in, answers out --------------------------------------------------------------


def _strings(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: a list of strings")
    values = tuple(v.strip() for v in value if v.strip())
    if len(values) > MAX_FILTERS:
        raise ConfigError(f"{key}: at most {MAX_FILTERS} of them, got {len(values)}")
    for v in values:
        if len(v) > MAX_FILTER_CHARS:
            raise ConfigError(f"{key}: each at most {MAX_FILTER_CHARS} characters")
    return values


def parse_query(body: object) -> SearchQuery:
    """The page's JSON as a ``SearchQuery``, every field within its bounds, or ConfigError.

    The page searches by text or by an item (``like_id``); a picture by URL or path is the
    command line's (``--like-image``): a local path must never be read for a web request."""
    if not isinstance(body, dict):
        raise ConfigError("the search is a JSON object")
    text = body.get("text")
    like_id = body.get("like_id")
    if text is not None and not isinstance(text, str):
        raise ConfigError("text: a string")
    if like_id is not None and (not isinstance(like_id, str) or len(like_id) > MAX_FILTER_CHARS):
        raise ConfigError(f"like_id: an item id of at most {MAX_FILTER_CHARS} characters")
    text = text.strip() if text else None
    if text and len(text) > MAX_QUERY_CHARS:
        raise ConfigError(f"the search text is {len(text)} characters, more than {MAX_QUERY_CHARS}")
    if not text and not like_id:
        raise ConfigError('type what to look for, or pick an item\'s "more like this"')
    mode = body.get("mode") or None
    if mode is not None and mode not in get_args(Mode):
        raise ConfigError(f"mode: one of {', '.join(get_args(Mode))}")
    top_k = body.get("top_k", 20)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= PAGE_MAX_TOP_K:
        raise ConfigError(f"top_k: a whole number from 1 to {PAGE_MAX_TOP_K}")
    return SearchQuery(
        text=None if like_id else text,
        like_id=like_id or None,
        users=_strings(body, "users"),
        mode=mode,
        colors=_strings(body, "colors"),
        tags=_strings(body, "tags"),
        languages=_strings(body, "languages"),
        top_k=top_k,
    )


def thumbnail_url(hit: Hit) -> str:
    return "/thumbnail?" + urlencode({"user": hit.user_id, "id": hit.item_id})


def result_json(result: SearchResult) -> dict[str, Any]:
    return {
        "mode": result.mode,
        "notes": [scrub_secrets(note) for note in result.notes],
        "hits": [
            {**dataclasses.asdict(hit), "thumbnail": thumbnail_url(hit)} for hit in result.hits
        ],
    }


def _refused(status: int, error: str, message: str = "") -> JSONResponse:
    return JSONResponse({"error": error, "message": scrub_secrets(message)}, status_code=status)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SecurityHeaders:
    """Every answer carries ``SECURITY_HEADERS`` (a pure ASGI middleware: it only adds headers
    to the response's start message)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


def build_app(page: Page) -> Starlette:
    """The page's routes, behind the host check and the security headers."""

    def static(request: Request) -> Response:
        name, media_type = STATIC[request.url.path]
        body = resources.files("enrich_pipeline.cli").joinpath("static", name).read_bytes()
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    def options(_request: Request) -> JSONResponse:
        return JSONResponse(page.options())

    async def run_search(request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _refused(415, "bad_request", "a search is sent as application/json")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _refused(413, "bad_request", f"a search is at most {MAX_BODY_BYTES} bytes")
        try:
            query = parse_query(json.loads(body or b"null"))
            result = await run_in_threadpool(page.search, query)
        except (ValueError, ConfigError) as exc:  # json's errors are ValueErrors
            return _refused(400, "bad_request", _first_line(exc))
        except FatalProviderError as exc:
            return _refused(503, "provider_stopped", _first_line(exc))
        except ProviderError as exc:
            return _refused(502, "provider_error", _first_line(exc))
        except (psycopg.Error, PoolTimeout) as exc:
            return _refused(503, "database_error", _first_line(exc))
        return JSONResponse(result_json(result))

    def thumbnail(request: Request) -> Response:
        user, item = request.query_params.get("user", ""), request.query_params.get("id", "")
        if not user or not item or len(user) > 200 or len(item) > 200:
            return _refused(400, "bad_request")
        try:
            jpeg = page.thumbnail(user, item)
        except ImageLoadError as exc:
            # The code only: the message names the source, and the source is the row's.
            return _refused(404 if exc.code in ("no_such_item", "no_image") else 422, exc.code)
        except (psycopg.Error, PoolTimeout):
            return _refused(503, "database_error")
        except Exception:  # noqa: BLE001 - a decoder bug costs one picture, not the page
            return _refused(500, "image_error")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private"})

    return Starlette(
        routes=[
            *(Route(path, static) for path in STATIC),
            Route("/api/options", options),
            Route("/api/search", run_search, methods=["POST"]),
            Route("/thumbnail", thumbnail),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"]),
        ],
    )


# --- the command ------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serve",
        action="store_true",
        help=f"start the search page on http://{HOST}:PORT/ and keep serving until stopped",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the page's port, {DEFAULT_PORT} unless given (0: any free one)",
    )


def listening_socket(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1 (never another address), so the port is known before the
    server starts, even when asked for any free one."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: from 0 to 65535, got {port}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {HOST}: {exc.strerror}") from None
    return sock


def serve(args: argparse.Namespace) -> int:
    """Open the runtime once, serve the page until a stop signal, close the runtime."""
    import uvicorn  # only the page needs the web server

    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        if args.offline:
            settings = settings.with_(dashscope=settings.dashscope.with_(offline=True))
        sock = listening_socket(args.port)
        runtime = open_runtime(settings, seed=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (psycopg.Error, PoolTimeout) as exc:
        where = settings.db.redacted() if settings is not None else "the database"
        print(
            f"error: cannot use the database {where}: {scrub_secrets(_first_line(exc))}",
            file=sys.stderr,
        )
        return 2
    page = Page(
        runtime.store,
        runtime.provider,
        runtime.image_policy,
        runtime.settings.dashscope.languages,
        max_image_side=runtime.settings.dashscope.max_image_side,
    )
    config = uvicorn.Config(
        build_app(page),
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Nobody proxies a page on 127.0.0.1: no client address is taken from a header.
        proxy_headers=False,
        server_header=False,
    )
    port = sock.getsockname()[1]
    print(f"search page: http://{HOST}:{port}/ (stop with Ctrl-C)", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn stopped serving on the signal; it re-raises it once done
    finally:
        runtime.close()
        sock.close()
    print("search page stopped", flush=True)
    return 0
