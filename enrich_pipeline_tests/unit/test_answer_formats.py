"""Which answer format each model is asked in, when thinking is turned off, how a refused
format is recognized, and how the run steps down (once, however many calls are refused
together)."""

from __future__ import annotations

import logging
import threading

import openai
import pytest

from enrich_pipeline.enrichment.structured import JSON_OBJECT, JSON_SCHEMA, TEXT
from enrich_pipeline.providers.errors import FORMAT_REFUSED, classify, classify_answer
from enrich_pipeline.providers.formats import (
    MALFORMED_STEP_DOWN,
    FormatLadder,
    documented_formats,
    first_format,
    thinking_off,
)
from enrich_pipeline.providers.wire import (
    caption_request_body,
    question_of,
    sdk_arguments,
    status_error,
)
from enrich_pipeline.settings import DashScopeSettings

pytestmark = pytest.mark.unit

BEIJING = "https://dashscope.aliyuncs.com/compatible-mode/v1"
LOCAL = "http://127.0.0.1:8000/v1"


def api_error(status: int, code: str, message: str) -> openai.APIStatusError:
    """The SDK's exception for a compatible-mode error answer."""
    body = {"error": {"code": code, "message": message, "type": "invalid_request_error"}}
    return status_error(status, body, f"{BEIJING}/chat/completions")


@pytest.mark.parametrize(
    ("model", "url", "formats"),
    [
        ("qwen3-vl-plus", BEIJING, (JSON_OBJECT, TEXT)),
        ("qwen3-vl-flash-2025-10-15", BEIJING, (JSON_OBJECT, TEXT)),
        ("qwen3.5-plus", BEIJING, (JSON_OBJECT, TEXT)),
        ("qwen3.6-flash", BEIJING, (JSON_OBJECT, TEXT)),
        ("qwen-vl-max", BEIJING, (JSON_OBJECT, TEXT)),
        ("qwen-plus", BEIJING, (JSON_SCHEMA, JSON_OBJECT, TEXT)),
        ("qwen3-vl-plus-thinking", BEIJING, (TEXT,)),
        ("qvq-max", BEIJING, (TEXT,)),
        ("some-new-model", BEIJING, (TEXT,)),
        # A local OpenAI-compatible server: nothing documents what it takes.
        ("qwen3-vl-plus", LOCAL, (TEXT,)),
    ],
)
def test_the_formats_a_model_takes_come_from_its_documentation(
    model: str, url: str, formats: tuple[str, ...]
) -> None:
    assert documented_formats(model, url) == formats
    assert first_format("auto", model, url) == formats[0]


def test_the_answer_format_setting_overrides_the_documentation() -> None:
    assert first_format("json_schema", "qwen3-vl-plus", LOCAL) == JSON_SCHEMA
    assert first_format("text", "qwen-plus", BEIJING) == TEXT


@pytest.mark.parametrize(
    ("model", "fmt", "off"),
    [
        ("qwen3.5-plus", TEXT, True),  # thinks by default: always off
        ("qwen3.6-plus", JSON_OBJECT, True),
        ("qwen3-vl-plus", TEXT, False),  # hybrid, off by default: left alone for text
        ("qwen3-vl-plus", JSON_OBJECT, True),  # structured output: non-thinking mode only
        ("qwen-vl-max", JSON_OBJECT, False),  # not a thinking model
    ],
)
def test_thinking_is_turned_off_where_documented(model: str, fmt: str, off: bool) -> None:
    assert thinking_off(model, fmt) is off


def test_the_request_body_carries_the_format_the_thinking_switch_and_room_for_every_language() -> (
    None
):
    settings = DashScopeSettings(
        vision_model="qwen3.5-plus", caption_languages="zh,en", max_caption_tokens=200
    )
    question = question_of(settings)
    body = caption_request_body(settings, "data:image/png;base64,AA==", question, JSON_SCHEMA)
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == question.schema()
    assert body["enable_thinking"] is False
    assert body["max_tokens"] > 2 * 200
    assert body["messages"][0]["role"] == "system"
    # The SDK takes DashScope's own field through extra_body.
    assert sdk_arguments(body)["extra_body"] == {"enable_thinking": False}
    text = caption_request_body(
        DashScopeSettings(), "data:image/png;base64,AA==", question_of(DashScopeSettings()), TEXT
    )
    assert set(text) == {"model", "max_tokens", "messages"} and text["max_tokens"] == 200


@pytest.mark.parametrize(
    "message",
    [
        "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
        "'json_object'.",
        "The parameter response_format.type invalid value: json_schema, supported values are: "
        "json_object and text",
        "<400> InternalError.Algo.InvalidParameter: json_schema is not supported by this model",
    ],
)
def test_a_400_naming_the_response_format_is_a_refused_format(message: str) -> None:
    error = classify(api_error(400, "invalid_parameter_error", message))
    assert error.code == FORMAT_REFUSED
    # A batch error line with only a code and the message: the same verdict.
    assert classify_answer(None, {"InvalidParameter"}, message).code == FORMAT_REFUSED
    # An image problem is still the image's.
    image = classify(api_error(400, "invalid_parameter_error", "Failed to download multimodal"))
    assert image.code == "bad_image"


def test_refusals_of_many_calls_at_once_step_down_once_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    steps: list[int] = []
    ladder = FormatLadder(JSON_SCHEMA, "qwen3-vl-plus", on_step=lambda: steps.append(1))
    start = threading.Barrier(8)
    results: list[bool] = []

    def refused() -> None:
        start.wait()
        results.append(ladder.refused(JSON_SCHEMA, "HTTP 400: json_schema not supported"))

    with caplog.at_level(logging.WARNING, logger="enrich_pipeline.providers.formats"):
        threads = [threading.Thread(target=refused) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert ladder.current == JSON_OBJECT
    assert results == [True] * 8  # every refused call may ask again, in the lower format
    assert len(steps) == 1 and len(ladder.steps) == 1
    lines = [r.getMessage() for r in caplog.records if "stepped down" in r.getMessage()]
    assert len(lines) == 1 and "json_schema to json_object" in lines[0]
    # At text there is nothing lower: a refusal there is an error like any other.
    ladder.refused(JSON_OBJECT, "again")
    assert ladder.current == TEXT and ladder.refused(TEXT, "no") is False


def test_malformed_answers_step_down_only_as_a_streak_across_images() -> None:
    ladder = FormatLadder(JSON_OBJECT)
    # One image's every try malformed: that row's problem, not the model's.
    for _ in range(MALFORMED_STEP_DOWN * 2):
        assert ladder.malformed(JSON_OBJECT, "image-1") is False
    ladder.wellformed()
    stepped = [ladder.malformed(JSON_OBJECT, f"image-{n % 2}") for n in range(MALFORMED_STEP_DOWN)]
    assert stepped[-1] is True and ladder.current == TEXT
    ladder.reset()
    assert ladder.current == JSON_OBJECT
