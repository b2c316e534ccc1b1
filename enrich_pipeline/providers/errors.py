"""The classification table: what each provider failure means for the row and for the run.

Every failure of an online call or of a Batch API answer line is mapped here, and only here, by
HTTP status plus ``error.code`` / ``type`` / message, to one verdict:

- a **stop** (``FatalProviderError``): the account, the key, the model or the request itself is
  wrong, so every row would fail alike. The run stops at once with one line saying what to fix;
  no row is charged, the claims are released (CLI exit 3, Dagster ``Failure``);
- **permanent for the row** (moderation, an image the service cannot fetch or decode): recorded
  once, never retried;
- **transient**: retried with backoff. Throttling (scope ``throttle``) is never the row's fault;
  service errors (5xx, timeouts, connections, unreadable answers; scope ``service``) are the
  row's only while the provider answers most other calls (``stages.settle_blame``), and past
  the run's patience they stop it (``health.Governor``, ``ProviderUnavailable``, exit 4). A paid
  answer without a caption (blank) is the row's, not the service's: ``answers.py``.

Sources, cited per row below (the bodies the stand-in serves come from the same pages):

- [E] https://help.aliyun.com/en/model-studio/error-code (and its Qwen Cloud twin
  https://docs.qwencloud.com/api-reference/preparation/error-messages): codes, messages, causes
- [S] https://help.aliyun.com/en/model-studio/error-code-start: status -> code summary
- [R] https://www.alibabacloud.com/help/en/model-studio/rate-limit: which 429 message is which
- [H] RFC 9110 (HTTP semantics), https://www.rfc-editor.org/rfc/rfc9110

Answers that are not the API's at all are judged here too: one over ``DASHSCOPE_MAX_ANSWER_BYTES``
(``transport.AnswerTooLarge``) and one that is not JSON of the API's shape
(``transport.ForeignAnswer``); see ``classify``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import openai

from enrich_pipeline.enrichment.text import clean_message
from enrich_pipeline.providers.base import (
    SCOPE_ROW,
    SCOPE_SERVICE,
    SCOPE_THROTTLE,
    FatalProviderError,
    ProviderError,
)
from enrich_pipeline.providers.transport import AnswerTooLarge, ForeignAnswer
from enrich_pipeline.redaction import scrub_exception, scrub_secrets

# Verdicts. The first six stop the run; the rest are per call.
ACCOUNT = "account"  # arrears, unpaid bills: fix billing
KEY = "key"  # the API key (or its region) is wrong
MODEL_DENIED = "model_denied"  # the account/workspace may not use this model
MODEL_MISSING = "model_missing"  # no such model (here)
WRONG_URL = "wrong_url"  # the base URL answers, but not as an OpenAI-compatible API
NO_IMAGES = "no_images"  # the model does not take images
REQUEST = "request"  # the request itself is refused, whatever the image
MODERATION = "moderation"  # permanent for the row
IMAGE = "image"  # permanent for the row
THROTTLE = "throttle"  # transient, never the row's
SERVICE = "service"  # transient, the row's only if the provider otherwise answers
ROW_REJECTED = "row_rejected"  # any other 4xx: permanent for the row
FORMAT = "format"  # the model does not take the response_format: the run steps down (formats.py)
FORMAT_REFUSED = "format_refused"  # the error code of that verdict
STOPS = frozenset({ACCOUNT, KEY, MODEL_DENIED, MODEL_MISSING, WRONG_URL, NO_IMAGES, REQUEST})


@dataclass(frozen=True)
class Rule:
    """One row of the table: a status (None: any), codes (``error.code`` or ``type``, compared
    case-insensitively; empty: any) and a message pattern (None: any). With no status known
    (a batch error line that carries only a code), a rule must match by code or message."""

    verdict: str
    statuses: frozenset[int] | None = None
    codes: frozenset[str] = frozenset()
    message: re.Pattern[str] | None = None

    def matches(self, status: int | None, codes: set[str], message: str) -> bool:
        if status is not None and self.statuses is not None and status not in self.statuses:
            return False
        if status is None and not self.codes and self.message is None:
            return False
        if self.codes and not (self.codes & codes):
            return False
        return self.message is None or bool(self.message.search(message))


def _rule(
    verdict: str,
    statuses: tuple[int, ...] | None = None,
    codes: tuple[str, ...] = (),
    message: str | None = None,
) -> Rule:
    return Rule(
        verdict,
        frozenset(statuses) if statuses is not None else None,
        frozenset(c.lower() for c in codes),
        re.compile(message, re.I) if message else None,
    )


_5XX = tuple(range(500, 600))

# First match wins.
TABLE: tuple[Rule, ...] = (
    # 400 Arrearage "Access denied, please make sure your account is in good standing." [E];
    # compatible body observed: https://github.com/hsliuping/TradingAgents-CN/issues/170
    _rule(ACCOUNT, (400,), ("Arrearage",)),
    # 429 CommodityNotPurchased / PrepaidBillOverdue / PostpaidBillOverdue: billing, not rate
    # limits, though sent as 429 [E].
    _rule(ACCOUNT, (429,), ("CommodityNotPurchased", "PrepaidBillOverdue", "PostpaidBillOverdue")),
    # 401 InvalidApiKey / invalid_api_key "Incorrect API key provided." [S]: "Check that the API
    # key is valid and that the API key, region, and Base URL match." Every 401 means the key.
    _rule(KEY, (401,)),
    _rule(KEY, None, ("InvalidApiKey", "invalid_api_key")),
    # 403 Model.AccessDenied "Model access denied.", AccessDenied.Unpurchased "Access to model
    # denied.", AllocationQuota.FreeTierOnly, Workspace.AccessDenied, AccessDenied [E]; 403 is
    # also "free quota exhausted" (https://help.aliyun.com/zh/model-studio/rate-limit). Observed:
    # https://github.com/langgenius/dify/issues/13769, https://github.com/QwenLM/qwen-code/issues/9605
    _rule(MODEL_DENIED, (403,)),
    _rule(
        MODEL_DENIED,
        None,
        ("Model.AccessDenied", "AccessDenied.Unpurchased", "AllocationQuota.FreeTierOnly"),
    ),
    # 404 ModelNotFound / model_not_found "The model xxx does not exist or you do not have access
    # to it.", model_not_supported "Unsupported model xxx for OpenAI compatibility mode." [E]
    _rule(MODEL_MISSING, (404, 400), ("ModelNotFound", "model_not_found", "model_not_supported")),
    _rule(MODEL_MISSING, None, ("ModelNotFound", "model_not_found", "model_not_supported")),
    # A response_format the model does not take. DashScope documents no error for it (RESEARCH
    # §1: NOT FOUND); its one documented structured-output error names both, 400
    # "'messages' must contain the word 'json' in some form, to use 'response_format' of type
    # 'json_object'." (https://www.alibabacloud.com/help/en/model-studio/qwen-structured-output;
    # status and code observed: https://github.com/agno-agi/agno/pull/5317), and another
    # compatible vendor answers "The parameter response_format.type ... invalid value:
    # json_schema, supported values are: json_object and text"
    # (https://github.com/agno-agi/agno/issues/2553). Any 400 naming response_format,
    # json_schema or json_object is the format's, never the image's: the run steps down one
    # format and asks again, charging no row (``formats.FormatLadder``).
    _rule(FORMAT, (400,), message=r"response_format|json_schema|json_object"),
    # [E] also lists "Model not exist." under 400 InvalidParameter.
    _rule(MODEL_MISSING, (400, 404), message=r"model (not exist|can ?not be found|.*not exist)"),
    # Any other 404/405: the path does not exist, i.e. DASHSCOPE_BASE_URL is mistyped. 501 Not
    # Implemented: "the server does not support the functionality required to fulfill the
    # request ... the appropriate response when the server does not recognize the request
    # method and is not capable of supporting it for any resource" [H] 15.6.2; DashScope lists
    # no 501 [E], so it is another server (a web server that takes no POST) at that URL.
    _rule(WRONG_URL, (404, 405, 501)),
    # 400 InternalError.Algo.InvalidParameter "The provided messages input is invalid. The error
    # info is [Unexpected item type in content]" / "input content must be a string": an image sent
    # to a text-only model [E].
    _rule(
        NO_IMAGES,
        (400,),
        message=r"unexpected item type in content|input content must be a string"
        r"|input should be a valid string",
    ),
    # 400 "Range of max_tokens should be [1, xxx]" [E]; the embeddings endpoint's "batch size is
    # invalid, it should not be larger than xxx" [E] and invalid dimensions: the request's
    # settings, the same for every row.
    _rule(
        REQUEST,
        (400,),
        message=r"range of max_tokens|max_tokens|batch size is invalid|dimensions? is invalid"
        r"|encoding_format",
    ),
    # 400 DataInspectionFailed / data_inspection_failed "Input (or Output) data may contain
    # inappropriate content." [E]; observed https://github.com/666ghj/BettaFish/issues/449 and, in
    # the message only, "InternalError.Algo.DataInspectionFailed"
    # (https://github.com/QwenLM/qwen-code/issues/3145).
    _rule(MODERATION, (400,), ("DataInspectionFailed", "data_inspection_failed")),
    _rule(MODERATION, None, ("DataInspectionFailed", "data_inspection_failed")),
    _rule(MODERATION, (400,), message=r"datainspectionfailed|inappropriate content"),
    # 400 invalid_parameter_error "<400> InternalError.Algo.InvalidParameter: Failed to download
    # multimodal content" (observed https://github.com/BerriAI/litellm/issues/6307), "The image
    # format is illegal and cannot be opened", "The image length and width do not meet the model
    # restrictions", "Wrong Content-Type of multimodal url", "Download the media resource timed
    # out..." [E]; 413 / BadRequest.TooLarge "Payload Too Large" (the image is the payload).
    # The native multimodal embedding endpoint's 400 InvalidParameter "url error, please check
    # url！" when it cannot read an image (observed: https://github.com/langgenius/dify/issues/
    # 29747, https://github.com/langgenius/dify-official-plugins/issues/2236).
    _rule(
        IMAGE,
        (400, 413),
        message=r"download|multimodal|image|media resource|content-type|too large|url error",
    ),
    _rule(IMAGE, (413,)),
    _rule(IMAGE, None, ("InvalidParameter.DataInspection",)),
    # 429 limit_requests (Throttling.RateQuota) "Requests rate limit exceeded", insufficient_quota
    # (Throttling.AllocationQuota) "Allocated quota exceeded": the TPM limit, throttling and not
    # billing despite the code's name; limit_burst_rate (Throttling.BurstRate) "Request rate
    # increased too quickly" [R], [S]. Every other 429 (the billing ones are above) too.
    _rule(THROTTLE, (429,)),
    _rule(
        THROTTLE,
        None,
        (
            "limit_requests",
            "insufficient_quota",
            "limit_burst_rate",
            "Throttling",
            "Throttling.RateQuota",
            "Throttling.AllocationQuota",
            "Throttling.BurstRate",
        ),
    ),
    # 500 InternalError / internal_error, RequestTimeOut (500, formerly 408), 503
    # ModelUnavailable, 500/503 ModelServingError "Too many requests ... system capacity" [E].
    _rule(SERVICE, (*_5XX, 408, 409, 425)),
    _rule(
        SERVICE,
        None,
        (
            "InternalError",
            "internal_error",
            "RequestTimeOut",
            "ModelUnavailable",
            "ModelServingError",
        ),
    ),
)


@dataclass(frozen=True)
class CallContext:
    """What a failed call was: which model, where, with which request settings (for messages
    that name what to fix). ``base_url`` is redacted when the context is built."""

    kind: str = "vision"  # "vision", "embedding" or "image_embedding"
    model: str | None = None
    base_url: str | None = None
    timeout: float | None = None
    max_tokens: int | None = None
    dimensions: int | None = None

    @classmethod
    def of(cls, settings: Any, kind: str = "vision") -> CallContext:
        """The context of a call with these ``DashScopeSettings``."""
        model = {
            "vision": settings.vision_model,
            "embedding": settings.embedding_model,
            IMAGE_EMBEDDING: settings.image_embedding_model,
        }[kind]
        dimensions = {
            "embedding": settings.embedding_dimensions,
            IMAGE_EMBEDDING: settings.image_embedding_dimensions,
        }.get(kind)
        return cls(
            kind=kind,
            model=model,
            base_url=settings.base_url_shown,
            timeout=settings.timeout,
            max_tokens=settings.max_caption_tokens if kind == "vision" else None,
            dimensions=dimensions,
        )

    @property
    def model_setting(self) -> str:
        return _MODEL_SETTINGS[self.kind]

    @property
    def dimensions_setting(self) -> str:
        if self.kind == IMAGE_EMBEDDING:
            return "ENRICH_IMAGE_EMBEDDING_DIMENSIONS"
        return "DASHSCOPE_EMBEDDING_DIMENSIONS"

    @property
    def the_model(self) -> str:
        named = f" {self.model!r}" if self.model else ""
        return f"the {self.kind.replace('_', ' ')} model{named} ({self.model_setting})"

    @property
    def where(self) -> str:
        """The base URL, named by its variable: ``DASHSCOPE_BASE_URL (https://...)``."""
        return f"DASHSCOPE_BASE_URL ({self.base_url})" if self.base_url else "DASHSCOPE_BASE_URL"


# Image vectors go to DashScope's native multimodal endpoint (``multimodal.py``).
IMAGE_EMBEDDING = "image_embedding"
_MODEL_SETTINGS = {
    "vision": "DASHSCOPE_VISION_MODEL",
    "embedding": "DASHSCOPE_EMBEDDING_MODEL",
    IMAGE_EMBEDDING: "ENRICH_IMAGE_EMBEDDING_MODEL",
}
VISION = CallContext()


def _error_fields(exc: openai.APIStatusError) -> tuple[set[str], str]:
    """The codes (``code`` and ``type``) and the message of a compatible-mode error body."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body.get("error"), dict) else body
    codes = {str(v) for v in (error.get("code"), error.get("type")) if v}
    if getattr(exc, "code", None):
        codes.add(str(exc.code))
    message = error.get("message") if isinstance(error.get("message"), str) else None
    return codes, message or str(exc.message)


def error_code(exc: openai.APIStatusError) -> str:
    """``error.code`` of a compatible-mode error body, lower-cased ('' when absent)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = error.get("code") if isinstance(error, dict) else None
    return str(code or getattr(exc, "code", None) or "").lower()


def verdict_of(status: int | None, codes: set[str], message: str) -> str:
    """The table's verdict for an answer: its status (None if unknown), codes and message."""
    lowered = {c.lower() for c in codes}
    for rule in TABLE:
        if rule.matches(status, lowered, message):
            return rule.verdict
    if status is not None and status >= 500:
        return SERVICE
    if status is None:
        return SERVICE  # an error line with nothing recognisable: try again
    return ROW_REJECTED


def _answer(status: int | None, codes: set[str], message: str) -> str:
    """How the provider's answer is quoted in a message: status, code, message, shortened."""
    code = next((c for c in sorted(codes) if c.lower() != "invalid_request_error"), "")
    head = " ".join(p for p in (f"HTTP {status}" if status else "", code) if p)
    # Scrubbed before it is cut short: a key cut in half is still given away.
    text = clean_message(scrub_secrets(message), 240)
    return f"{head}: {text}" if head and text else head or text


def _stop(verdict: str, answer: str, ctx: CallContext) -> FatalProviderError:
    kind = ctx.kind
    if verdict == ACCOUNT:
        return FatalProviderError(
            "account_in_arrears" if "arrear" in answer.lower() else "account_billing",
            f"DashScope refuses every call because of the Alibaba Cloud account's billing "
            f"({answer}): the account is in arrears or has an unpaid bill. Top up or settle it "
            "in the billing console of the account that owns the API key, then run again",
            kind=kind,
        )
    if verdict == KEY:
        return FatalProviderError(
            "invalid_api_key",
            f"DashScope rejected the API key ({answer}): check DASHSCOPE_API_KEY. Keys are per "
            "region: an international (Singapore) key on the Beijing endpoint, or a Beijing key "
            f"on the international one, also gets 401, so check {ctx.where} too",
            kind=kind,
        )
    if verdict == MODEL_DENIED:
        return FatalProviderError(
            "model_access_denied",
            f"DashScope denied this account access to {ctx.the_model} ({answer}): enable the "
            "model for the account or workspace in Model Studio (or check its free quota), or "
            f"set {ctx.model_setting} to a model you may use",
            kind=kind,
        )
    if verdict == MODEL_MISSING:
        return FatalProviderError(
            "model_not_found",
            f"{ctx.the_model[0].upper() + ctx.the_model[1:]} does not exist at {ctx.where} "
            f"({answer}): check the name in {ctx.model_setting} and whether the model is "
            "offered in this region",
            kind=kind,
        )
    if verdict == WRONG_URL and kind == IMAGE_EMBEDDING:
        return FatalProviderError(
            "wrong_base_url",
            f"{ctx.where} has no DashScope multimodal embedding endpoint beside it ({answer}): "
            "image vectors are asked at the same host's native /api/v1/services/embeddings/"
            "multimodal-embedding/multimodal-embedding, which DashScope serves and an "
            "OpenAI-compatible server need not; unset ENRICH_IMAGE_EMBEDDING_MODEL for this "
            "server",
            kind=kind,
        )
    if verdict == WRONG_URL:
        return FatalProviderError(
            "wrong_base_url",
            f"{ctx.where} has no OpenAI-compatible {kind} endpoint ({answer}): the URL is "
            "probably mistyped (DashScope's ends in /compatible-mode/v1)",
            kind=kind,
        )
    if verdict == NO_IMAGES:
        return FatalProviderError(
            "model_without_images",
            f"{ctx.the_model[0].upper() + ctx.the_model[1:]} does not take images ({answer}): "
            f"set {ctx.model_setting} to a Qwen-VL model such as qwen3-vl-plus",
            kind=kind,
        )
    if kind == "vision" and ctx.max_tokens:
        settings = f"max_tokens {ctx.max_tokens} with an image"
    elif ctx.dimensions:
        settings = f"dimensions {ctx.dimensions} ({ctx.dimensions_setting})"
    else:
        settings = "the request's settings"
    return FatalProviderError(
        "request_refused",
        f"DashScope refused the request itself, whatever the image ({answer}): "
        f"{ctx.the_model} does not take {settings}; choose another model or setting",
        kind=kind,
    )


def classify_answer(
    status: int | None, codes: set[str], message: str, ctx: CallContext = VISION
) -> ProviderError:
    """The pipeline's error for a provider's error answer (an HTTP status and body, or a batch
    line's error object)."""
    verdict = verdict_of(status, codes, message)
    answer = _answer(status, codes, message)
    kind = ctx.kind
    if verdict in STOPS:
        return _stop(verdict, answer, ctx)
    if verdict == FORMAT:
        return ProviderError(
            FORMAT_REFUSED,
            f"{ctx.the_model} does not take this answer format ({answer})",
            permanent=True,
            scope=SCOPE_ROW,
            kind=kind,
            status=status,
        )
    if verdict == MODERATION:
        return ProviderError(
            "moderation", f"rejected by content moderation ({answer})", permanent=True, kind=kind
        )
    if verdict == IMAGE:
        return ProviderError(
            "bad_image", f"the model could not use the image ({answer})", permanent=True, kind=kind
        )
    if verdict == THROTTLE:
        return ProviderError(
            "rate_limited",
            f"DashScope throttled the call ({answer})",
            permanent=False,
            scope=SCOPE_THROTTLE,
            kind=kind,
        )
    if verdict == SERVICE:
        return ProviderError(
            "server_error",
            f"DashScope failed ({answer})",
            permanent=False,
            scope=SCOPE_SERVICE,
            kind=kind,
            status=status,
        )
    return ProviderError(
        "bad_request" if status == 400 else f"http_{status}",
        f"DashScope refused the call ({answer})",
        permanent=True,
        scope=SCOPE_ROW,
        kind=kind,
    )


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection failure ("[Errno 111] Connection refused")."""
    reason = exc
    while reason.__cause__ is not None or reason.__context__ is not None:
        reason = reason.__cause__ or reason.__context__  # type: ignore[assignment]
    text = str(reason) or type(reason).__name__
    return clean_message(scrub_secrets(text), 200)


def classify(
    exc: BaseException, ctx: CallContext = VISION, *, endpoint_proven: bool = True
) -> ProviderError:
    """Map an SDK exception to the pipeline's error classes (the retry policy in one table).

    ``endpoint_proven``: whether the called endpoint ever answered properly (the online
    provider's ``Governor.answered``); until it has, an answer that is not the API's stops the
    run naming ``DASHSCOPE_BASE_URL``.

    The SDK's exception, which may quote the provider's answer (and what the provider echoed
    of the request: the key), is scrubbed in place: it stays attached as the cause of the
    pipeline's error, which tracebacks and Dagster's error info show."""
    if isinstance(exc, ProviderError):
        return exc
    scrub_exception(exc)
    kind = ctx.kind
    if isinstance(exc, AnswerTooLarge):
        # No legitimate answer comes near the cap (see DASHSCOPE_MAX_ANSWER_BYTES): the
        # provider's fault, a service error like an unreadable answer. It is one row's only
        # while the provider answers the other rows (``stages.settle_blame``), and answers
        # too large on call after call stop the run (``health.Governor``).
        return ProviderError(
            "answer_too_large",
            f"DashScope's answer was too large: {clean_message(exc, 200)}",
            permanent=False,
            scope=SCOPE_SERVICE,
            kind=kind,
        )
    if isinstance(exc, ForeignAnswer) and not endpoint_proven:
        # The first answers of an endpoint are its probe: a web page (HTML 200), a JSON of
        # another shape, is another server at DASHSCOPE_BASE_URL, and retrying it 18 times
        # and saying "run again later" hides a mistyped setting. Once the endpoint answered
        # properly, the same answer is a gateway's hiccup (below). No request is made ahead
        # of the first call: DashScope documents a model list only on its native API
        # (GET /api/v1/models, https://www.alibabacloud.com/help/en/model-studio/list-models),
        # none in compatible mode, and an answer no model gave is not billed.
        return _stop(WRONG_URL, clean_message(exc, 240), ctx)
    if isinstance(exc, openai.APIStatusError):
        codes, message = _error_fields(exc)
        return classify_answer(exc.status_code, codes, message, ctx)
    if isinstance(exc, openai.APITimeoutError):
        limit = f" (DASHSCOPE_TIMEOUT={ctx.timeout:g} s)" if ctx.timeout else ""
        return ProviderError(
            "timeout",
            f"DashScope did not answer in time{limit}",
            permanent=False,
            scope=SCOPE_SERVICE,
            kind=kind,
        )
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(
            "connection",
            f"cannot reach DashScope at {ctx.where}: {_cause(exc)}",
            permanent=False,
            scope=SCOPE_SERVICE,
            kind=kind,
        )
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        # A 200 whose body is not the JSON promised: a proxy or overloaded gateway, try again.
        return ProviderError(
            "malformed_response",
            f"unreadable DashScope answer: {clean_message(scrub_secrets(str(exc)), 200)}",
            permanent=False,
            scope=SCOPE_SERVICE,
            kind=kind,
        )
    return ProviderError(
        "unexpected",
        f"{type(exc).__name__}: {clean_message(scrub_secrets(str(exc)), 200)}",
        permanent=False,
        scope=SCOPE_SERVICE,
        kind=kind,
    )
