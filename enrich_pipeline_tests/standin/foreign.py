"""Answers no DashScope endpoint sends: ones too large for a client to hold, and another
server's (what a mistyped base URL reaches). Hostile-provider and setup faults, not DashScope
behaviour (see ``faults``).

- ``gzip_bomb``: a 200 sent with ``Content-Encoding: gzip`` whose ~1 MB body inflates to 1 GiB of
  JSON whitespace, generated as it is sent (the stand-in never holds more than 1 MiB of it);
- ``huge_answer``: a valid chat completion of 64 MiB (its caption), sent chunked, with no
  Content-Length to warn the client;
- ``not_implemented`` (501) and ``not_allowed`` (405): a web server's HTML error pages for a
  POST it does not take;
- ``html_page``: a web server's 200 welcome page;
- ``foreign_json``: a 200 JSON of another API.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from starlette.responses import Response, StreamingResponse

BOMB_INFLATED = 1 << 30
HUGE_ANSWER_BYTES = 64 << 20
_BLOCK = 1 << 20


def _gzip_bomb() -> Iterator[bytes]:
    block = b" " * _BLOCK
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    yield z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)  # with the gzip header
    # A full flush resets the compressor, so every later block compresses to the same ~1 KB:
    # computed once, sent 1023 times.
    segment = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    for _ in range(BOMB_INFLATED // _BLOCK - 1):
        yield segment
    crc = 0
    for _ in range(BOMB_INFLATED // _BLOCK):
        crc = zlib.crc32(block, crc)
    # An empty final block, then the gzip trailer: CRC-32 and size mod 2**32.
    yield b"\x03\x00" + struct.pack("<II", crc, BOMB_INFLATED & 0xFFFFFFFF)


def _huge_answer() -> Iterator[bytes]:
    yield (
        b'{"id":"chatcmpl-huge","object":"chat.completion","created":0,"model":"qwen3-vl-plus",'
        b'"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"'
    )
    piece = b"a very long caption " * (_BLOCK // 20)
    for _ in range(HUGE_ANSWER_BYTES // len(piece)):
        yield piece
    yield b'"}}],"usage":{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}'


def _page(title: str) -> str:
    return f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center>"


SIZE_FAULTS = frozenset({"gzip_bomb", "huge_answer"})
FOREIGN_FAULTS = frozenset({"not_implemented", "not_allowed", "html_page", "foreign_json"})


def foreign_reply(fault: str, headers: dict[str, str]) -> Response:
    """The response of a size or foreign fault."""
    if fault == "gzip_bomb":
        return StreamingResponse(
            _gzip_bomb(), 200, headers | {"content-encoding": "gzip"}, "application/json"
        )
    if fault == "huge_answer":
        return StreamingResponse(_huge_answer(), 200, headers, "application/json")
    if fault == "not_implemented":
        return Response(_page("501 Not Implemented"), 501, media_type="text/html")
    if fault == "not_allowed":
        return Response(_page("405 Not Allowed"), 405, media_type="text/html")
    if fault == "html_page":
        return Response(_page("Welcome to nginx!"), 200, media_type="text/html")
    if fault == "foreign_json":
        body = b'{"status":"ok","message":"gateway is up"}'
        return Response(body, 200, headers, "application/json")
    raise ValueError(f"not a size or foreign fault: {fault!r}")
