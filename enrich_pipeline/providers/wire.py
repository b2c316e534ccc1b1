"""The wire format of caption requests: the online chat body (in the run's answer format, see
``enrichment/structured.py`` and ``formats.py``), the Batch API's JSONL lines that carry the
same body, and the reading of a batch's answer lines with the online meaning."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import openai

from enrich_pipeline.enrichment.structured import (
    JSON_OBJECT,
    JSON_SCHEMA,
    SCHEMA_NAME,
    TEXT,
    Answer,
    MalformedAnswer,
    Question,
    read_answer,
)
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.enrichment.text import clean_caption
from enrich_pipeline.providers.answers import (
    answer_text,
    malformed_answer,
    read_usage,
    unusable_answer,
)
from enrich_pipeline.providers.base import ProviderError
from enrich_pipeline.providers.errors import classify, classify_answer
from enrich_pipeline.providers.formats import thinking_off
from enrich_pipeline.settings import DashScopeSettings

try:  # the HTTP library of the installed openai SDK (httpx2 from openai 3, httpx before)
    import httpx2 as _http
except ImportError:  # pragma: no cover - older SDKs
    import httpx as _http  # type: ignore[no-redef]

CHAT_ENDPOINT = "/v1/chat/completions"


# Room for the tags and the JSON around the captions: two lists of a few short keys.
STRUCTURE_TOKENS = 120
MAX_TOKENS = 8192  # DashScope's max_tokens cap for the Qwen-VL models (settings' upper bound)


def question_of(
    settings: DashScopeSettings, vocabulary: TagVocabulary = DEFAULT_VOCABULARY
) -> Question:
    """What every vision call of these settings asks."""
    return Question(settings.prompt, settings.languages, vocabulary)


def answer_max_tokens(settings: DashScopeSettings, answer_format: str, languages: int) -> int:
    """``max_tokens`` of an answer: the caption budget (``max_caption_tokens``) per language,
    plus room for the tags and the JSON in a structured answer (a cut-off JSON answer is
    malformed)."""
    tokens = settings.max_caption_tokens * max(1, languages)
    if answer_format != TEXT:
        tokens += STRUCTURE_TOKENS
    return min(tokens, MAX_TOKENS)


def response_format(question: Question, answer_format: str) -> dict[str, Any] | None:
    """The ``response_format`` of ``answer_format`` (None for text). ``strict`` inside
    ``json_schema``, as OpenAI places it and as the newer copies of DashScope's structured
    output page show it (https://www.alibabacloud.com/help/en/model-studio/qwen-structured-output,
    Feb 18 2026)."""
    if answer_format == JSON_SCHEMA:
        return {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": question.schema()},
        }
    if answer_format == JSON_OBJECT:
        return {"type": "json_object"}
    return None


def caption_request_body(
    settings: DashScopeSettings,
    data_url: str,
    question: Question | None = None,
    answer_format: str = TEXT,
) -> dict[str, Any]:
    """The chat request of one image's answer, the same online and in a batch line.

    ``enable_thinking`` is a top-level body field: the SDK's ``extra_body`` merges it there,
    and a batch line's body is the request body itself."""
    question = question or question_of(settings)
    body: dict[str, Any] = {
        "model": settings.vision_model,
        "max_tokens": answer_max_tokens(settings, answer_format, len(question.languages)),
        "messages": question.messages(answer_format, data_url),
    }
    fmt = response_format(question, answer_format)
    if fmt is not None:
        body["response_format"] = fmt
    if thinking_off(settings.vision_model, answer_format):
        body["enable_thinking"] = False
    return body


def sdk_arguments(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as ``chat.completions.create`` takes it: fields the SDK does not know go in
    ``extra_body`` (DashScope's ``enable_thinking``)."""
    known = {k: v for k, v in body.items() if k != "enable_thinking"}
    if "enable_thinking" in body:
        known["extra_body"] = {"enable_thinking": body["enable_thinking"]}
    return known


def batch_line(custom_id: str, body: dict[str, Any], url: str = CHAT_ENDPOINT) -> bytes:
    """One JSONL line of a batch input file."""
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return (json.dumps(line, separators=(",", ":")) + "\n").encode()


_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def status_error(status: int, body: Any, url: str) -> openai.APIStatusError:
    """The SDK exception a live response with this status and body raises (same dispatch as
    the SDK's), so that a batch line is classified by exactly the online policy."""
    data = body.get("error", body) if isinstance(body, dict) else body
    kind = (
        openai.InternalServerError
        if status >= 500
        else _STATUS_ERRORS.get(status, openai.APIStatusError)
    )
    response = _http.Response(status, request=_http.Request("POST", url))
    return kind(f"Error code: {status} - {body}", response=response, body=data)


@dataclass(frozen=True)
class LineResult:
    answer: Answer | None = None
    error: ProviderError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_known: bool = True  # False: the line's usage gave no believable counts

    @property
    def caption(self) -> str | None:
        """The answer's first caption, if the line answered."""
        return None if self.answer is None else self.answer.caption


def parse_line(
    obj: dict[str, Any],
    url: str,
    answer_format: str = TEXT,
    languages: tuple[str, ...] = ("en",),
) -> LineResult:
    """One output or error line, with the online path's meaning: an answer read as online
    (``structured.read_answer``: a malformed one is the row's ``malformed_answer``), or an
    error classified by the same table as online answers (``errors.classify``): moderation and
    bad images permanent, 429/5xx transient, account/key/model problems a stop."""
    response = obj.get("response") if isinstance(obj.get("response"), dict) else {}
    status = response.get("status_code")
    body = response.get("body")
    error = obj.get("error") if isinstance(obj.get("error"), dict) else None
    if status == 200 and isinstance(body, dict):
        choices = body.get("choices")
        if not isinstance(choices, list):
            return LineResult(
                error=ProviderError(
                    "malformed_response", "the batch answer has no choices", permanent=False
                )
            )
        raw = answer_text(body)
        text = clean_caption(raw or "")
        counts, known = read_usage(body.get("usage"), ("prompt_tokens", "completion_tokens"))
        if not text:
            return LineResult(error=unusable_answer(raw), **counts, tokens_known=known)
        try:
            answer = read_answer(raw or "", answer_format, languages)
        except MalformedAnswer as exc:
            return LineResult(error=malformed_answer(exc), **counts, tokens_known=known)
        return LineResult(answer=answer, **counts, tokens_known=known)
    if isinstance(status, int) and status >= 400:
        if not isinstance(body, dict) or "error" not in body:
            body = {"error": error or {"message": str(body)}}
        return LineResult(error=classify(status_error(status, body, url)))
    if error is not None:
        code = str(error.get("code") or "batch_line_error")
        if code.lower().startswith("batch_"):  # batch_expired, batch_cancelled, ...
            return LineResult(
                error=ProviderError(
                    code.lower(), str(error.get("message") or code), permanent=False
                )
            )
        # Only a code (native names such as DataInspectionFailed, Arrearage, Throttling.*): the
        # same table, matched on the code and the message alone.
        codes = {code, str(error.get("type") or "")} - {""}
        return LineResult(error=classify_answer(None, codes, str(error.get("message") or "")))
    return LineResult(
        error=ProviderError("malformed_response", "unreadable batch answer line", permanent=False)
    )


def parse_results(
    texts: list[str],
    url: str,
    answer_format: str = TEXT,
    languages: tuple[str, ...] = ("en",),
) -> dict[str, LineResult]:
    """Output and error files, by ``custom_id``; an answer beats an error for the same id."""
    results: dict[str, LineResult] = {}
    for text in texts:
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                continue
            line = parse_line(obj, url, answer_format, languages)
            known = results.get(obj["custom_id"])
            if known is None or (known.answer is None and line.answer is not None):
                results[obj["custom_id"]] = line
    return results
