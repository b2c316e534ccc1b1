"""A stand-in for DashScope's OpenAI-compatible endpoint, served on loopback.

The public API cannot be reached from the build machines, so tests (and people poking at the
pipeline by hand) talk to this server instead. It speaks the compatible-mode wire format closely
enough that the real `openai` client runs against it unchanged, and it can inject every fault the
pipeline has to survive: rate limits, 5xx, hangs, connection resets, garbage bodies, moderation
and bad-image rejections, bad keys.

    with StandIn(latency=0.1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)

It also serves the Batch API (``/v1/files``, ``/v1/batches``): a batch "runs" in the background,
each JSONL line going through the same chat/embeddings logic (captions, rules, faults aimed at
``endpoint="batch"``), failed lines landing in the error file with DashScope's error body. The
pace and the end are controllable: ``batch_delay`` seconds before a batch ends, ``batch_force``
(``"expired"`` after ``batch_expire_after`` lines, or ``"failed"``) for batches created next,
``batch_max_lines`` (50,000) checked on create, ``batch_unsupported_models`` refused with 400,
and ``batch_enabled = False`` for a server without the API (404).

Fidelity
--------
What the stand-in does because DashScope documents it, and where. Pages that are stored copies
(not readable live from here) are named by their public URL; where the docs are silent the code
says so next to the choice, which is always the stricter one.

Rate limits (https://www.alibabacloud.com/help/en/model-studio/rate-limit,
https://docs.qwencloud.com/developer-guides/administration/rate-limits):

- Limits are per account and per model: one budget shared by every key and workspace, so one
  server is one account, and each model has its own windows. ``rpm_limit``/``tpm_limit`` take one
  number for every model or a ``{model: limit}`` mapping (``"*"`` for the rest).
- ``per_second=True`` also enforces "RPS = RPM / 60, TPS = TPM / 60" in any one-second window:
  "Burst requests within a single second can trigger throttling even if total usage stays below
  the per-minute limit."
- TPM counts input plus output tokens ("每分钟消耗Token数(TPM) 含输入与输出Token",
  https://help.aliyun.com/document_detail/2712574.html).
- Refusals: 429 ``limit_requests`` "Requests rate limit exceeded, please try again later." for
  requests (native ``Throttling.RateQuota``), 429 ``insufficient_quota`` "Allocated quota
  exceeded, please increase your quota limit." for tokens (native ``Throttling.AllocationQuota``;
  https://help.aliyun.com/en/model-studio/error-code-start lists "Throttling.RateQuota,
  Throttling.AllocationQuota/insufficient_quota"). Logged with fault ``rpm_limit``,
  ``rps_limit``, ``tpm_limit`` or ``tps_limit``. No ``Retry-After``: none is documented.
- Batch lines are not rate-limited: "批量请求不受实时限流约束"
  (https://help.aliyun.com/document_detail/2399482.html).

Error bodies, compatible mode: ``{"error": {"message", "type", "param": null, "code"},
"request_id"}`` with the request id also in ``x-request-id``. Codes and messages from
https://help.aliyun.com/en/model-studio/error-code and its Qwen Cloud twin
https://docs.qwencloud.com/api-reference/preparation/error-messages (see ``_ERRORS``):
``arrearage`` 400 ``Arrearage``, ``model_access_denied`` 403 ``Model.AccessDenied``,
``unauthorized`` 401 ``invalid_api_key``, ``model_not_found`` 404, ``bad_request`` /
``no_image_support`` / ``image_download_failed`` / ``bad_image`` 400 ``invalid_parameter_error``
(native ``InternalError.Algo.InvalidParameter``), ``moderation`` / ``output_moderation`` 400
``data_inspection_failed`` (native ``DataInspectionFailed``), ``tpm_throttle`` 429.

Request validation done by the server itself (same error pages):

- ``max_tokens`` (or ``max_completion_tokens``) outside ``[1, model's max output]``: 400 "Range of
  max_tokens should be [1, N]".
- An image sent to a model in ``text_only_models``: 400 "The provided messages input is invalid.
  The error info is [Unexpected item type in content]" (the page's "Common scenario" for
  text-only models).

Image tokens (https://help.aliyun.com/zh/model-studio/vision): with ``image_token_rule=
"dashscope"`` (the default), ``usage.prompt_tokens`` counts each image as
:func:`enrich_pipeline.enrichment.vision_tokens.image_tokens` for the request's model and its
``vl_high_resolution_images`` flag (32x32 or 28x28 px patches, capped, plus two special tokens).
``"legacy"`` keeps the older estimate (one token per started 28x28 patch, at least 4).

Hostile-provider modes are not DashScope behaviour but what any provider can do to a client:
``trickle`` (a 200 sent one byte per ``trickle_interval`` seconds), ``nan_embedding`` /
``inf_embedding`` / ``short_embedding``, and captions with NUL, a lone surrogate, 200,000
characters, only invisible characters, or control characters.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import itertools
import json
import math
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.synthetic import (
    hashed_embedding,
    mean_color,
    synthetic_caption,
    synthetic_caption_for_key,
)

# "batch": faults for batch lines only ("any" never reaches them; rules by color or text do).
ENDPOINTS = ("chat", "embeddings", "batch", "any")
EMBEDDING_DIMENSIONS = (64, 128, 256, 512, 768, 1024, 1536, 2048)
DEFAULT_DIMENSIONS = 1024
MAX_EMBEDDING_BATCH = 10
BATCH_MAX_LINES = 50_000  # DashScope: requests in one batch file
BATCH_MAX_BYTES = 500 * 1024 * 1024  # DashScope: size of one batch file
# /v1/chat/ds-test: the endpoint of DashScope's free test model, batch-test-model
# (https://help.aliyun.com/document_detail/2975721.html); served here as chat.
BATCH_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/chat/ds-test": "chat",
}
BATCH_FORCED = (None, "expired", "failed")

# fault -> (status, code, message) as compatible mode sends them; `type` follows from the code
# (see _Reply). Codes and messages: https://help.aliyun.com/en/model-studio/error-code and
# https://docs.qwencloud.com/api-reference/preparation/error-messages, checked against bodies
# users pasted in issues. The native protocol's code is noted where it differs. "{model}" is
# filled with the request's model.
_INVALID = "<400> InternalError.Algo.InvalidParameter: "
_ERRORS: dict[str, tuple[int, str, str]] = {
    # Native Throttling.RateQuota; the same body answers the per-second (RPS) limit.
    "429": (429, "limit_requests", "Requests rate limit exceeded, please try again later."),
    # Native Throttling.AllocationQuota: TPM or TPS. The pages list the compatible code
    # (insufficient_quota) but show no compatible `type`; it echoes the code, as for
    # limit_requests and Arrearage.
    "tpm_throttle": (
        429,
        "insufficient_quota",
        "Allocated quota exceeded, please increase your quota limit.",
    ),
    "500": (500, "internal_error", "An internal error has occured."),
    "503": (503, "internal_error", "The service is temporarily unavailable."),
    # Native DataInspectionFailed (also InternalError.Algo.DataInspectionFailed in messages);
    # the error page lists the input and the output variants of the message.
    "moderation": (400, "data_inspection_failed", "Input data may contain inappropriate content."),
    "output_moderation": (
        400,
        "data_inspection_failed",
        "Output data may contain inappropriate content.",
    ),
    "bad_image": (
        400,
        "invalid_parameter_error",
        "The image format is illegal and cannot be opened",
    ),
    # "Failed to download multimodal content." Observed compatible body (BerriAI/litellm#6307):
    # code invalid_parameter_error, message prefixed "<400> InternalError.Algo.InvalidParameter: ".
    "image_download_failed": (
        400,
        "invalid_parameter_error",
        _INVALID + "Failed to download multimodal content",
    ),
    # The error page: an image_url item sent to a text-only model gives this 400, code
    # InternalError.Algo.InvalidParameter.
    "no_image_support": (
        400,
        "invalid_parameter_error",
        _INVALID + "The provided messages input is invalid. The error info is [Unexpected item "
        "type in content]",
    ),
    # A 400 about the request itself, whatever the image: "Range of max_tokens should be
    # [1, xxx]" on the error page, 8192 being qwen-vl-max/plus's output cap.
    "bad_request": (
        400,
        "invalid_parameter_error",
        _INVALID + "Range of max_tokens should be [1, 8192]",
    ),
    "unauthorized": (401, "invalid_api_key", "Incorrect API key provided."),
    # The error page's own example: {'code': 'Arrearage', 'param': None, 'message': 'Access
    # denied, please make sure your account is in good standing.', 'type': 'Arrearage'}. The
    # account owes money: every request fails, for every key, until it is paid.
    "arrearage": (
        400,
        "Arrearage",
        "Access denied, please make sure your account is in good standing.",
    ),
    # A sub-workspace key without permission for the model (the page's 403-Model.AccessDenied;
    # message as users report it, langgenius/dify#13769). The compatible code is not shown;
    # the native one is kept, as compatible mode does for Arrearage.
    "model_access_denied": (403, "Model.AccessDenied", "Model access denied."),
    # Native ModelNotFound; the page lists "The model xxx does not exist or you do not have
    # access to it." under 404-ModelNotFound/model_not_found.
    "model_not_found": (
        404,
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
}
# Codes compatible mode files under OpenAI's invalid_request_error type; others echo the code.
_REQUEST_ERROR_CODES = frozenset({"invalid_api_key", "invalid_parameter_error", "model_not_found"})
# Rate-limit refusals (logged fault) -> the body they are answered with.
_LIMIT_REPLIES = {
    "rpm_limit": "429",
    "rps_limit": "429",
    "tpm_limit": "tpm_throttle",
    "tps_limit": "tpm_throttle",
}
# Successful answers with hostile content: chat captions and embedding vectors.
CAPTION_FAULTS = frozenset(
    {
        "empty_caption",
        "nul_caption",
        "surrogate_caption",
        "huge_caption",
        "blank_caption",
        "control_caption",
    }
)
EMBEDDING_FAULTS = frozenset({"nan_embedding", "inf_embedding", "short_embedding"})
FAULTS = frozenset(
    {*_ERRORS, "timeout", "reset", "malformed", "trickle", *CAPTION_FAULTS, *EMBEDDING_FAULTS}
)
HUGE_CAPTION_CHARS = 200_000
# Largest max_tokens per model. The official model table could not be read from here: 8192 is
# what DashScope answers ("Range of max_tokens should be [1, 8192]", seen in public test
# fixtures) and the output limit a third-party scrape of the Bailian console gives for
# qwen-vl-max/plus; the same scrape gives 32K for the Qwen3-VL models. Unknown models get the
# smaller cap, the stricter choice. `max_output_tokens=` overrides per model.
DEFAULT_MAX_OUTPUT_TOKENS = 8192
_MAX_OUTPUT_BY_PREFIX = (("qwen3-vl", 32768),)
IMAGE_TOKEN_RULES = ("legacy", "dashscope")
_LEGACY_PATCH = 28

# Per-model limit: one number for every model, or a mapping with "*" as the default.
Limit = int | Mapping[str, int] | None


def _count_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def _limit_for(limit: Limit, model: str) -> int | None:
    if limit is None or isinstance(limit, int):
        return limit
    return limit.get(model, limit.get("*"))


def _legacy_image_tokens(width: int, height: int) -> int:
    """The estimate the stand-in used before vision_tokens: one token per started 28x28 patch."""
    return max(4, math.ceil(width / _LEGACY_PATCH) * math.ceil(height / _LEGACY_PATCH))


def _dumps(content: Any) -> bytes:
    """JSON as Python writes it by default: NaN/Infinity as bare tokens and non-ASCII escaped,
    so a lone surrogate travels as the escape \\ud800 (Starlette's JSONResponse refuses both)."""
    return json.dumps(content, separators=(",", ":")).encode()


class _Reply(Exception):
    """An error response decided somewhere down the handler."""

    def __init__(
        self,
        fault_or_status: str | int,
        message: str = "",
        fault: str | None = None,
        code: str | None = None,
        model: str = "",
    ) -> None:
        if isinstance(fault_or_status, str):
            self.status, self.code, self.message = _ERRORS[fault_or_status]
            self.message = self.message.replace("{model}", model)
        else:  # request validation: DashScope's InvalidParameter unless a code is given
            self.status, self.message = fault_or_status, message
            self.code = code or "invalid_parameter_error"
        self.type = "invalid_request_error" if self.code in _REQUEST_ERROR_CODES else self.code
        self.fault = fault
        self.headers: dict[str, str] = {}
        super().__init__(self.message)


# Parsed request: image mean colours and texts (for rules), and a builder of the success body
# given the fault to serve (None, or a caption/embedding fault that mangles the content).
_Parsed = tuple[list[tuple[float, float, float]], list[str], Callable[[str | None], dict[str, Any]]]


@dataclass
class _Injected:
    fault: str
    remaining: int
    endpoint: str
    retry_after: float | None


@dataclass
class _Rule:
    fault: str
    color: tuple[int, int, int] | None
    tolerance: int
    text_contains: str | None
    remaining: int | None


class _ExposeTransport:
    """Puts uvicorn's transport in the scope so a "reset" can abort the TCP connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn's `send` is a bound method of its per-request cycle, which holds the transport.
        scope["standin.transport"] = getattr(getattr(send, "__self__", None), "transport", None)
        await self.app(scope, receive, send)


def _log_entry(endpoint: str) -> dict[str, Any]:
    """A request's line in ``StandIn.requests``, filled in as the request is served."""
    return {
        "endpoint": endpoint,
        "model": "",
        "n_inputs": 0,
        "status": 200,
        "fault": None,
        "time": time.time(),
        "image_tokens": 0,
        "prompt_tokens": 0,
    }


def _applies(fault: str, kind: str) -> bool:
    """Whether `fault` can be served on a `kind` ("chat" or "embeddings") request: hostile
    captions only come back from chat, hostile vectors only from embeddings."""
    if fault in CAPTION_FAULTS:
        return kind == "chat"
    if fault in EMBEDDING_FAULTS:
        return kind == "embeddings"
    return True


class StandIn:
    """OpenAI-compatible DashScope stand-in running in a background thread.

    `requests` is appended when a request completes (a hung "timeout" request appears late; a
    "trickle" one when its body starts), with `time` its arrival; a "reset" is logged with status
    0, rate-limit refusals with fault "rpm_limit", "rps_limit", "tpm_limit" or "tps_limit".

    Knobs (all attributes, changeable while serving): `rpm_limit` / `tpm_limit` per model (an int
    for every model or a ``{model: limit}`` mapping, ``"*"`` the default), `per_second` to also
    enforce RPM/60 and TPM/60 in any one-second window, `trickle_interval` for the "trickle"
    fault, `text_only_models` refused images, `max_output_tokens` overriding the per-model
    max_tokens caps, and `image_token_rule` ("legacy" or "dashscope", see the module docstring).
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
        batch_delay: float = 0.0,
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
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._injected: list[_Injected] = []
        self._rules: list[_Rule] = []
        # DashScope limits each model separately: per model, the arrival times of requests and
        # the [time, tokens] charged for them, kept for the last minute.
        self._windows: dict[str, deque[float]] = {}
        self._token_windows: dict[str, deque[list[float]]] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        # The Batch API: knobs (see the module docstring), uploaded files and batches.
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
            Route("/v1/files", self._files_create, methods=["POST"]),
            Route("/v1/files/{file_id}", self._files_get, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self._files_content, methods=["GET"]),
            Route("/v1/batches", self._batches_create, methods=["POST"]),
            Route("/v1/batches", self._batches_list, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._batches_get, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._batches_cancel, methods=["POST"]),
        ]
        self.app = _ExposeTransport(Starlette(routes=routes))

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
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        if endpoint in ("chat", "embeddings") and not _applies(fault, endpoint):
            raise ValueError(f"{fault!r} cannot be served on {endpoint}")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._injected.append(_Injected(fault, times, endpoint, retry_after))

    def add_rule(
        self,
        fault: str,
        *,
        color: tuple[int, int, int] | None = None,
        tolerance: int = 30,
        text_contains: str | None = None,
        times: int | None = None,
    ) -> None:
        """Serve `fault` to chat requests with an image near `color`, or embedding requests
        with an input containing `text_contains`; `times=None` means forever."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if color is None and text_contains is None:
            raise ValueError("a rule needs color= or text_contains=")
        with self._lock:
            self._rules.append(_Rule(fault, color, tolerance, text_contains, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._injected.clear()
            self._rules.clear()
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

    def _take_injected(self, endpoint: str, kind: str) -> _Injected | None:
        """The next injected fault aimed at `endpoint` that a `kind` request can carry; a
        hostile caption waits for a chat request rather than being spent on an embedding."""
        with self._lock:
            for item in self._injected:
                aimed = item.endpoint == endpoint or (
                    item.endpoint == "any" and endpoint != "batch"
                )
                if aimed and _applies(item.fault, kind):
                    item.remaining -= 1
                    if item.remaining <= 0:
                        self._injected.remove(item)
                    return item
        return None

    def _match_rule(
        self, means: list[tuple[float, float, float]], texts: list[str], kind: str
    ) -> str | None:
        with self._lock:
            for rule in self._rules:
                if not _applies(rule.fault, kind):
                    continue
                hit = (
                    rule.color is not None
                    and any(
                        max(abs(m - c) for m, c in zip(mean, rule.color, strict=True))
                        <= rule.tolerance
                        for mean in means
                    )
                ) or (
                    rule.text_contains is not None and any(rule.text_contains in t for t in texts)
                )
                if hit:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    return rule.fault
        return None

    def _admit(
        self, model: str, tokens: int | None = None
    ) -> tuple[str | None, list[float] | None]:
        """Count one request (`tokens` None) or `tokens` against `model`'s limits.

        Returns the refusal ("rpm_limit", "rps_limit", "tpm_limit", "tps_limit") or None, and
        for tokens the ``[time, tokens]`` charge, which _settle corrects once the answer's
        usage is known. A refused request is not charged.

        The minute and the second are sliding windows. The docs give RPS = RPM / 60 and
        TPS = TPM / 60 but not how fractions round; the per-second budget is rounded down (the
        stricter choice) but never below 1, or a limit under 60 RPM would refuse everything.
        """
        with self._lock:
            now = time.monotonic()
            if tokens is None:
                window = self._windows.setdefault(model, deque())
                while window and now - window[0] >= 60.0:
                    window.popleft()
                rpm = _limit_for(self.rpm_limit, model)
                if rpm is not None:
                    if len(window) >= rpm:
                        return "rpm_limit", None
                    last_second = sum(1 for t in window if now - t < 1.0)
                    if self.per_second and last_second >= max(1, rpm // 60):
                        return "rps_limit", None
                window.append(now)
                return None, None
            charges = self._token_windows.setdefault(model, deque())
            while charges and now - charges[0][0] >= 60.0:
                charges.popleft()
            tpm = _limit_for(self.tpm_limit, model)
            if tpm is not None:
                if sum(c[1] for c in charges) + tokens > tpm:
                    return "tpm_limit", None
                last_second = sum(c[1] for c in charges if now - c[0] < 1.0)
                if self.per_second and last_second + tokens > max(1, tpm // 60):
                    return "tps_limit", None
            charge = [now, float(tokens)]
            charges.append(charge)
            return None, charge

    def _settle(self, charge: list[float] | None, answer: dict[str, Any]) -> None:
        """Replace the admission estimate with what the answer's usage says was used."""
        usage = answer.get("usage")
        if charge is not None and isinstance(usage, dict):
            with self._lock:
                charge[1] = float(usage.get("total_tokens", charge[1]))

    def _max_output(self, model: str) -> int:
        if model in self.max_output_tokens:
            return self.max_output_tokens[model]
        for prefix, cap in _MAX_OUTPUT_BY_PREFIX:
            if model.startswith(prefix):
                return cap
        return DEFAULT_MAX_OUTPUT_TOKENS

    def _image_tokens(self, width: int, height: int, model: str, high_resolution: bool) -> int:
        if self.image_token_rule == "dashscope":
            return vision_tokens.image_tokens(width, height, model, high_resolution=high_resolution)
        return _legacy_image_tokens(width, height)

    # -- HTTP --------------------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def _embeddings(self, request: Request) -> Response:
        return await self._handle(request, "embeddings")

    async def _handle(self, request: Request, endpoint: str) -> Response:
        request_id = str(uuid.uuid4())
        entry = _log_entry(endpoint)
        headers = {"x-request-id": request_id}
        logged = False
        try:
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                entry["model"] = body["model"]
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise _Reply("unauthorized")
            refusal, _ = self._admit(entry["model"])
            if refusal is not None:
                raise _Reply(_LIMIT_REPLIES[refusal], fault=refusal)
            delay = self.latency
            if endpoint == "embeddings" and self.embedding_latency is not None:
                delay = self.embedding_latency
            if delay > 0:
                await asyncio.sleep(delay)
            if not isinstance(body, dict):
                raise _Reply(400, "The request body is not valid JSON.")
            parse = self._parse_chat if endpoint == "chat" else self._parse_embeddings
            means, texts, respond = parse(body, entry)
            # Tokens can only be counted once the body is parsed. The docs do not say what is
            # charged at admission, before the output exists; reserving the input plus
            # max_tokens (when given) is the stricter reading, corrected to the real usage
            # after the answer. Refused or failed requests keep their reservation.
            refusal, charge = self._admit(
                entry["model"], entry["prompt_tokens"] + _requested_output(body)
            )
            if refusal is not None:
                raise _Reply(_LIMIT_REPLIES[refusal], fault=refusal)
            injected = self._take_injected(endpoint, endpoint)
            fault = injected.fault if injected else self._match_rule(means, texts, endpoint)
            entry["fault"] = fault
            if fault == "timeout":
                await self._pause(self.hang_seconds)
            elif fault == "reset":
                # Logged before the abort: the client may act on the reset before we resume.
                entry["status"], logged = 0, True
                self._log(entry)
                return await self._reset(request)
            elif fault == "malformed":
                return Response('{"id": "chatcmpl-', 200, headers, "application/json")
            elif fault in _ERRORS:
                reply = _Reply(fault, fault=fault, model=entry["model"])
                if injected and injected.retry_after is not None:
                    reply.headers["Retry-After"] = f"{injected.retry_after:g}"
                raise reply
            answer = respond(fault)
            self._settle(charge, answer)
            if fault == "trickle":
                return self._trickle(request, _dumps(answer), headers)
            if fault in CAPTION_FAULTS or fault in EMBEDDING_FAULTS:
                return Response(_dumps(answer), 200, headers, "application/json")
            return JSONResponse(answer, headers=headers)
        except _Reply as reply:
            entry["status"], entry["fault"] = reply.status, reply.fault
            error = {"message": reply.message, "type": reply.type, "param": None}
            content = {"error": error | {"code": reply.code}, "request_id": request_id}
            return JSONResponse(content, reply.status, headers | reply.headers)
        finally:
            if not logged:
                self._log(entry)

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    async def _pause(self, seconds: float) -> bool:
        """Sleep `seconds` unless the server stops first; True when it is stopping."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def _trickle(self, request: Request, body: bytes, headers: dict[str, str]) -> Response:
        """A complete, valid 200 sent one byte per `trickle_interval` seconds.

        Each byte arrives well within any per-read timeout, so only a deadline on the whole
        response stops a client waiting for it. The full Content-Length is promised up front,
        as a real server would; when the stand-in stops mid-body the connection is dropped,
        since ending the body short would break the HTTP framing instead.
        """
        transport = request.scope.get("standin.transport")

        async def drip() -> AsyncIterator[bytes]:
            for i in range(len(body)):
                yield body[i : i + 1]
                if i + 1 < len(body) and await self._pause(self.trickle_interval):
                    if transport is not None:
                        await self._abort(transport)
                    return

        headers = headers | {"content-length": str(len(body))}
        return StreamingResponse(drip(), 200, headers, media_type="application/json")

    async def _reset(self, request: Request) -> Response:
        transport = request.scope.get("standin.transport")
        if transport is None:
            raise RuntimeError("the reset fault needs uvicorn's h11 transport in the scope")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Zero linger turns close() into a RST, like a load balancer dropping the flow.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self._abort(transport)
        return Response(status_code=204)

    async def _abort(self, transport: asyncio.Transport) -> None:
        transport.abort()
        # Let connection_lost run so uvicorn marks the cycle disconnected and drops our reply.
        await asyncio.sleep(0.01)

    def _parse_chat(self, body: dict[str, Any], entry: dict[str, Any]) -> _Parsed:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reply(400, "messages must be a non-empty list.")
        model = entry["model"]
        cap = self._max_output(model)
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap
            ):
                # The error page: "Range of max_tokens should be [1, xxx]", xxx the model's cap.
                raise _Reply(400, f"{_INVALID}Range of max_tokens should be [1, {cap}]")
        # vl_high_resolution_images is not an OpenAI parameter: the SDK sends it from extra_body
        # at the top level of the body (the API reference: extra_body={"vl_high_resolution_images":
        # xxx}); it raises the per-image cap to 16384 tokens.
        high_resolution = body.get("vl_high_resolution_images") is True
        text_tokens = 0
        images: list[Image.Image] = []
        means: list[tuple[float, float, float]] = []
        keys: list[str] = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise _Reply(400, "message content must be a string or a list of parts.")
            for part in parts:
                if not isinstance(part, dict):
                    raise _Reply(400, "content parts must be objects.")
                if part.get("type") == "text":
                    text_tokens += _count_tokens(str(part.get("text", "")))
                    keys.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    if model in self.text_only_models:
                        raise _Reply("no_image_support", model=model)
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise _Reply("bad_image")
                    if url.startswith("data:"):
                        image = _decode_data_url(url)
                        images.append(image)
                        means.append(mean_color(image))
                        entry["image_tokens"] += self._image_tokens(
                            image.width, image.height, model, high_resolution
                        )
                    elif url.startswith(("http://", "https://")):
                        keys.insert(0, url)  # not fetched: no tokens, but a stable caption
                    else:
                        raise _Reply("bad_image")
                    entry["n_inputs"] += 1
        prompt_tokens = text_tokens + entry["image_tokens"]
        entry["prompt_tokens"] = prompt_tokens

        def respond(fault: str | None) -> dict[str, Any]:
            caption = (
                synthetic_caption(images[0])
                if images
                else synthetic_caption_for_key("|".join(keys))
            )
            caption = _hostile_caption(fault, caption)
            completion = _count_tokens(caption)
            return {
                "id": f"chatcmpl-{uuid.uuid4()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": caption},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
                "system_fingerprint": None,
            }

        return means, [], respond

    def _parse_embeddings(self, body: dict[str, Any], entry: dict[str, Any]) -> _Parsed:
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise _Reply(400, "input must be a string or a non-empty list of strings.")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise _Reply(400, "input contents must be non-empty strings.")
        entry["n_inputs"] = len(texts)
        if len(texts) > MAX_EMBEDDING_BATCH:
            raise _Reply(400, "batch size is invalid, it should not be larger than 10.")
        dims = body.get("dimensions", DEFAULT_DIMENSIONS)
        if isinstance(dims, bool) or dims not in EMBEDDING_DIMENSIONS:
            allowed = ", ".join(map(str, EMBEDDING_DIMENSIONS))
            raise _Reply(400, f"dimensions is invalid, it should be one of {allowed}.")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _Reply(400, "encoding_format should be float or base64.")
        model = entry["model"]
        tokens = sum(max(1, len(re.findall(r"\w+", t))) for t in texts)
        entry["prompt_tokens"] = tokens

        def respond(fault: str | None) -> dict[str, Any]:
            data = []
            for i, text in enumerate(texts):
                vector: list[float] | str = _hostile_vector(fault, hashed_embedding(text, dims))
                if encoding == "base64":
                    # The SDK decodes base64 as little-endian float32 (numpy.frombuffer); NaN
                    # and infinities survive the trip as IEEE 754 bit patterns.
                    vector = base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
                data.append({"object": "embedding", "index": i, "embedding": vector})
            return {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "id": str(uuid.uuid4()),
            }

        return [], texts, respond

    # -- Batch API: files ---------------------------------------------------------------------

    async def _batch_api(self, request: Request, name: str, handler: Callable[[], Any]) -> Response:
        """Auth, logging and DashScope's error body around a files/batches handler."""
        request_id = str(uuid.uuid4())
        entry = _log_entry(name)
        headers = {"x-request-id": request_id}
        try:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise _Reply("unauthorized")
            if not self.batch_enabled:
                raise _Reply(404, f"{request.url.path} is not served here.", code="not_found")
            result = await handler()
            if isinstance(result, Response):
                return result
            return JSONResponse(result, headers=headers)
        except _Reply as reply:
            entry["status"] = reply.status
            error = {"message": reply.message, "type": reply.type, "param": None}
            content = {"error": error | {"code": reply.code}, "request_id": request_id}
            return JSONResponse(content, reply.status, headers)
        finally:
            self._log(entry)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}{uuid.uuid4().hex[:12]}"

    def _store_file(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        kind = "batch_output" if purpose == "batch_output" else "batch"
        obj = {
            "id": self._new_id(f"file-{kind}"),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "_content": content,
        }
        with self._lock:
            self.files[obj["id"]] = obj
        return obj

    def _file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            obj = self.files.get(file_id)
        if obj is None:
            raise _Reply(404, f"File {file_id!r} not found.", code="not_found")
        return obj

    async def _files_create(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            fields = _parse_multipart(request.headers.get("content-type", ""), await request.body())
            purpose = (fields.get("purpose", (None, b""))[1] or b"").decode(errors="replace")
            if "file" not in fields:
                raise _Reply(400, "Missing required parameter: 'file'.")
            if purpose != "batch":
                raise _Reply(400, f"purpose must be 'batch', not {purpose!r}.")
            filename, content = fields["file"]
            if len(content) > self.batch_max_bytes:
                raise _Reply(
                    400, f"The file is {len(content)} bytes; at most {self.batch_max_bytes}."
                )
            return _public(self._store_file(filename or "upload.jsonl", purpose, content))

        return await self._batch_api(request, "files", handle)

    async def _files_get(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            return _public(self._file(request.path_params["file_id"]))

        return await self._batch_api(request, "files", handle)

    async def _files_content(self, request: Request) -> Response:
        async def handle() -> Response:
            obj = self._file(request.path_params["file_id"])
            return Response(obj["_content"], 200, media_type="application/octet-stream")

        return await self._batch_api(request, "files", handle)

    # -- Batch API: batches -------------------------------------------------------------------

    def _batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            raise _Reply(404, f"Batch {batch_id!r} not found.", code="not_found")
        return batch

    async def _batches_create(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise _Reply(400, "The request body is not valid JSON.")
            endpoint = body.get("endpoint")
            if endpoint not in BATCH_ENDPOINTS:
                raise _Reply(400, f"endpoint must be one of {sorted(BATCH_ENDPOINTS)}.")
            if body.get("completion_window") != "24h":
                raise _Reply(400, "completion_window must be '24h'.")
            source = self._file(str(body.get("input_file_id")))
            if source["purpose"] != "batch":
                raise _Reply(400, "The input file's purpose must be 'batch'.")
            text = source["_content"].decode(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if not lines:
                raise _Reply(400, "The input file is empty.")
            if len(lines) > self.batch_max_lines:
                raise _Reply(
                    400,
                    f"The input file has {len(lines)} requests; a batch takes at most "
                    f"{self.batch_max_lines}.",
                )
            model = _first_model(lines)
            if model in self.batch_unsupported_models:
                raise _Reply(
                    400,
                    f"The provided model '{model}' is not supported by the Batch API.",
                    code="model_not_found",
                )
            now = int(time.time())
            batch: dict[str, Any] = {
                "id": self._new_id("batch"),
                "object": "batch",
                "endpoint": endpoint,
                "model": model,
                "errors": None,
                "input_file_id": source["id"],
                "completion_window": "24h",
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": now,
                "in_progress_at": None,
                "expires_at": now + 24 * 3600,
                "finalizing_at": None,
                "completed_at": None,
                "failed_at": None,
                "expired_at": None,
                "cancelling_at": None,
                "cancelled_at": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": body.get("metadata") or None,
                "_lines": lines,
                "_force": self.batch_force,
                "_delay": self.batch_delay,
                "_expire_after": self.batch_expire_after,
            }
            with self._lock:
                self.batches[batch["id"]] = batch
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
            return _public(batch)

        return await self._batch_api(request, "batches", handle)

    async def _batches_get(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            return _public(self._batch(request.path_params["batch_id"]))

        return await self._batch_api(request, "batches", handle)

    async def _batches_list(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            with self._lock:
                newest_first = list(reversed(self.batches.values()))
            after = request.query_params.get("after")
            if after:
                ids = [b["id"] for b in newest_first]
                newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
            try:
                limit = max(1, min(100, int(request.query_params.get("limit", 20))))
            except ValueError:
                raise _Reply(400, "limit must be an integer.") from None
            page = newest_first[:limit]
            return {
                "object": "list",
                "data": [_public(b) for b in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(newest_first) > limit,
            }

        return await self._batch_api(request, "batches", handle)

    async def _batches_cancel(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            batch = self._batch(request.path_params["batch_id"])
            if batch["status"] not in ("validating", "in_progress", "finalizing"):
                raise _Reply(400, f"A batch that is {batch['status']} cannot be cancelled.")
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
            return _public(batch)

        return await self._batch_api(request, "batches", handle)

    def _stopped(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def _run_batch(self, batch: dict[str, Any]) -> None:
        """Validate, answer every line, wait out the pace, then end as forced or completed."""
        started = time.monotonic()
        await asyncio.sleep(0)  # the create response goes out while "validating"
        counts = batch["request_counts"]
        problems = _validate_lines(batch["_lines"], batch["endpoint"])
        if batch["_force"] == "failed" or problems:
            batch["errors"] = {
                "object": "list",
                "data": problems
                or [{"code": "batch_failed", "message": "The batch failed.", "line": None}],
            }
            batch["status"], batch["failed_at"] = "failed", int(time.time())
            return
        if batch["status"] == "validating":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        kind = BATCH_ENDPOINTS[batch["endpoint"]]
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for n, raw in enumerate(batch["_lines"]):
            if batch["status"] == "cancelling" or self._stopped():
                break
            line = json.loads(raw)
            if batch["_force"] == "expired" and n >= batch["_expire_after"]:
                errors.append(
                    _batch_error_line(
                        line.get("custom_id"),
                        None,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                )
                counts["failed"] += 1
                continue
            ok, record = await asyncio.to_thread(self._batch_line, line, kind)
            (output if ok else errors).append(record)
            counts["completed" if ok else "failed"] += 1
        while (
            time.monotonic() - started < batch["_delay"]
            and batch["status"] != "cancelling"
            and not self._stopped()
        ):
            await asyncio.sleep(min(0.02, batch["_delay"]))
        cancelled = batch["status"] == "cancelling"
        if not cancelled:
            batch["status"], batch["finalizing_at"] = "finalizing", int(time.time())
        for records, field in ((output, "output_file_id"), (errors, "error_file_id")):
            if records:
                content = "".join(json.dumps(r) + "\n" for r in records).encode()
                name = f"{batch['id']}_{field.split('_')[0]}.jsonl"
                batch[field] = self._store_file(name, "batch_output", content)["id"]
        now = int(time.time())
        if cancelled:
            batch["status"], batch["cancelled_at"] = "cancelled", now
        elif batch["_force"] == "expired":
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now

    def _batch_line(self, line: dict[str, Any], kind: str) -> tuple[bool, dict[str, Any]]:
        """One request of a batch through the online logic: (answered, output/error line)."""
        request_id = str(uuid.uuid4())
        entry = _log_entry(f"batch_{kind}")
        custom_id = line.get("custom_id")
        try:
            body = line.get("body")
            if not isinstance(body, dict):
                raise _Reply(400, "The request body must be an object.")
            if isinstance(body.get("model"), str):
                entry["model"] = body["model"]
            parse = self._parse_chat if kind == "chat" else self._parse_embeddings
            means, texts, respond = parse(body, entry)
            injected = self._take_injected("batch", kind)
            fault = injected.fault if injected else self._match_rule(means, texts, kind)
            entry["fault"] = fault
            if fault in _ERRORS:
                raise _Reply(fault, fault=fault, model=entry["model"])
            if fault in ("timeout", "reset"):  # no connection to drop in a batch: a 500 line
                raise _Reply("500", fault=fault)
            # A "trickle" has no connection to slow down either: the line is answered as is.
            # Hostile captions and vectors go into the output file; json.dumps keeps NaN and
            # lone surrogates there as Python writes them.
            answer = (
                {"id": "chatcmpl-", "object": "chat.completion"}
                if fault == "malformed"
                else respond(fault)
            )
            return True, {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": answer},
                "error": None,
            }
        except _Reply as reply:
            entry["status"], entry["fault"] = reply.status, reply.fault
            return False, _batch_error_line(
                custom_id, reply, reply.code, reply.message, request_id=request_id
            )
        finally:
            self._log(entry)


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` fields as ``name -> (filename, bytes)``, byte-exact."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        raise _Reply(400, "Expected a multipart/form-data upload.")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = head.decode("latin-1")
        name = re.search(r'[;\s]name="([^"]*)"', headers)
        filename = re.search(r'filename="([^"]*)"', headers)
        if name is not None:
            fields[name.group(1)] = (
                filename.group(1) if filename else None,
                data[:-2] if data.endswith(b"\r\n") else data,
            )
    return fields


def _first_model(lines: list[str]) -> str | None:
    for raw in lines:
        try:
            body = json.loads(raw).get("body")
        except (ValueError, AttributeError):
            continue
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return body["model"]
    return None


def _validate_lines(lines: list[str], endpoint: str) -> list[dict[str, Any]]:
    """What DashScope checks while a batch is "validating"; any problem fails the batch."""
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    model = _first_model(lines)
    for n, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        body = line.get("body") if isinstance(line, dict) else None
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(body, dict) or not isinstance(custom_id, str):
            problems.append(
                {"code": "invalid_json_line", "message": "Not a batch request line.", "line": n}
            )
        elif custom_id in seen:
            problems.append(
                {
                    "code": "duplicate_custom_id",
                    "message": f"The custom_id '{custom_id}' for this request is a duplicate "
                    "of another request.",
                    "line": n,
                }
            )
        elif line.get("url") != endpoint or line.get("method", "POST") != "POST":
            problems.append(
                {"code": "invalid_url", "message": f"The url must be {endpoint}.", "line": n}
            )
        elif body.get("model") != model:
            problems.append(
                {
                    "code": "mismatched_model",
                    "message": f"The model '{body.get('model')}' for this request does not "
                    "match the rest of the batch.",
                    "line": n,
                }
            )
        else:
            seen.add(custom_id)
            continue
        if len(problems) >= 10:
            break
        seen.add(str(custom_id))
    return problems


def _batch_error_line(
    custom_id: Any,
    reply: _Reply | None,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
) -> dict[str, Any]:
    """A line of the error file: the failed response with DashScope's error body, and the
    error itself (expired lines have no response)."""
    response = None
    if reply is not None:
        error = {"message": message, "type": reply.type, "param": None, "code": code}
        response = {
            "status_code": reply.status,
            "request_id": request_id,
            "body": {"error": error, "request_id": request_id},
        }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }


def _requested_output(body: dict[str, Any]) -> int:
    """The output tokens a chat request asks for at most (0 when it does not say)."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


# Zero-width and other invisible characters with no letter among them: `str.strip()` leaves
# U+200B, U+2060 and U+FEFF in place, so a naive emptiness check passes this as a caption.
_BLANK_CAPTION = "\u200b \u200b\u2060\ufeff\t\u3000\u200b\n\u00a0\u200b"
# Terminal escapes (clear screen, red), BEL, backspace, DEL, CR, form feed, vertical tab and the
# C1 controls NEL and CSI: what breaks logs, terminals and CSV exports.
_CONTROL_PREFIX = "\x1b[2J\x1b[31m"
_CONTROL_SUFFIX = "\x07\x08\x7f\r\x0c\x0b\x85\x9b"


def _hostile_caption(fault: str | None, caption: str) -> str:
    """`caption` as a hostile provider might send it for a caption fault."""
    if fault == "empty_caption":
        return ""
    if fault == "nul_caption":
        half = len(caption) // 2
        return caption[:half] + "\u0000" + caption[half:]
    if fault == "surrogate_caption":
        # A lone high surrogate: legal in JSON (as the escape) and in a Python str, but not
        # encodable as UTF-8, so it fails only when the caption is written somewhere.
        return caption + " \ud800"
    if fault == "huge_caption":
        return ((caption + " ") * (HUGE_CAPTION_CHARS // (len(caption) + 1) + 1))[
            :HUGE_CAPTION_CHARS
        ]
    if fault == "blank_caption":
        return _BLANK_CAPTION
    if fault == "control_caption":
        return _CONTROL_PREFIX + caption + _CONTROL_SUFFIX
    return caption


def _hostile_vector(fault: str | None, vector: list[float]) -> list[float]:
    """`vector` as a hostile provider might send it for an embedding fault."""
    if fault == "nan_embedding":
        return [math.nan, *vector[1:]]
    if fault == "inf_embedding":
        return [math.inf, *vector[1:-1], -math.inf]
    if fault == "short_embedding":
        return vector[: len(vector) // 2]
    return vector


def _decode_data_url(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise _Reply("bad_image")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _Reply("bad_image") from exc
    return image.convert("RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the DashScope stand-in server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default="sk-standin")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument(
        "--embedding-latency", type=float, default=None, help="seconds per embeddings call"
    )
    parser.add_argument("--rpm-limit", type=int, default=None, help="requests/minute, per model")
    parser.add_argument("--tpm-limit", type=int, default=None, help="tokens/minute, per model")
    parser.add_argument(
        "--per-second", action="store_true", help="also enforce RPM/60 and TPM/60 per second"
    )
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--trickle-interval", type=float, default=1.0)
    parser.add_argument(
        "--text-only-model",
        dest="text_only_models",
        action="append",
        default=[],
        help="a model that refuses images (repeatable)",
    )
    parser.add_argument("--image-token-rule", choices=IMAGE_TOKEN_RULES, default="dashscope")
    parser.add_argument(
        "--batch-delay", type=float, default=0.0, help="seconds a batch takes to complete"
    )
    args = parser.parse_args(argv)
    with StandIn(**vars(args)) as server:
        print(f"DashScope stand-in listening on {server.base_url}", flush=True)
        print(f"export DASHSCOPE_BASE_URL={server.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
