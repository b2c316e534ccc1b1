"""The chat-completions and embeddings endpoints on the wire: the key, the rate limits, the
latency, and each fault served as the network would (a hang, a reset connection, a truncated or
trickled body, an error body).

``OnlineAPI`` is the part of ``StandIn`` that answers these requests; the knobs and the state it
reads are ``StandIn``'s (see ``server``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from enrich_pipeline_tests.standin import limits
from enrich_pipeline_tests.standin.answers import Parsed, dumps, parse_chat, parse_embeddings
from enrich_pipeline_tests.standin.errors import ERRORS, Reply, error_body
from enrich_pipeline_tests.standin.faults import (
    CAPTION_FAULTS,
    EMBEDDING_FAULTS,
    FaultPlan,
    echoed,
    hostile_usage,
)
from enrich_pipeline_tests.standin.foreign import FOREIGN_FAULTS, SIZE_FAULTS, foreign_reply
from enrich_pipeline_tests.standin.multimodal import native_error_body, parse_multimodal
from enrich_pipeline_tests.standin.tokens import max_output, requested_output


class ExposeTransport:
    """Puts uvicorn's transport in the scope so a "reset" can abort the TCP connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn's `send` is a bound method of its per-request cycle, which holds the transport.
        scope["standin.transport"] = getattr(getattr(send, "__self__", None), "transport", None)
        await self.app(scope, receive, send)


def log_entry(endpoint: str) -> dict[str, Any]:
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


class OnlineAPI:
    """Chat and embeddings requests, answered on the server's event loop."""

    # Set by StandIn.__init__ and start(); the knobs are documented there.
    api_key: str
    latency: float
    embedding_latency: float | None
    rpm_limit: limits.Limit
    tpm_limit: limits.Limit
    per_second: bool
    hang_seconds: float
    trickle_interval: float
    echo_key: bool
    text_only_models: set[str]
    max_output_tokens: dict[str, int]
    image_token_rule: str
    response_formats: dict[str, frozenset[str]]
    requests: list[dict[str, Any]]
    _lock: threading.Lock
    _faults: FaultPlan
    _windows: dict[str, deque[float]]
    _token_windows: dict[str, deque[list[float]]]
    _stopping: asyncio.Event | None

    async def _chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def _embeddings(self, request: Request) -> Response:
        return await self._handle(request, "embeddings")

    async def _multimodal(self, request: Request) -> Response:
        return await self._handle(request, "multimodal")

    async def _handle(self, request: Request, endpoint: str) -> Response:
        request_id = str(uuid.uuid4())
        entry = log_entry(endpoint)
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
                raise Reply("unauthorized")
            refusal, _ = self._admit(entry["model"])
            if refusal is not None:
                raise Reply(limits.LIMIT_REPLIES[refusal], fault=refusal)
            delay = self.latency
            if endpoint != "chat" and self.embedding_latency is not None:
                delay = self.embedding_latency
            if delay > 0:
                await asyncio.sleep(delay)
            if not isinstance(body, dict):
                raise Reply(400, "The request body is not valid JSON.")
            means, texts, respond = self._parse(endpoint, body, entry)
            # Tokens can only be counted once the body is parsed. The docs do not say what is
            # charged at admission, before the output exists; reserving the input plus
            # max_tokens (when given) is the stricter reading, corrected to the real usage
            # after the answer. Refused or failed requests keep their reservation.
            refusal, charge = self._admit(
                entry["model"], entry["prompt_tokens"] + requested_output(body)
            )
            if refusal is not None:
                raise Reply(limits.LIMIT_REPLIES[refusal], fault=refusal)
            injected = self._faults.take(endpoint, endpoint)
            fault = injected.fault if injected else self._faults.match(means, texts, endpoint)
            entry["fault"] = fault
            if fault == "timeout":
                await self._pause(self.hang_seconds)
            elif fault == "reset":
                # Logged before the abort: the client may act on the reset before we resume.
                entry["status"], logged = 0, True
                self._log(entry)
                return await self._reset(request)
            elif fault == "malformed":
                cut = '{"id": "chatcmpl-'
                if self.echo_key:  # a truncated body that still carries what was sent
                    cut += echoed("", request.headers.get("authorization"), str(request.url))
                return Response(cut, 200, headers, "application/json")
            elif fault in SIZE_FAULTS or fault in FOREIGN_FAULTS:
                return foreign_reply(fault, headers)
            elif fault in ERRORS:
                reply = Reply(fault, fault=fault, model=entry["model"])
                if injected and injected.retry_after is not None:
                    reply.headers["Retry-After"] = f"{injected.retry_after:g}"
                raise reply
            answer = respond(fault)
            self._settle(charge, answer)
            answer = hostile_usage(fault, answer)
            if fault == "trickle":
                return self._trickle(request, dumps(answer), headers)
            if fault in CAPTION_FAULTS or fault in EMBEDDING_FAULTS:
                return Response(dumps(answer), 200, headers, "application/json")
            return JSONResponse(answer, headers=headers)
        except Reply as reply:
            entry["status"], entry["fault"] = reply.status, reply.fault
            if self.echo_key:
                auth = request.headers.get("authorization")
                reply.message = echoed(reply.message, auth, str(request.url))
            # The native endpoint answers in the native protocol's shape and codes.
            native = endpoint == "multimodal"
            content = (native_error_body if native else error_body)(reply, request_id)
            return JSONResponse(content, reply.status, headers | reply.headers)
        finally:
            if not logged:
                self._log(entry)

    def _parse(self, kind: str, body: dict[str, Any], entry: dict[str, Any]) -> Parsed:
        """Check a `kind` ("chat", "embeddings" or "multimodal") body against this server's
        models."""
        if kind == "multimodal":
            return parse_multimodal(body, entry)
        if kind != "chat":
            return parse_embeddings(body, entry)
        model = entry["model"]
        return parse_chat(
            body,
            entry,
            max_output=max_output(model, self.max_output_tokens),
            text_only=model in self.text_only_models,
            image_token_rule=self.image_token_rule,
            response_formats=self.response_formats,
        )

    def _admit(
        self, model: str, tokens: int | None = None
    ) -> tuple[str | None, list[float] | None]:
        """Count one request (`tokens` None) or `tokens` against `model`'s limits.

        Returns the refusal ("rpm_limit", "rps_limit", "tpm_limit", "tps_limit") or None, and
        for tokens the ``[time, tokens]`` charge, which _settle corrects once the answer's
        usage is known. A refused request is not charged (see ``limits``).
        """
        with self._lock:
            now = time.monotonic()
            if tokens is None:
                window = self._windows.setdefault(model, deque())
                rpm = limits.limit_for(self.rpm_limit, model)
                return limits.admit_request(window, now, rpm, self.per_second), None
            charges = self._token_windows.setdefault(model, deque())
            tpm = limits.limit_for(self.tpm_limit, model)
            return limits.admit_tokens(charges, now, tokens, tpm, self.per_second)

    def _settle(self, charge: list[float] | None, answer: dict[str, Any]) -> None:
        """Replace the admission estimate with what the answer's usage says was used."""
        usage = answer.get("usage")
        if charge is not None and isinstance(usage, dict):
            with self._lock:
                charge[1] = float(usage.get("total_tokens", charge[1]))

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def _stopped(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

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
