"""Where the stand-in follows what DashScope documents (per-model and per-second limits, error
bodies, request validation, image tokens), and its hostile-provider modes, exercised through the
real `openai` client."""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from typing import Any

import openai
import pytest
from PIL import Image

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.synthetic import synthetic_caption
from enrich_pipeline_tests.standin import StandIn
from enrich_pipeline_tests.standin.faults import HUGE_CAPTION_CHARS

VL_MODEL = "qwen-vl-plus"
EMB_MODEL = "text-embedding-v4"


def _client(server: StandIn, **kwargs: Any) -> openai.OpenAI:
    # No retries: these tests are about the first answer, not the SDK's recovery.
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, **kwargs)


def _data_url(color: tuple[int, int, int], size: tuple[int, int] = (100, 60)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(
    client: openai.OpenAI,
    image_url: str | None = None,
    model: str = VL_MODEL,
    prompt: str = "Describe this product.",
    **kwargs: Any,
) -> Any:
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image_url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], **kwargs
    )


def _embed(client: openai.OpenAI, text: str = "blue chair", **kwargs: Any) -> Any:
    return client.embeddings.create(model=EMB_MODEL, input=text, **kwargs)


BLUE = (20, 40, 220)
BLUE_URL = _data_url(BLUE)


# -- rate limits -------------------------------------------------------------------------------


def test_per_second_limit_refuses_a_burst_under_the_minute_limit_and_admits_the_next_second() -> (
    None
):
    # 60 RPM is 1 request per second: a second request right behind the first is a burst.
    with StandIn(rpm_limit=60, per_second=True) as server:
        client = _client(server)
        _embed(client)
        with pytest.raises(openai.RateLimitError) as info:
            _embed(client)
        time.sleep(1.1)  # the first request is now more than a second old
        _embed(client)

    assert info.value.code == "limit_requests"
    assert info.value.body["message"] == "Requests rate limit exceeded, please try again later."
    assert info.value.body["type"] == "limit_requests"
    assert [r["fault"] for r in server.requests] == [None, "rps_limit", None]
    assert [r["status"] for r in server.requests] == [200, 429, 200]


def test_without_per_second_the_same_burst_passes_and_the_minute_still_limits() -> None:
    with StandIn(rpm_limit=3) as server:
        client = _client(server)
        for _ in range(3):
            _embed(client)
        with pytest.raises(openai.RateLimitError):
            _embed(client)
    assert [r["fault"] for r in server.requests] == [None, None, None, "rpm_limit"]


def test_limits_are_per_model_with_a_default() -> None:
    with StandIn(rpm_limit={VL_MODEL: 1, "*": 60}, per_second=True) as server:
        client = _client(server)
        # 1 RPM is 1/60 of a request a second: rounded to one, not zero, so this one passes.
        _chat(client, BLUE_URL)
        with pytest.raises(openai.RateLimitError):
            _chat(client, BLUE_URL)
        # Another model has its own windows: one request a second under "*" = 60 RPM.
        _embed(client)
        with pytest.raises(openai.RateLimitError):
            _embed(client)
        # A second later the per-second window is clear, but the minute still refuses.
        time.sleep(1.1)
        with pytest.raises(openai.RateLimitError):
            _chat(client, BLUE_URL)
    faults = [(r["model"], r["fault"]) for r in server.requests]
    assert faults == [
        (VL_MODEL, None),
        (VL_MODEL, "rpm_limit"),
        (EMB_MODEL, None),
        (EMB_MODEL, "rps_limit"),
        (VL_MODEL, "rpm_limit"),
    ]
    # What a benchmark reads off the log: the share of requests answered 429.
    assert server.count(status=429) / server.count() == pytest.approx(3 / 5)


def test_tokens_per_second_refuse_a_burst_and_admit_the_next_second() -> None:
    # 600 TPM is 10 tokens a second; each request below is 6 input tokens (one per word).
    text = "one two three four five six"
    with StandIn(tpm_limit=600, per_second=True) as server:
        client = _client(server)
        assert _embed(client, text).usage.total_tokens == 6
        with pytest.raises(openai.RateLimitError) as info:
            _embed(client, text)
        time.sleep(1.1)
        _embed(client, text)

    assert info.value.status_code == 429
    assert info.value.code == "insufficient_quota"
    assert info.value.body["message"] == (
        "Allocated quota exceeded, please increase your quota limit."
    )
    assert info.value.response.json()["request_id"] == info.value.request_id
    assert [r["fault"] for r in server.requests] == [None, "tps_limit", None]


def test_tpm_reserves_max_tokens_then_charges_the_real_usage() -> None:
    with StandIn(tpm_limit=300) as server:
        client = _client(server)
        # Admitted on input + max_tokens (about 254 of 300), then charged what was used.
        first = _chat(client, max_tokens=250)
        used = first.usage.total_tokens
        assert used < 50
        # Only fits because the first reservation was settled down to its real usage.
        _chat(client, max_tokens=250)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client, max_tokens=300 - 2 * used)
    assert info.value.code == "insufficient_quota"
    assert [r["fault"] for r in server.requests] == [None, None, "tpm_limit"]


def test_tpm_counts_image_tokens_as_the_model_bills_them() -> None:
    # 100x60 on a 32-px model: 96x64 after the resize, 6 patches + 2 = 8 image tokens, so 9
    # input tokens with the one-word prompt; with the caption the first call uses over 11 of
    # the 20, and the second call's 9 no longer fit.
    with StandIn(tpm_limit=20, image_token_rule="dashscope") as server:
        client = _client(server)
        answer = _chat(client, BLUE_URL, prompt="Caption")
        assert answer.usage.prompt_tokens == 8 + 1
        with pytest.raises(openai.RateLimitError):
            _chat(client, BLUE_URL, prompt="Caption")
    assert server.requests[0]["prompt_tokens"] == 9
    assert server.requests[1]["fault"] == "tpm_limit"


# -- error bodies ------------------------------------------------------------------------------

_INVALID = "<400> InternalError.Algo.InvalidParameter: "


@pytest.mark.parametrize(
    ("fault", "exc", "status", "code", "type_", "message"),
    [
        (
            "arrearage",
            openai.BadRequestError,
            400,
            "Arrearage",
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
        ),
        (
            "model_access_denied",
            openai.PermissionDeniedError,
            403,
            "Model.AccessDenied",
            "Model.AccessDenied",
            "Model access denied.",
        ),
        (
            "unauthorized",
            openai.AuthenticationError,
            401,
            "invalid_api_key",
            "invalid_request_error",
            "Incorrect API key provided.",
        ),
        (
            "model_not_found",
            openai.NotFoundError,
            404,
            "model_not_found",
            "invalid_request_error",
            f"The model `{VL_MODEL}` does not exist or you do not have access to it.",
        ),
        (
            "bad_request",
            openai.BadRequestError,
            400,
            "invalid_parameter_error",
            "invalid_request_error",
            _INVALID + "Range of max_tokens should be [1, 8192]",
        ),
        (
            "no_image_support",
            openai.BadRequestError,
            400,
            "invalid_parameter_error",
            "invalid_request_error",
            _INVALID + "The provided messages input is invalid. The error info is "
            "[Unexpected item type in content]",
        ),
        (
            "image_download_failed",
            openai.BadRequestError,
            400,
            "invalid_parameter_error",
            "invalid_request_error",
            _INVALID + "Failed to download multimodal content",
        ),
        (
            "output_moderation",
            openai.BadRequestError,
            400,
            "data_inspection_failed",
            "data_inspection_failed",
            "Output data may contain inappropriate content.",
        ),
        (
            "moderation",
            openai.BadRequestError,
            400,
            "data_inspection_failed",
            "data_inspection_failed",
            "Input data may contain inappropriate content.",
        ),
        (
            "tpm_throttle",
            openai.RateLimitError,
            429,
            "insufficient_quota",
            "insufficient_quota",
            "Allocated quota exceeded, please increase your quota limit.",
        ),
        (
            "429",
            openai.RateLimitError,
            429,
            "limit_requests",
            "limit_requests",
            "Requests rate limit exceeded, please try again later.",
        ),
    ],
)
def test_error_bodies_as_the_sdk_sees_them(
    fault: str,
    exc: type[openai.APIStatusError],
    status: int,
    code: str,
    type_: str,
    message: str,
) -> None:
    with StandIn() as server:
        client = _client(server)
        server.inject(fault)
        with pytest.raises(exc) as info:
            _chat(client, BLUE_URL)
        assert _chat(client, BLUE_URL).choices[0].message.content  # served once only

    err = info.value
    assert err.status_code == status
    assert err.code == code
    assert err.body == {"message": message, "type": type_, "param": None, "code": code}
    # request_id travels in the body and in x-request-id, which the SDK exposes.
    assert err.request_id
    assert err.response.json()["request_id"] == err.request_id
    assert server.requests[0]["fault"] == fault and server.requests[0]["status"] == status


def test_an_error_body_and_a_hostile_vector_can_be_served_by_rule() -> None:
    red_url = _data_url((240, 10, 10))
    with StandIn() as server:
        client = _client(server)
        server.add_rule("arrearage", color=(255, 0, 0), times=1)
        server.add_rule("nan_embedding", text_contains="poison")
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, red_url)
        assert info.value.code == "Arrearage"
        _chat(client, red_url)  # times=1
        vector = _embed(client, "a poison word", encoding_format="float").data[0].embedding
        assert math.isnan(vector[0])
        assert not any(math.isnan(x) for x in _embed(client, "clean").data[0].embedding)


# -- validation done by the server itself ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "max_tokens", "cap"),
    [
        (VL_MODEL, 8193, 8192),
        (VL_MODEL, 0, 8192),
        ("qwen3-vl-plus", 32769, 32768),
    ],
)
def test_max_tokens_outside_the_models_range_is_refused(
    model: str, max_tokens: int, cap: int
) -> None:
    with StandIn() as server, pytest.raises(openai.BadRequestError) as info:
        _chat(_client(server), BLUE_URL, model=model, max_tokens=max_tokens)
    assert info.value.code == "invalid_parameter_error"
    assert info.value.body["message"] == f"{_INVALID}Range of max_tokens should be [1, {cap}]"
    assert server.requests[0]["status"] == 400


def test_max_tokens_at_the_cap_passes_and_caps_can_be_overridden() -> None:
    with StandIn(max_output_tokens={VL_MODEL: 100}) as server:
        client = _client(server)
        _chat(client, BLUE_URL, model="qwen3-vl-plus", max_tokens=32768)
        _chat(client, BLUE_URL, max_tokens=100)
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, BLUE_URL, max_tokens=101)
    assert info.value.body["message"].endswith("Range of max_tokens should be [1, 100]")


def test_text_only_model_refuses_an_image_but_takes_text() -> None:
    with StandIn(text_only_models={"qwen-plus"}) as server:
        client = _client(server)
        assert _chat(client, model="qwen-plus").choices[0].message.content
        assert _chat(client, BLUE_URL).choices[0].message.content  # a VL model takes it
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, BLUE_URL, model="qwen-plus")
    assert info.value.code == "invalid_parameter_error"
    assert "[Unexpected item type in content]" in info.value.body["message"]
    assert [r["status"] for r in server.requests] == [200, 200, 400]


# -- hostile provider --------------------------------------------------------------------------


def test_trickle_defeats_a_per_read_timeout() -> None:
    outcome: list[object] = []
    with StandIn(trickle_interval=0.5) as server:
        # Every read waits at most 2 s, and a byte arrives every 0.5 s: the read timeout never
        # fires, so the call is still going after 3 s although the server is not hung.
        client = _client(server, timeout=2.0)
        server.inject("trickle")

        def call() -> None:
            try:
                outcome.append(_chat(client, BLUE_URL))
            except openai.APIError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        worker.join(timeout=3.0)
        still_going = worker.is_alive()
    # Stopping the server drops the trickling connection.
    worker.join(timeout=5.0)
    assert still_going and not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], openai.APIConnectionError)
    assert not isinstance(outcome[0], openai.APITimeoutError)
    assert server.requests[0]["fault"] == "trickle"


def test_trickle_body_is_a_whole_valid_answer() -> None:
    with StandIn(trickle_interval=0.001) as server:
        client = _client(server, timeout=10.0)
        server.inject("trickle", endpoint="embeddings")
        start = time.monotonic()
        vector = _embed(client, dimensions=64).data[0].embedding
        elapsed = time.monotonic() - start
    assert len(vector) == 64
    # Several hundred bytes one at a time: visibly slower than a plain answer.
    assert elapsed > 0.2


# JSON floats carry NaN as the bare token Python writes; base64 carries the float32 bit
# pattern. The SDK asks for base64 and decodes it unless told encoding_format="float" (an
# explicit "base64" would hand back the raw string).
@pytest.mark.parametrize("kwargs", [{"encoding_format": "float"}, {}], ids=["float", "base64"])
def test_nan_and_inf_embeddings_arrive_as_floats(kwargs: dict[str, str]) -> None:
    with StandIn() as server:
        client = _client(server)
        server.inject("nan_embedding")
        nan = _embed(client, **kwargs).data[0].embedding
        server.inject("inf_embedding")
        inf = _embed(client, **kwargs).data[0].embedding
    assert len(nan) == len(inf) == 1024
    assert math.isnan(nan[0]) and not any(math.isnan(x) for x in nan[1:])
    assert inf[0] == float("inf") and inf[-1] == float("-inf")


def test_short_embedding_has_the_wrong_length() -> None:
    with StandIn() as server:
        client = _client(server)
        server.inject("short_embedding", times=2)
        assert len(_embed(client, dimensions=256).data[0].embedding) == 128
        assert len(_embed(client, encoding_format="float").data[0].embedding) == 512


def test_embedding_faults_wait_for_an_embedding_request() -> None:
    with StandIn() as server:
        client = _client(server)
        server.inject("nan_embedding")  # endpoint "any", but a chat cannot carry it
        _chat(client, BLUE_URL)
        assert math.isnan(_embed(client).data[0].embedding[0])
        with pytest.raises(ValueError):
            server.inject("nan_embedding", endpoint="chat")
        with pytest.raises(ValueError):
            server.inject("nul_caption", endpoint="embeddings")
    assert [r["fault"] for r in server.requests] == [None, "nan_embedding"]


def _hostile(fault: str) -> str:
    with StandIn() as server:
        client = _client(server)
        server.inject(fault)
        content = _chat(client, BLUE_URL).choices[0].message.content
    assert server.requests[0]["fault"] == fault
    return content


NORMAL = synthetic_caption(Image.new("RGB", (100, 60), BLUE))


def test_nul_caption_arrives_intact() -> None:
    caption = _hostile("nul_caption")
    assert caption.count("\x00") == 1 and caption.replace("\x00", "") == NORMAL


def test_surrogate_caption_arrives_intact() -> None:
    caption = _hostile("surrogate_caption")
    assert caption == NORMAL + " \ud800"
    with pytest.raises(UnicodeEncodeError):
        caption.encode("utf-8")


def test_huge_caption_arrives_intact() -> None:
    caption = _hostile("huge_caption")
    assert len(caption) == HUGE_CAPTION_CHARS == 200_000
    assert caption.startswith(NORMAL + " " + NORMAL)


def test_blank_caption_is_invisible_but_not_empty() -> None:
    caption = _hostile("blank_caption")
    assert caption and caption.strip()  # strip() does not remove zero-width spaces
    assert "\u200b" in caption and not any(ch.isalnum() for ch in caption)


def test_control_caption_arrives_intact() -> None:
    caption = _hostile("control_caption")
    assert NORMAL in caption
    controls = {ch for ch in caption if ch in "\x1b\x07\x08\x7f\r\x0c\x0b\x85\x9b"}
    assert controls == set("\x1b\x07\x08\x7f\r\x0c\x0b\x85\x9b")


# -- image tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "side"),
    [
        ("qwen3-vl-plus", 32),
        ("qwen3-vl-flash", 32),
        ("qwen3.5-plus", 32),
        ("qwen-vl-max", 32),
        ("qwen-vl-plus-latest", 32),
        ("qwen-vl-max-2025-08-13", 32),
        ("qwen-vl-plus-2025-07-10", 32),
        ("qwen-vl-plus-2025-08-15", 32),
        ("qwen-vl-max-2025-04-08", 28),
        ("qwen-vl-plus-2025-05-07", 28),
        ("qwen-vl-max-0809", 28),
        ("qvq-max", 28),
        ("qwen2.5-vl-72b-instruct", 28),
        ("some-future-model", 28),
    ],
)
def test_patch_side(model: str, side: int) -> None:
    assert vision_tokens.patch_side(model) == side


def test_image_tokens_worked_examples() -> None:
    tokens = vision_tokens.image_tokens
    # 32 px: 1024x1024 needs no resize, 32 x 32 patches + 2 special tokens.
    assert tokens(1024, 1024, "qwen3-vl-plus") == 32 * 32 + 2
    # 28 px: 1024 rounds to 1036 (37 patches), over the 1280-token cap, so both sides shrink
    # by sqrt(1024^2 / (1280 * 28^2)) and floor to 980 (35 patches): 1225 + 2.
    assert vision_tokens.resized_size(1024, 1024, "qwen-vl-max-2025-04-08") == (980, 980)
    assert tokens(1024, 1024, "qwen-vl-max-2025-04-08") == 35 * 35 + 2
    # vl_high_resolution_images lifts the cap to 16384 tokens: no shrink, 37 x 37 + 2.
    assert tokens(1024, 1024, "qwen-vl-max-2025-04-08", high_resolution=True) == 37 * 37 + 2
    # 2000 px on 32: round(62.5) is 62 (half to even, as the documented code does); 1984^2 is
    # over the 2560-token cap, so the image shrinks to 1600 px (50 patches a side).
    assert tokens(2000, 2000, "qwen3-vl-plus") == 50 * 50 + 2
    assert tokens(2000, 2000, "qwen3-vl-plus", high_resolution=True) == 62 * 62 + 2
    # The floor: a 10x10 icon is scaled up to 4 patches.
    assert tokens(10, 10, "qwen3-vl-plus") == vision_tokens.MIN_TOKENS + 2 == 6
    assert tokens(10, 10, "qvq-max") == 6
    # 100x60 on 28 px: 112x56, 4 x 2 patches.
    assert tokens(100, 60, "qwen-vl-max-2025-04-08") == 4 * 2 + 2


def test_max_image_tokens_bound_every_image() -> None:
    assert vision_tokens.max_image_tokens("qwen3-vl-plus") == 2560 + 2
    assert vision_tokens.max_image_tokens("qvq-max") == 1280 + 2
    assert vision_tokens.max_image_tokens("qvq-max", high_resolution=True) == 16384 + 2
    for model in ("qwen3-vl-plus", "qvq-max"):
        for high in (False, True):
            cap = vision_tokens.max_image_tokens(model, high)
            for size in ((8000, 6000), (20000, 20000), (30000, 150), (1, 5000)):
                assert 6 <= vision_tokens.image_tokens(*size, model, high_resolution=high) <= cap
    with pytest.raises(ValueError):
        vision_tokens.image_tokens(0, 10, "qvq-max")


def test_stand_in_bills_images_per_model_and_high_resolution_flag() -> None:
    big = _data_url((200, 200, 30), (2000, 2000))
    small = BLUE_URL  # 100x60
    with StandIn(image_token_rule="dashscope") as server:
        client = _client(server)
        rows = [
            _chat(client, small, prompt="Caption").usage.prompt_tokens,
            _chat(
                client, small, model="qwen-vl-max-2025-04-08", prompt="Caption"
            ).usage.prompt_tokens,
            _chat(client, big, model="qwen3-vl-plus", prompt="Caption").usage.prompt_tokens,
            _chat(
                client,
                big,
                model="qwen3-vl-plus",
                prompt="Caption",
                extra_body={"vl_high_resolution_images": True},
            ).usage.prompt_tokens,
        ]
    # One text token ("Caption") each, plus the image as the model counts it.
    assert rows == [8 + 1, 10 + 1, 2502 + 1, 3846 + 1]
    assert [r["image_tokens"] for r in server.requests] == [8, 10, 2502, 3846]


def test_unknown_image_token_rule_is_refused() -> None:
    with pytest.raises(ValueError):
        StandIn(image_token_rule="ceil")
