"""The faults the stand-in serves: injected into the next requests, or by rule, and the hostile
content some of them put in a successful answer.

Every documented error body (see ``errors.ERRORS``) is a fault, and so is what the network can
do: ``timeout`` (the request hangs), ``reset`` (the connection is dropped) and ``malformed`` (a
truncated JSON body).

Hostile-provider modes are not DashScope behaviour but what any provider can do to a client:
``trickle`` (a 200 sent one byte per ``trickle_interval`` seconds), ``nan_embedding`` /
``inf_embedding`` / ``short_embedding``, structured answers that are cut short or carry
unknown tags (``ANSWER_FAULTS``), and captions with NUL, a lone surrogate, 200,000
characters, only invisible characters, or control characters; answers too large to hold and
another server's answers (``foreign``).

Usage faults (``USAGE_FAULTS``): a good answer whose ``usage`` is ``{}``, or whose counts are
null, negative, 1e300 or text.

With ``StandIn.echo_key`` on, every error message (and the ``malformed`` body) repeats the
credentials the request carried (``echoed``), as debugging gateways and careless providers do.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from enrich_pipeline_tests.standin.errors import ERRORS
from enrich_pipeline_tests.standin.foreign import FOREIGN_FAULTS, SIZE_FAULTS

# "batch": faults for batch lines only ("any" never reaches them; rules by color or text do).
ENDPOINTS = ("chat", "embeddings", "batch", "any")
ENDPOINTS += ("multimodal",)  # the native multimodal embedding endpoint (image vectors)
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
# Structured answers (json_object / json_schema) that break the contract: the answer JSON cut in
# half ("malformed_answer"), and tags outside every vocabulary ("unknown_tags"). A text answer
# is served unchanged (see ``structured.answer_content``).
ANSWER_FAULTS = frozenset({"malformed_answer", "unknown_tags"})
FAULTS = frozenset(
    {*ERRORS, "timeout", "reset", "malformed", "trickle", *CAPTION_FAULTS, *EMBEDDING_FAULTS}
    | ANSWER_FAULTS
    | SIZE_FAULTS  # gzip_bomb, huge_answer
    | FOREIGN_FAULTS  # not_implemented, not_allowed, html_page, foreign_json
)
# A good answer (chat or embeddings) whose `usage` lies: {} ("usage_empty"), null counts,
# negative counts, 1e300, counts as text. The stand-in's own quota is charged the true counts.
USAGE_FAULTS = frozenset(
    {"usage_empty", "usage_null", "usage_negative", "usage_huge", "usage_text"}
)
FAULTS |= USAGE_FAULTS
HUGE_CAPTION_CHARS = 200_000


@dataclass
class Injected:
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
    endpoint: str = "any"  # a rule for one endpoint only (e.g. "multimodal": image vectors)


def applies(fault: str, kind: str) -> bool:
    """Whether `fault` can be served on a `kind` ("chat" or "embeddings") request: hostile
    captions only come back from chat, hostile vectors only from embeddings."""
    if fault in CAPTION_FAULTS or fault in ANSWER_FAULTS:
        return kind == "chat"
    if fault in EMBEDDING_FAULTS:
        return kind in ("embeddings", "multimodal")
    return True


class FaultPlan:
    """The faults waiting to be served: injected ones, spent in order, and rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the server's threads and the test's thread share it
        self._injected: list[Injected] = []
        self._rules: list[_Rule] = []

    def inject(self, fault: str, times: int, endpoint: str, retry_after: float | None) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        if endpoint in ("chat", "embeddings", "multimodal") and not applies(fault, endpoint):
            raise ValueError(f"{fault!r} cannot be served on {endpoint}")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._injected.append(Injected(fault, times, endpoint, retry_after))

    def add_rule(
        self,
        fault: str,
        color: tuple[int, int, int] | None,
        tolerance: int,
        text_contains: str | None,
        times: int | None,
        endpoint: str = "any",
    ) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if color is None and text_contains is None:
            raise ValueError("a rule needs color= or text_contains=")
        with self._lock:
            self._rules.append(_Rule(fault, color, tolerance, text_contains, times, endpoint))

    def clear(self) -> None:
        with self._lock:
            self._injected.clear()
            self._rules.clear()

    def take(self, endpoint: str, kind: str) -> Injected | None:
        """The next injected fault aimed at `endpoint` that a `kind` request can carry; a
        hostile caption waits for a chat request rather than being spent on an embedding."""
        with self._lock:
            for item in self._injected:
                aimed = item.endpoint == endpoint or (
                    item.endpoint == "any" and endpoint != "batch"
                )
                if aimed and applies(item.fault, kind):
                    item.remaining -= 1
                    if item.remaining <= 0:
                        self._injected.remove(item)
                    return item
        return None

    def match(
        self, means: list[tuple[float, float, float]], texts: list[str], kind: str
    ) -> str | None:
        """The fault of the first rule this request's image colours or texts hit."""
        with self._lock:
            for rule in self._rules:
                if not applies(rule.fault, kind) or rule.endpoint not in ("any", kind):
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


# Zero-width and other invisible characters with no letter among them: `str.strip()` leaves
# U+200B, U+2060 and U+FEFF in place, so a naive emptiness check passes this as a caption.
_BLANK_CAPTION = "\u200b \u200b\u2060\ufeff\t\u3000\u200b\n\u00a0\u200b"
# Terminal escapes (clear screen, red), BEL, backspace, DEL, CR, form feed, vertical tab and the
# C1 controls NEL and CSI: what breaks logs, terminals and CSV exports.
_CONTROL_PREFIX = "\x1b[2J\x1b[31m"
_CONTROL_SUFFIX = "\x07\x08\x7f\r\x0c\x0b\x85\x9b"


def hostile_caption(fault: str | None, caption: str) -> str:
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


def hostile_vector(fault: str | None, vector: list[float]) -> list[float]:
    """`vector` as a hostile provider might send it for an embedding fault."""
    if fault == "nan_embedding":
        return [math.nan, *vector[1:]]
    if fault == "inf_embedding":
        return [math.inf, *vector[1:-1], -math.inf]
    if fault == "short_embedding":
        return vector[: len(vector) // 2]
    return vector


_HOSTILE_COUNTS = {"usage_null": None, "usage_negative": -1_000_000, "usage_huge": 1e300}


def hostile_usage(fault: str | None, answer: dict[str, Any]) -> dict[str, Any]:
    """`answer` with its `usage` as a hostile provider might send it for a usage fault."""
    if fault not in USAGE_FAULTS:
        return answer
    usage = answer.get("usage") or {}
    if fault == "usage_empty":
        lied: dict[str, Any] = {}
    elif fault == "usage_text":
        lied = {k: "many" for k in usage}
    else:
        lied = {k: _HOSTILE_COUNTS[fault] for k in usage}
    return {**answer, "usage": lied}


def echoed(message: str, authorization: str | None, url: str = "") -> str:
    """``message`` as a provider that repeats what it was sent words it: the Authorization
    header whole and cut short, the key URL-encoded, JSON-escaped (slashes too, as PHP and some
    gateways write them) and masked the way providers print keys (``sk-...abcd``, the prefix and
    the last characters), and the request URL with its query."""
    header = authorization or ""
    key = header.partition(" ")[2] or header
    head = key[: key.find("-") + 1] if "-" in key[:8] else key[:3]
    forms = [
        f"Authorization: {header}",
        f"header={json.dumps(header)[1:-1].replace('/', chr(92) + '/')}",
        f"Bearer {key[:12]}...",
        f"api_key={quote(key, safe='')}",
        f"key {head}...{key[-4:]}",
        f"key {head}****{key[-6:]}",
        f"key ending {key[-8:]}",
        f"url={url}",
    ]
    return f"{message} [request: {'; '.join(forms)}]"
