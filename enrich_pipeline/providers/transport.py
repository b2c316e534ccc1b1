"""How the provider's answers are read: within a size cap and the call's total deadline.

Every client of the OpenAI-compatible API is built here (``http_client``); its response hook
replaces each answer's body with one read under three bounds, for every transport (proxies too):

- **size**: at most ``DASHSCOPE_MAX_ANSWER_BYTES`` are read, counted as they arrive and again as
  they inflate (gzip, deflate). The body is inflated here, in pieces of at most ``PIECE`` bytes,
  so a small gzip body that would inflate to gigabytes holds no more than one piece past the cap:
  the reading stops there, the connection is dropped and the call fails with ``AnswerTooLarge``.
  Only the codings the client asks for (``ACCEPT_ENCODING``) are taken. Batch result files
  (``/files/{id}/content``) have no total cap, since a legitimate one holds a batch's every
  answer: they are read as a stream of lines (``bounded_lines``), each line capped.
- **time**: a model call's answer ends at the first piece past the call's total deadline (its
  read timeout, counted from when the request was sent) with a read timeout, so a server that
  answers one byte a second, or inflates without end, cannot keep a call open. File uploads and
  downloads of the Batch API keep the per-read timeout: a 500 MB upload may rightly take longer
  than any one model call.
- **shape**: a model call's 2xx answer that is not JSON (a web server's HTML page) is not the
  API's; it fails with ``ForeignAnswer`` after a few hundred bytes, which ``errors.classify``
  judges (a mistyped ``DASHSCOPE_BASE_URL`` while the endpoint never answered properly).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import openai

try:  # the HTTP library of the installed openai SDK (httpx2 from openai 3, httpx before)
    import httpx2 as _http
except ImportError:  # pragma: no cover - older SDKs
    import httpx as _http  # type: ignore[no-redef]

ACCEPT_ENCODING = "gzip, deflate"
PIECE = 64 * 1024  # the most one inflation step produces
SNIPPET = 240  # bytes of a foreign answer quoted in the error
# The native multimodal embedding call (``multimodal.NATIVE_PATH``) is a model call too.
MODEL_PATHS = ("/chat/completions", "/embeddings", "/multimodal-embedding")
_DEADLINE = "enrich_pipeline.deadline"
_GZIP_MAGIC = b"\x1f\x8b"


class AnswerTooLarge(Exception):  # noqa: N818 - named for what happened, as the SDK's are
    """The answer went past ``DASHSCOPE_MAX_ANSWER_BYTES``; the rest was not read."""

    def __init__(self, limit: int, how: str) -> None:
        super().__init__(
            f"the answer {how} more than DASHSCOPE_MAX_ANSWER_BYTES={limit} bytes; the rest "
            "was not read"
        )
        self.limit = limit


class ForeignAnswer(ValueError):  # noqa: N818
    """A model call's answer is not the OpenAI-compatible API's (a web page, a JSON of another
    shape); the message quotes what came back."""


class _Inflater:
    """A gzip (one member or several) or deflate (zlib-wrapped or raw) body, inflated in pieces
    of at most ``PIECE`` bytes."""

    def __init__(self, coding: str) -> None:
        self.gzip = coding in ("gzip", "x-gzip")
        self.coding = coding
        self._raw_deflate = False
        self._fresh = True
        self._z = self._new()

    def _new(self) -> Any:
        if self.gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zlib.decompressobj(-zlib.MAX_WBITS if self._raw_deflate else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            try:
                piece = self._z.decompress(data, PIECE)
            except zlib.error as exc:
                if not self.gzip and self._fresh and not self._raw_deflate:
                    # "deflate" is sent both zlib-wrapped (RFC 9110) and raw (old servers).
                    self._raw_deflate = True
                    self._z = self._new()
                    continue
                raise ValueError(f"the answer's {self.coding} body is corrupt: {exc}") from exc
            self._fresh = False
            if piece:
                yield piece
            data = self._z.unconsumed_tail
            if not data and len(piece) == PIECE:
                # The output was cut at PIECE with all input taken: more may be pending.
                yield from self._drain()
            if not data and self.gzip and self._z.eof and self._z.unused_data[:2] == _GZIP_MAGIC:
                data = self._z.unused_data  # the next member of a multi-member gzip
                self._z = self._new()

    def _drain(self) -> Iterator[bytes]:
        while True:
            piece = self._z.decompress(b"", PIECE)
            if piece:
                yield piece
            if len(piece) < PIECE:
                return


def _coding(response: Any) -> str | None:
    """The one content coding to undo ("" for none); None for codings not asked for."""
    values = response.headers.get_list("content-encoding", split_commas=True)
    codings = [v.strip().lower() for v in values if v.strip().lower() not in ("", "identity")]
    if not codings:
        return ""
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return codings[0]
    return None


def _is_json(response: Any) -> bool:
    content_type = response.headers.get("content-type")
    if content_type is None:
        return True  # the SDK tries JSON then; nothing says it is not
    return content_type.split(";")[0].strip().lower().endswith("json")


class _BoundedBody(_http.SyncByteStream):
    """A response body read under the size cap and the deadline (see the module docstring)."""

    def __init__(
        self,
        response: Any,
        *,
        limit: int | None,
        deadline: float | None,
        foreign: bool,
    ) -> None:
        self._inner = response.stream
        self._request = response.request
        self._status = response.status_code
        self._type = response.headers.get("content-type", "")
        self._coding = _coding(response)
        self._length = response.headers.get("content-length")
        self._limit = limit
        self._deadline = deadline
        self._foreign = foreign

    def _check(self, count: int, how: str) -> None:
        if self._limit is not None and count > self._limit:
            raise AnswerTooLarge(self._limit, how)

    def _on_time(self) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise _http.ReadTimeout(
                "the answer took longer than the call's total deadline", request=self._request
            )

    def __iter__(self) -> Iterator[bytes]:
        if self._coding is None:
            raise ValueError("the answer uses a content coding the client did not ask for")
        if self._length is not None and self._length.isdigit():
            self._check(int(self._length), "announced")
        if self._foreign:
            raise ForeignAnswer(f"HTTP {self._status} {self._type}: {self._snippet()}".strip())
        inflater = _Inflater(self._coding) if self._coding else None
        received = produced = 0
        for chunk in self._inner:
            received += len(chunk)
            self._check(received, "sent")
            for piece in inflater.feed(chunk) if inflater else (chunk,):
                produced += len(piece)
                self._check(produced, "inflated to")
                yield piece
                self._on_time()
            self._on_time()

    def _snippet(self) -> str:
        head = b""
        received = 0
        inflater = _Inflater(self._coding) if self._coding else None
        for chunk in self._inner:
            received += len(chunk)
            self._check(received, "sent")
            self._on_time()
            for piece in inflater.feed(chunk) if inflater else (chunk,):
                head += piece[: SNIPPET - len(head)]
                if len(head) >= SNIPPET:
                    break
            if len(head) >= SNIPPET:
                break
        return " ".join(head.decode("utf-8", errors="replace").split())

    def close(self) -> None:
        self._inner.close()


def is_file_content(path: str) -> bool:
    """A Batch API result file download (``/files/{id}/content``)."""
    return path.rstrip("/").endswith("/content") and "/files/" in path


class _Bounds:
    """The client's event hooks: each request asks only for the codings read here, and model
    calls get their total deadline; each response's body is replaced by a bounded one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def on_request(self, request: Any) -> None:
        request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        total = (request.extensions.get("timeout") or {}).get("read")
        if total and request.url.path.endswith(MODEL_PATHS):
            request.extensions[_DEADLINE] = time.monotonic() + float(total)

    def on_response(self, response: Any) -> None:
        request = response.request
        model_call = request.url.path.endswith(MODEL_PATHS)
        response.stream = _BoundedBody(
            response,
            limit=None if is_file_content(request.url.path) else self.limit,
            deadline=request.extensions.get(_DEADLINE),
            foreign=model_call and response.is_success and not _is_json(response),
        )
        # Inflated here: the HTTP library must not inflate it again.
        for name in ("content-encoding", "content-length"):
            if name in response.headers:
                del response.headers[name]


def http_client(timeout: float, max_answer_bytes: int, **options: Any) -> Any:
    """The SDK's default HTTP client (same limits, redirects), whose answers are read under the
    size cap and, for model calls, their total deadline; ``options`` go to the client."""
    bounds = _Bounds(max_answer_bytes)
    return openai.DefaultHttpxClient(
        timeout=timeout,
        event_hooks={"request": [bounds.on_request], "response": [bounds.on_response]},
        **options,
    )


def bounded_lines(chunks: Iterable[bytes], *, max_line_bytes: int, max_lines: int) -> list[str]:
    """The lines of a streamed file: a line longer than ``max_line_bytes`` is skipped without
    being held (its answer is then missing, as if the provider had not sent it), and nothing is
    read past ``max_lines`` lines (a legitimate result file has one line per request)."""
    lines: list[str] = []
    if max_lines <= 0:
        return lines
    current = bytearray()
    skipping = False
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            part = chunk[start:] if end < 0 else chunk[start:end]
            if not skipping:
                current += part
                if len(current) > max_line_bytes:
                    current.clear()
                    skipping = True
            if end < 0:
                break
            if not skipping and current.strip():
                lines.append(current.decode("utf-8", errors="replace"))
                if len(lines) >= max_lines:
                    return lines
            current.clear()
            skipping = False
            start = end + 1
    if not skipping and current.strip() and len(lines) < max_lines:
        lines.append(current.decode("utf-8", errors="replace"))
    return lines
