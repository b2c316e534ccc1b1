"""The stand-in DashScope server: the object a test holds, its knobs, and its lifecycle.

The public API cannot be reached from the build machines, so tests (and people poking at the
pipeline by hand) talk to this server instead. It speaks the compatible-mode wire format closely
enough that the real `openai` client runs against it unchanged, and it can inject every fault the
pipeline has to survive: rate limits, 5xx, hangs, connection resets, garbage bodies, moderation
and bad-image rejections, bad keys.

    with StandIn(latency=0.1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)

It also serves the Batch API (``/v1/files``, ``/v1/batches``; see ``batch``).

Fidelity
--------
What the stand-in does because DashScope documents it, and where, is said in the module that
does it: rate limits in ``limits``, error bodies in ``errors``, request validation in
``answers``, image tokens in ``tokens``, structured output, thinking and languages in
``structured`` (what each picture shows in ``scenes``), the Batch API in ``batch``;
hostile-provider modes,
which are not DashScope behaviour, in ``faults``. Pages that are stored copies (not readable
live from here) are named by their public URL; where the docs are silent the code says so next
to the choice, which is always the stricter one.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from enrich_pipeline_tests.standin.batch import BATCH_MAX_BYTES, BATCH_MAX_LINES, BatchAPI
from enrich_pipeline_tests.standin.faults import FaultPlan
from enrich_pipeline_tests.standin.limits import Limit
from enrich_pipeline_tests.standin.multimodal import PATH as MULTIMODAL_PATH
from enrich_pipeline_tests.standin.online import ExposeTransport
from enrich_pipeline_tests.standin.tokens import IMAGE_TOKEN_RULES


class StandIn(BatchAPI):
    """OpenAI-compatible DashScope stand-in running in a background thread.

    `requests` is appended when a request completes (a hung "timeout" request appears late; a
    "trickle" one when its body starts), with `time` its arrival; a "reset" is logged with status
    0, rate-limit refusals with fault "rpm_limit", "rps_limit", "tpm_limit" or "tps_limit".

    Knobs (all attributes, changeable while serving): `rpm_limit` / `tpm_limit` per model (an int
    for every model or a ``{model: limit}`` mapping, ``"*"`` the default), `per_second` to also
    enforce RPM/60 and TPM/60 in any one-second window, `trickle_interval` for the "trickle"
    fault, `text_only_models` refused images, `max_output_tokens` overriding the per-model
    max_tokens caps, `image_token_rule` ("legacy" or "dashscope", see ``tokens``),
    `response_formats` (``{model: ["json_object", ...]}``) overriding which response_format types
    a model takes (``structured``), and `echo_key` to repeat the request's credentials in every
    error message (``faults.echoed``).
    The Batch API's knobs are described in ``batch``.
    """

    def __init__(
        self,
        *,
        api_key: str = "sk-standin",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        embedding_latency: float | None = None,
        rpm_limit: Limit = None,
        tpm_limit: Limit = None,
        per_second: bool = False,
        hang_seconds: float = 30.0,
        trickle_interval: float = 1.0,
        text_only_models: Iterable[str] = (),
        max_output_tokens: Mapping[str, int] | None = None,
        image_token_rule: str = "dashscope",
        response_formats: Mapping[str, Iterable[str]] | None = None,
        batch_delay: float = 0.0,
        echo_key: bool = False,
    ) -> None:
        if image_token_rule not in IMAGE_TOKEN_RULES:
            raise ValueError(f"image_token_rule must be one of {IMAGE_TOKEN_RULES}")
        self.api_key = api_key
        self.host = host
        self.port = port
        self.latency = latency
        # Seconds an embeddings call takes; None: the same as ``latency`` (real embedding calls
        # are much faster than vision calls, so benchmarks set both).
        self.embedding_latency = embedding_latency
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        self.per_second = per_second
        self.hang_seconds = hang_seconds
        self.trickle_interval = trickle_interval
        self.text_only_models = set(text_only_models)
        self.max_output_tokens = dict(max_output_tokens or {})
        self.image_token_rule = image_token_rule
        self.response_formats = {m: frozenset(k) for m, k in (response_formats or {}).items()}
        self.echo_key = echo_key
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._faults = FaultPlan()
        # DashScope limits each model separately: per model, the arrival times of requests and
        # the [time, tokens] charged for them, kept for the last minute.
        self._windows: dict[str, deque[float]] = {}
        self._token_windows: dict[str, deque[list[float]]] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        # The Batch API: knobs (see ``batch``), uploaded files and batches.
        self.batch_enabled = True
        self.batch_delay = batch_delay
        self.batch_force: str | None = None
        self.batch_expire_after = 0
        self.batch_max_lines = BATCH_MAX_LINES
        self.batch_max_bytes = BATCH_MAX_BYTES
        self.batch_unsupported_models: set[str] = set()
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
            Route(MULTIMODAL_PATH, self._multimodal, methods=["POST"]),
            Route("/v1/files", self._files_create, methods=["POST"]),
            Route("/v1/files/{file_id}", self._files_get, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self._files_content, methods=["GET"]),
            Route("/v1/batches", self._batches_create, methods=["POST"]),
            Route("/v1/batches", self._batches_list, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._batches_get, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._batches_cancel, methods=["POST"]),
        ]
        self.app = ExposeTransport(Starlette(routes=routes))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> StandIn:
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]  # resolves port 0 before anyone reads base_url
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(sock)), name="dashscope-standin", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("stand-in server failed to start")
            time.sleep(0.01)
        return self

    async def _serve(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        assert self._server is not None
        await self._server.serve(sockets=[sock])

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        # Wake hanging "timeout" requests first, or graceful shutdown would wait for them.
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # loop closed between the check and the call
                pass
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = self._loop = self._stopping = None

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault control -----------------------------------------------------------------------

    def inject(
        self,
        fault: str,
        *,
        times: int = 1,
        endpoint: str = "any",
        retry_after: float | None = None,
    ) -> None:
        """Serve `fault` to the next `times` requests on `endpoint`."""
        self._faults.inject(fault, times, endpoint, retry_after)

    def add_rule(
        self,
        fault: str,
        *,
        color: tuple[int, int, int] | None = None,
        tolerance: int = 30,
        text_contains: str | None = None,
        times: int | None = None,
        endpoint: str = "any",
    ) -> None:
        """Serve `fault` to chat requests with an image near `color`, or embedding requests
        with an input containing `text_contains`; `times=None` means forever; `endpoint`
        limits the rule to one endpoint ("multimodal": image vectors only)."""
        self._faults.add_rule(fault, color, tolerance, text_contains, times, endpoint)

    def clear_faults(self) -> None:
        self._faults.clear()
        with self._lock:
            self.batch_force = None
            self.batch_unsupported_models = set()
            self.batch_enabled = True

    def reset_batches(self) -> None:
        """Batch knobs back to their defaults, and the files and batches forgotten."""
        with self._lock:
            self.batch_enabled = True
            self.batch_delay = 0.0
            self.batch_force = None
            self.batch_expire_after = 0
            self.batch_max_lines = BATCH_MAX_LINES
            self.batch_max_bytes = BATCH_MAX_BYTES
            self.batch_unsupported_models = set()
            self.files.clear()
            self.batches.clear()

    def count(self, endpoint: str | None = None, status: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (endpoint is None or r["endpoint"] == endpoint)
                and (status is None or r["status"] == status)
            )

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
