"""The classification table, the text made fit to store, and the run-wide governor, as pure
tables: every documented DashScope answer (status, code, message as the error pages and users'
pasted bodies show them) mapped to what the row and the run do."""

from __future__ import annotations

import math
import socket

import pytest

from enrich_pipeline.enrichment.text import (
    CAPTION_MAX_CHARS,
    ELLIPSIS,
    clean_caption,
    clean_message,
    fit_caption,
)
from enrich_pipeline.providers import wire
from enrich_pipeline.providers.base import (
    SCOPE_ROW,
    SCOPE_SERVICE,
    SCOPE_THROTTLE,
    FatalProviderError,
    ProviderError,
    ProviderUnavailable,
    usable_vector,
)
from enrich_pipeline.providers.errors import CallContext, classify, classify_answer
from enrich_pipeline.providers.health import Governor, StopLatch
from enrich_pipeline.settings import DashScopeSettings

URL = "https://dashscope.aliyuncs.com/compatible-mode/v1/chat/completions"
_INVALID = "<400> InternalError.Algo.InvalidParameter: "
SETTINGS = DashScopeSettings(api_key="sk-unit", vision_model="qwen3-vl-plus")
VISION = CallContext.of(SETTINGS, "vision")
EMBEDDING = CallContext.of(SETTINGS, "embedding")

STOP, PERMANENT, TRANSIENT = "stop", "permanent", "transient"

# (status, code, type, message) -> (class, pipeline code, scope, words the message must hold)
CASES = [
    # The account: arrears and unpaid bills (429 billing codes are not rate limits).
    (
        400,
        "Arrearage",
        "Arrearage",
        "Access denied, please make sure your account is in good standing.",
        STOP,
        "account_in_arrears",
        SCOPE_ROW,
        ("arrears", "Top up", "billing"),
    ),
    (
        429,
        "CommodityNotPurchased",
        None,
        "Commodity not purchased.",
        STOP,
        "account_billing",
        SCOPE_ROW,
        ("billing",),
    ),
    (
        429,
        "PrepaidBillOverdue",
        None,
        "The prepaid bill is overdue.",
        STOP,
        "account_billing",
        SCOPE_ROW,
        ("billing",),
    ),
    (
        429,
        "PostpaidBillOverdue",
        None,
        "The postpaid bill is overdue.",
        STOP,
        "account_billing",
        SCOPE_ROW,
        ("billing",),
    ),
    # The key, including the region mismatch.
    (
        401,
        "invalid_api_key",
        "invalid_request_error",
        "Incorrect API key provided.",
        STOP,
        "invalid_api_key",
        SCOPE_ROW,
        ("DASHSCOPE_API_KEY", "DASHSCOPE_BASE_URL", "Beijing"),
    ),
    (
        401,
        "InvalidApiKey",
        None,
        "Invalid API-key provided.",
        STOP,
        "invalid_api_key",
        SCOPE_ROW,
        ("DASHSCOPE_API_KEY",),
    ),
    # The model: access denied names the model, not the key.
    (
        403,
        "Model.AccessDenied",
        "Model.AccessDenied",
        "Model access denied.",
        STOP,
        "model_access_denied",
        SCOPE_ROW,
        ("'qwen3-vl-plus'", "DASHSCOPE_VISION_MODEL"),
    ),
    (
        403,
        "AccessDenied.Unpurchased",
        None,
        "Access to model denied. Make sure you are eligible for using the model.",
        STOP,
        "model_access_denied",
        SCOPE_ROW,
        ("DASHSCOPE_VISION_MODEL",),
    ),
    (
        403,
        "AllocationQuota.FreeTierOnly",
        None,
        "The free tier of the model has been exhausted.",
        STOP,
        "model_access_denied",
        SCOPE_ROW,
        ("free quota",),
    ),
    (
        404,
        "model_not_found",
        "invalid_request_error",
        "The model `qwen3-vl-plus` does not exist or you do not have access to it.",
        STOP,
        "model_not_found",
        SCOPE_ROW,
        ("'qwen3-vl-plus'", "DASHSCOPE_VISION_MODEL", "region"),
    ),
    (
        404,
        "model_not_supported",
        None,
        "Unsupported model qwen-x for OpenAI compatibility mode.",
        STOP,
        "model_not_found",
        SCOPE_ROW,
        ("DASHSCOPE_VISION_MODEL",),
    ),
    (
        400,
        "InvalidParameter",
        None,
        "Model not exist.",
        STOP,
        "model_not_found",
        SCOPE_ROW,
        ("DASHSCOPE_VISION_MODEL",),
    ),
    # A 404 without a model error: the base URL's path is wrong.
    (
        404,
        None,
        None,
        "Not Found",
        STOP,
        "wrong_base_url",
        SCOPE_ROW,
        ("DASHSCOPE_BASE_URL", "compatible-mode/v1"),
    ),
    # The request itself, whatever the image.
    (
        400,
        "invalid_parameter_error",
        "invalid_request_error",
        _INVALID + "The provided messages "
        "input is invalid. The error info is [Unexpected item type in content]",
        STOP,
        "model_without_images",
        SCOPE_ROW,
        ("does not take images", "DASHSCOPE_VISION_MODEL"),
    ),
    (
        400,
        "invalid_parameter_error",
        "invalid_request_error",
        _INVALID + "Range of max_tokens should be [1, 8192]",
        STOP,
        "request_refused",
        SCOPE_ROW,
        ("whatever the image", "max_tokens", "DASHSCOPE_VISION_MODEL"),
    ),
    # Moderation, input and output, as the code or only in the message: permanent for the row.
    (
        400,
        "data_inspection_failed",
        "data_inspection_failed",
        "Input data may contain inappropriate content.",
        PERMANENT,
        "moderation",
        SCOPE_ROW,
        ("moderation",),
    ),
    (
        400,
        "data_inspection_failed",
        "data_inspection_failed",
        "Output data may contain inappropriate content.",
        PERMANENT,
        "moderation",
        SCOPE_ROW,
        ("moderation",),
    ),
    (
        400,
        "DataInspectionFailed",
        None,
        "Input or output data may contain inappropriate content.",
        PERMANENT,
        "moderation",
        SCOPE_ROW,
        ("moderation",),
    ),
    (
        400,
        None,
        None,
        "<400> InternalError.Algo.DataInspectionFailed: Input text data may contain "
        "inappropriate content.",
        PERMANENT,
        "moderation",
        SCOPE_ROW,
        ("moderation",),
    ),
    # The image: the service cannot fetch or decode it.
    (
        400,
        "invalid_parameter_error",
        "invalid_request_error",
        _INVALID + "Failed to download multimodal content",
        PERMANENT,
        "bad_image",
        SCOPE_ROW,
        ("could not use the image",),
    ),
    (
        400,
        "invalid_parameter_error",
        "invalid_request_error",
        "The image format is illegal and cannot be opened",
        PERMANENT,
        "bad_image",
        SCOPE_ROW,
        ("image",),
    ),
    (
        400,
        "InvalidParameter",
        None,
        "The image length and width do not meet the model restrictions.",
        PERMANENT,
        "bad_image",
        SCOPE_ROW,
        ("image",),
    ),
    (
        400,
        "InvalidParameter.DataInspection",
        None,
        "Unable to download the media resource during the data inspection process.",
        PERMANENT,
        "bad_image",
        SCOPE_ROW,
        ("image",),
    ),
    (413, "BadRequest.TooLarge", None, "Payload Too Large.", PERMANENT, "bad_image", SCOPE_ROW, ()),
    # Every throttling code: transient, never the row's (insufficient_quota is the TPM limit).
    (
        429,
        "limit_requests",
        "limit_requests",
        "Requests rate limit exceeded, please try again later.",
        TRANSIENT,
        "rate_limited",
        SCOPE_THROTTLE,
        ("throttled",),
    ),
    (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "Allocated quota exceeded, please increase your quota limit.",
        TRANSIENT,
        "rate_limited",
        SCOPE_THROTTLE,
        ("throttled",),
    ),
    (
        429,
        "Throttling.RateQuota",
        None,
        "You exceeded your current requests list.",
        TRANSIENT,
        "rate_limited",
        SCOPE_THROTTLE,
        (),
    ),
    (
        429,
        "Throttling.AllocationQuota",
        None,
        "You exceeded your current quota.",
        TRANSIENT,
        "rate_limited",
        SCOPE_THROTTLE,
        (),
    ),
    (
        429,
        "Throttling.BurstRate",
        None,
        "Request rate increased too quickly.",
        TRANSIENT,
        "rate_limited",
        SCOPE_THROTTLE,
        (),
    ),
    (
        429,
        "limit_burst_rate",
        None,
        "Request rate increased too quickly.",
        TRANSIENT,
        "rate_limited",
        SCOPE_THROTTLE,
        (),
    ),
    # The service: transient, the row's only while the provider answers most other calls.
    (
        500,
        "internal_error",
        None,
        "An internal error has occured, try again later.",
        TRANSIENT,
        "server_error",
        SCOPE_SERVICE,
        (),
    ),
    (
        500,
        "RequestTimeOut",
        None,
        "Request timed out, try again later.",
        TRANSIENT,
        "server_error",
        SCOPE_SERVICE,
        (),
    ),
    (
        503,
        "ModelUnavailable",
        None,
        "Model is unavailable, try again later.",
        TRANSIENT,
        "server_error",
        SCOPE_SERVICE,
        (),
    ),
    (
        503,
        "ModelServingError",
        None,
        "Too many requests. Your requests are being throttled due to system capacity limits.",
        TRANSIENT,
        "server_error",
        SCOPE_SERVICE,
        (),
    ),
    (502, None, None, "Bad Gateway", TRANSIENT, "server_error", SCOPE_SERVICE, ()),
    # Anything else the table does not know: permanent for the row (and a stop if it repeats).
    (
        400,
        "InvalidParameter",
        None,
        "Range of input length should be [1, 30720]",
        PERMANENT,
        "bad_request",
        SCOPE_ROW,
        (),
    ),
    (422, None, None, "Unprocessable", PERMANENT, "http_422", SCOPE_ROW, ()),
]


def _body(code: str | None, type_: str | None, message: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _class(error: ProviderError) -> str:
    if isinstance(error, FatalProviderError):
        return STOP
    return PERMANENT if error.permanent else TRANSIENT


@pytest.mark.parametrize(
    ("status", "code", "type_", "message", "klass", "pipeline_code", "scope", "words"),
    CASES,
    ids=[f"{c[0]}-{c[1] or c[3][:20]}" for c in CASES],
)
def test_each_documented_answer_has_one_verdict(
    status: int,
    code: str | None,
    type_: str | None,
    message: str,
    klass: str,
    pipeline_code: str,
    scope: str,
    words: tuple[str, ...],
) -> None:
    exc = wire.status_error(status, _body(code, type_, message), URL)
    error = classify(exc, VISION)
    assert (_class(error), error.code, error.scope) == (klass, pipeline_code, scope), str(error)
    for word in words:
        assert word in str(error), (word, str(error))
    assert "sk-unit" not in str(error)


def test_account_stop_names_the_account_not_the_key() -> None:
    error = classify(wire.status_error(400, _body("Arrearage", "Arrearage", "Access denied."), URL))
    assert isinstance(error, FatalProviderError)
    assert "account" in str(error) and "DASHSCOPE_API_KEY" not in str(error)


def test_model_stops_name_the_embedding_model_for_embedding_calls() -> None:
    denied = classify(
        wire.status_error(403, _body("Model.AccessDenied", None, "Model access denied."), URL),
        EMBEDDING,
    )
    assert isinstance(denied, FatalProviderError) and denied.kind == "embedding"
    assert "'text-embedding-v4'" in str(denied) and "DASHSCOPE_EMBEDDING_MODEL" in str(denied)
    dims = classify(
        wire.status_error(
            400, _body(None, None, "dimensions is invalid, it should be one of"), URL
        ),
        EMBEDDING,
    )
    assert isinstance(dims, FatalProviderError) and "DASHSCOPE_EMBEDDING_DIMENSIONS" in str(dims)


def test_connection_timeout_and_unreadable_answers_are_service_errors() -> None:
    import openai

    try:  # the exception the SDK raises for a refused connection, with its real cause
        openai.OpenAI(
            api_key="sk-unit", base_url="http://127.0.0.1:9/v1", max_retries=0
        ).models.list()
    except openai.APIConnectionError as exc:
        refused = classify(exc, VISION)
    assert (refused.code, refused.scope, refused.permanent) == ("connection", SCOPE_SERVICE, False)
    assert "refused" in str(refused).lower() and "DASHSCOPE_BASE_URL" in str(refused)
    # A listening socket that never answers: the SDK's own timeout, with its real request.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        try:
            openai.OpenAI(
                api_key="sk-unit",
                base_url=f"http://127.0.0.1:{port}/v1",
                max_retries=0,
                timeout=0.2,
            ).models.list()
        except openai.APITimeoutError as exc:
            timeout = classify(exc, VISION)
    assert (timeout.code, timeout.scope) == ("timeout", SCOPE_SERVICE)
    assert "DASHSCOPE_TIMEOUT=60" in str(timeout)
    assert classify(ValueError("Expecting value"), VISION).code == "malformed_response"


# --- Batch API answer lines: the same table -----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "klass", "code"),
    [
        ({"error": {"code": "Arrearage", "message": "Access denied."}}, STOP, "account_in_arrears"),
        ({"error": {"code": "InvalidApiKey", "message": "no"}}, STOP, "invalid_api_key"),
        ({"error": {"code": "Model.AccessDenied", "message": "no"}}, STOP, "model_access_denied"),
        ({"error": {"code": "DataInspectionFailed", "message": "no"}}, PERMANENT, "moderation"),
        ({"error": {"code": "Throttling.RateQuota", "message": "slow"}}, TRANSIENT, "rate_limited"),
        ({"error": {"code": "InternalError", "message": "oops"}}, TRANSIENT, "server_error"),
        (
            {"response": {"status_code": 400, "body": _body("Arrearage", "Arrearage", "x")}},
            STOP,
            "account_in_arrears",
        ),
        (
            {"response": {"status_code": 429, "body": _body("insufficient_quota", None, "q")}},
            TRANSIENT,
            "rate_limited",
        ),
        (
            {
                "response": {
                    "status_code": 400,
                    "body": _body(None, None, _INVALID + "Failed to download multimodal content"),
                }
            },
            PERMANENT,
            "bad_image",
        ),
    ],
)
def test_batch_answer_lines_are_classified_by_the_same_table(
    line: dict, klass: str, code: str
) -> None:
    result = wire.parse_line({"custom_id": "1", **line}, URL)
    assert result.error is not None and result.caption is None
    assert (_class(result.error), result.error.code) == (klass, code)


# --- text made fit to store ---------------------------------------------------------------------

CAPTION = "A blue chair in a bright room."


@pytest.mark.parametrize(
    "raw",
    [
        CAPTION[:10] + "\x00" + CAPTION[10:],  # NUL: PostgreSQL refuses it in text and jsonb
        CAPTION + " \ud800",  # a lone surrogate: not encodable as UTF-8
        "\x1b[2J\x1b[31m" + CAPTION + "\x07\x08\x7f\r\x0c\x0b\x85\x9b",  # escapes and controls
        "\ufeff" + CAPTION.replace(" ", "\u200b \u00a0\t"),  # BOM, zero-width and odd spaces
        "\x1b]0;title\x07" + CAPTION + "\n\n",  # an OSC sequence and trailing newlines
    ],
    ids=["nul", "surrogate", "controls", "invisible", "osc"],
)
def test_hostile_caption_text_is_cleaned_to_the_caption(raw: str) -> None:
    cleaned = clean_caption(raw)
    assert cleaned == CAPTION
    cleaned.encode("utf-8")  # storable


@pytest.mark.parametrize(
    "raw", ["", None, "   ", "\u200b \u200b\u2060\ufeff\t\u3000\u200b\n\u00a0"]
)
def test_a_caption_of_invisible_characters_is_no_caption(raw: str | None) -> None:
    assert clean_caption(raw) == ""


def test_valid_surrogate_pairs_and_emoji_joiners_survive() -> None:
    assert clean_caption("a chair \ud83e\ude91") == "a chair \U0001fa91"  # joined into one char
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert clean_caption(f"a poster of {family}") == f"a poster of {family}"


def test_long_captions_are_capped_at_a_word_and_marked() -> None:
    words = ("a chair " * 1000).strip()
    capped, truncated = fit_caption(words)
    assert truncated and len(capped) <= CAPTION_MAX_CHARS and capped.endswith(ELLIPSIS)
    assert capped[:-1] == capped[:-1].rstrip() and capped[-2] in "ar"  # cut between words
    assert fit_caption(CAPTION) == (CAPTION, False)
    unbroken, truncated = fit_caption("x" * 5000)
    assert truncated and len(unbroken) == CAPTION_MAX_CHARS
    assert len(clean_message("e" * 10_000)) <= 500


def test_only_finite_vectors_of_the_right_length_are_stored() -> None:
    assert usable_vector([0.1, 0.2], 2) and usable_vector([0, 1])
    assert not usable_vector([math.nan, 0.2], 2)
    assert not usable_vector([math.inf, 0.2]) and not usable_vector([0.1, -math.inf])
    assert not usable_vector([0.1], 2) and not usable_vector([]) and not usable_vector(None)


# --- the run-wide governor ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def governor(clock: Clock | None = None, **kw: object) -> Governor:
    return Governor(
        VISION,
        backoff_initial=1.0,
        backoff_max=30.0,
        stop=StopLatch(),
        clock=clock or Clock(),
        **kw,  # type: ignore[arg-type]
    )


def throttled() -> ProviderError:
    return ProviderError("rate_limited", "throttled", permanent=False, scope=SCOPE_THROTTLE)


def refused() -> ProviderError:
    return ProviderError("connection", "refused", permanent=False, scope=SCOPE_SERVICE)


def test_failures_that_are_not_the_rows_cut_the_calls_in_flight_and_pause_every_call() -> None:
    clock = Clock()
    g = governor(clock)
    g.in_flight = 8  # eight calls in flight when the first 429 lands
    g.attempt_failed(throttled(), attempt=1)
    assert g.limit == 4
    g.attempt_failed(throttled(), attempt=1)  # the same burst: no second cut during the pause
    assert g.limit == 4
    assert g._pause_until == pytest.approx(100.5)  # half the first backoff ceiling, for all
    clock.now = 101.0
    g.attempt_failed(throttled(), hint=7.0, attempt=2)  # the server's Retry-After wins
    assert g.limit == 2 and g._pause_until == pytest.approx(108.0)
    g.in_flight = 0
    for _ in range(3):
        g.attempt_ok()  # each success lets one more call in
    assert g.limit == 5 and g.lowest_limit == 2
    # A row's own rejection slows nothing down.
    g.attempt_failed(ProviderError("moderation", "no", permanent=True), attempt=1)
    assert g.limit == 5


def test_the_run_gives_up_after_three_calls_failed_in_a_row_and_stops_every_call() -> None:
    clock = Clock()
    g = governor(clock)
    for n in range(2):
        g.attempt_failed(refused(), attempt=1)
        assert g.call_failed(refused(), 4) is not None and g.stop.error is None, n
    clock.now += 12.5
    stop = g.call_failed(refused(), 4)
    assert isinstance(stop, ProviderUnavailable) and g.stop.error is stop
    assert "unreachable" in str(stop) and "no row was charged an attempt" in str(stop)
    assert "12.5 s" in str(stop)
    with pytest.raises(ProviderUnavailable), g.slot():
        pass
    # A new run on the same provider starts afresh.
    g.stop.reset()
    g.begin_run()
    with g.slot():
        pass


def test_a_success_between_failed_calls_resets_the_count() -> None:
    g = governor()
    for _ in range(5):
        g.call_failed(refused(), 4)
        g.call_failed(refused(), 4)
        g.call_ok()
        g.call_ok()
        g.call_ok()
    assert g.stop.error is None


def test_most_recent_calls_failing_gives_up_even_with_successes_between() -> None:
    g = governor()
    for _ in range(4):
        g.call_ok()
        g.call_failed(refused(), 4)
        g.call_failed(refused(), 4)
    assert isinstance(g.stop.error, ProviderUnavailable)


def test_whose_fault_a_service_error_is() -> None:
    g = governor()
    # Nothing to go by: an HTTP 500 that is the run's only failure is the row's, a 503 or a
    # refused connection is not.
    g.call_failed(refused(), 4)
    assert g.row_at_fault(likely_row=True) and not g.row_at_fault(likely_row=False)
    g.call_failed(refused(), 4)
    assert not g.row_at_fault(likely_row=True)  # two calls failed: the provider's
    # Most other calls succeed: the row's.
    g.call_ok()
    g.call_ok()
    assert g.row_at_fault() and g.healthy()
    g.call_failed(refused(), 4)
    assert not g.row_at_fault() and not g.healthy()  # 2 of 5 ok: most calls failed


def test_the_same_unrecognised_refusal_on_call_after_call_stops_the_run() -> None:
    g = governor()
    unknown = ProviderError(
        "bad_request", "DashScope refused the call (HTTP 400: odd 1)", permanent=True
    )
    assert g.call_failed(unknown, 1) is unknown
    g.call_failed(
        ProviderError(
            "bad_request", "DashScope refused the call (HTTP 400: odd 22)", permanent=True
        ),
        1,
    )
    stop = g.call_failed(unknown, 1)
    assert isinstance(stop, FatalProviderError) and not isinstance(stop, ProviderUnavailable)
    assert "3 calls in a row" in str(stop) and "DASHSCOPE_VISION_MODEL" in str(stop)
    # Known row rejections never add up to a stop.
    g2 = governor()
    for _ in range(5):
        g2.call_failed(ProviderError("moderation", "no", permanent=True), 1)
    assert g2.stop.error is None


def test_a_code_alone_is_classified_when_the_status_is_unknown() -> None:
    assert classify_answer(None, {"Arrearage"}, "").code == "account_in_arrears"
    assert classify_answer(None, {"mystery"}, "").scope == SCOPE_SERVICE
