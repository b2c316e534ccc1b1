"""How answers are read (``providers/transport.py``) and judged (``providers/errors.py``):
within the size cap as sent and as inflated, within the deadline while inflating, only in the
codings asked for, and a model call's web page told apart from the API's answer.

The HTTP client is the production one over an in-memory transport; bodies are generated as
they are read, so a bomb that would inflate to hundreds of MiB is never built.
"""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from enrich_pipeline.providers.base import SCOPE_SERVICE, FatalProviderError
from enrich_pipeline.providers.errors import CallContext, classify
from enrich_pipeline.providers.transport import (
    ACCEPT_ENCODING,
    PIECE,
    AnswerTooLarge,
    ForeignAnswer,
    bounded_lines,
    http_client,
)

try:  # the HTTP client the SDK is built on (httpx2 from openai 3 on)
    import httpx2 as http
except ImportError:  # pragma: no cover
    import httpx as http  # type: ignore[no-redef]

CAP = 256 * 1024
CHAT = "http://provider.test/v1/chat/completions"
FILE = "http://provider.test/v1/files/file-1/content"
VISION = CallContext(kind="vision", model="qwen3-vl-plus", base_url="http://provider.test/v1")


def _segments() -> tuple[bytes, bytes]:
    block = b" " * (1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    return head, z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)


HEAD, SEGMENT = _segments()  # each 1 MiB of spaces, about 1 KB


def bomb(inflated: int, pause: float = 0.0) -> Iterator[bytes]:
    """A gzip body of ``inflated`` spaces, about 1/1000 of that on the wire, made as read."""
    yield HEAD
    for _ in range(inflated // (1 << 20) - 1):
        if pause:
            time.sleep(pause)
        yield SEGMENT


def body(*chunks: bytes) -> Iterator[bytes]:
    """A streamed body, as a real transport gives it (bytes would be read at once)."""
    yield from chunks


def client(
    respond: Callable[[Any], Any], *, cap: int = CAP, timeout: float = 30.0
) -> tuple[Any, list[Any]]:
    seen: list[Any] = []

    def handler(request: Any) -> Any:
        seen.append(request)
        return respond(request)

    return http_client(timeout, cap, transport=http.MockTransport(handler)), seen


def test_a_gzip_bomb_stops_at_the_cap_holding_no_more_than_it() -> None:
    answers, seen = client(
        lambda r: http.Response(200, headers={"content-encoding": "gzip"}, content=bomb(256 << 20))
    )
    tracemalloc.start()
    try:
        with pytest.raises(AnswerTooLarge, match="inflated to more than") as info:
            answers.post(CHAT, json={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.limit == CAP
    # The body read so far, one inflation piece past the cap, and the SDK's bookkeeping.
    assert peak < 4 * CAP + 4 * PIECE, peak
    assert seen[0].headers["accept-encoding"] == ACCEPT_ENCODING


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("gzip", lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:])),  # two members
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as old servers send it
        ("identity", lambda b: b),
    ],
)
def test_an_answer_within_the_cap_is_read_whole_in_every_coding(
    encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    answer = b'{"text": "' + b"caption " * 20_000 + b'"}'
    assert PIECE < len(answer) < CAP
    answers, _ = client(
        lambda r: http.Response(
            200, headers={"content-encoding": encoding}, content=body(encode(answer))
        )
    )
    response = answers.post(CHAT, json={})
    assert response.content == answer
    assert "content-encoding" not in response.headers


def test_an_answer_sent_larger_than_the_cap_is_refused() -> None:
    announced, _ = client(
        lambda r: http.Response(
            200, headers={"content-length": str(CAP + 1)}, content=body(b"x" * (CAP + 1))
        )
    )
    with pytest.raises(AnswerTooLarge, match="announced more than"):
        announced.post(CHAT, json={})
    chunked, _ = client(lambda r: http.Response(200, content=iter([b"x" * PIECE] * 8)))
    with pytest.raises(AnswerTooLarge, match="sent more than"):
        chunked.post(CHAT, json={})


def test_the_deadline_ends_an_inflation_that_stays_under_the_cap() -> None:
    answers, _ = client(
        lambda r: http.Response(
            200, headers={"content-encoding": "gzip"}, content=bomb(1 << 30, pause=0.005)
        ),
        cap=1 << 30,
        timeout=0.3,
    )
    started = time.monotonic()
    with pytest.raises(http.ReadTimeout):
        answers.post(CHAT, json={})
    assert time.monotonic() - started < 10, "ended at the deadline, not after 1 GiB"


def test_a_coding_not_asked_for_is_refused() -> None:
    answers, _ = client(
        lambda r: http.Response(200, headers={"content-encoding": "br"}, content=body(b"{}"))
    )
    with pytest.raises(ValueError, match="did not ask for"):
        answers.post(CHAT, json={})
    nested, _ = client(
        lambda r: http.Response(
            200,
            headers={"content-encoding": "gzip, gzip"},
            content=body(gzip.compress(gzip.compress(b"{}"))),
        )
    )
    with pytest.raises(ValueError, match="did not ask for"):
        nested.post(CHAT, json={})


def test_a_web_page_answering_a_model_call_is_a_foreign_answer_quoting_it() -> None:
    page = b"<html><head><title>Welcome to nginx!</title></head>" + b" " * 10_000
    answers, _ = client(
        lambda r: http.Response(200, headers={"content-type": "text/html"}, content=body(page))
    )
    with pytest.raises(ForeignAnswer, match="HTTP 200 text/html: <html><head><title>Welcome"):
        answers.post(CHAT, json={})
    # Not a model call (a Batch API file): the body is read as it is.
    assert answers.get(FILE).content == page


def test_a_result_file_is_read_line_by_line_each_line_capped() -> None:
    chunks = [b'{"a": 1}\n{"b":', b" 2}\n" + b"y" * 50, b"y" * 50 + b"\n\n{", b'"c": 3}\n{"d": 4}']
    assert bounded_lines(chunks, max_line_bytes=60, max_lines=10) == [
        '{"a": 1}',
        '{"b": 2}',
        '{"c": 3}',
        '{"d": 4}',
    ]
    assert bounded_lines(chunks, max_line_bytes=60, max_lines=2) == ['{"a": 1}', '{"b": 2}']

    def endless() -> Iterator[bytes]:
        while True:
            yield b'{"spam": 1}\n'

    assert len(bounded_lines(endless(), max_line_bytes=60, max_lines=3)) == 3


def test_a_result_file_has_no_total_cap() -> None:
    lines = b"".join(b'{"line": %d}\n' % n for n in range(CAP // 10))
    assert len(lines) > CAP
    answers, _ = client(lambda r: http.Response(200, content=iter([lines])))
    with answers.stream("GET", FILE) as response:
        read = bounded_lines(response.iter_bytes(), max_line_bytes=100, max_lines=10**6)
    assert len(read) == CAP // 10


# --- what the classification table makes of them ----------------------------------------------


def test_an_answer_too_large_is_a_transient_service_error() -> None:
    error = classify(AnswerTooLarge(CAP, "inflated to"), VISION, endpoint_proven=False)
    assert (error.code, error.scope, error.permanent) == ("answer_too_large", SCOPE_SERVICE, False)
    assert "DASHSCOPE_MAX_ANSWER_BYTES" in str(error)


def test_a_foreign_answer_stops_the_run_until_the_endpoint_answered_properly() -> None:
    foreign = ForeignAnswer("HTTP 200 text/html: <html>Welcome to nginx!")
    stop = classify(foreign, VISION, endpoint_proven=False)
    assert isinstance(stop, FatalProviderError) and stop.code == "wrong_base_url"
    assert "DASHSCOPE_BASE_URL (http://provider.test/v1)" in str(stop)
    assert "Welcome to nginx!" in str(stop)
    hiccup = classify(foreign, VISION, endpoint_proven=True)
    assert not isinstance(hiccup, FatalProviderError)
    assert (hiccup.code, hiccup.scope, hiccup.permanent) == (
        "malformed_response",
        SCOPE_SERVICE,
        False,
    )


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_path_or_method_the_server_does_not_have_names_the_base_url(status: int) -> None:
    response = http.Response(status, request=http.Request("POST", CHAT), text="<html></html>")
    error = openai.APIStatusError(f"Error code: {status}", response=response, body=None)
    stop = classify(error, VISION)
    assert isinstance(stop, FatalProviderError) and stop.code == "wrong_base_url"
    assert "DASHSCOPE_BASE_URL" in str(stop) and "mistyped" in str(stop)
