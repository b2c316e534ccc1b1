"""Token counts are checked before they are counted: what an answer's ``usage`` may say, what is
believed, and what the online reading and the batch reading of one answer make of it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from enrich_pipeline.providers.answers import (
    MAX_CALL_TOKENS,
    UnusableStreak,
    answer_text,
    read_usage,
    token_count,
)
from enrich_pipeline.providers.base import Usage
from enrich_pipeline.providers.wire import parse_line

NAMES = ("prompt_tokens", "completion_tokens")
URL = "http://gateway.test/v1/chat/completions"


@pytest.mark.parametrize(
    ("value", "believed"),
    [
        (0, 0),
        (1234, 1234),
        (1234.0, 1234),
        (MAX_CALL_TOKENS, MAX_CALL_TOKENS),
        (MAX_CALL_TOKENS + 1, None),
        (-1, None),
        (-2_000_000, None),
        (1e300, None),
        (4e30, None),
        (12.5, None),
        (math.nan, None),
        (math.inf, None),
        (True, None),
        (None, None),
        ("120", None),
        ("many", None),
        ([1], None),
    ],
)
def test_a_count_is_believed_only_as_a_whole_number_within_one_calls_maximum(
    value: object, believed: int | None
) -> None:
    assert token_count(value) == believed


@pytest.mark.parametrize(
    ("usage", "counts", "known"),
    [
        (
            {"prompt_tokens": 120, "completion_tokens": 20},
            {"prompt_tokens": 120, "completion_tokens": 20},
            True,
        ),
        ({}, {}, False),
        (None, {}, False),
        ({"prompt_tokens": None, "completion_tokens": None}, {}, False),
        ({"prompt_tokens": 120, "completion_tokens": None}, {"prompt_tokens": 120}, False),
        ({"prompt_tokens": -1_000_000, "completion_tokens": 20}, {"completion_tokens": 20}, False),
        ({"prompt_tokens": MAX_CALL_TOKENS, "completion_tokens": MAX_CALL_TOKENS}, {}, False),
        ("usage", {}, False),
    ],
)
def test_usage_gives_the_believable_counts_and_whether_all_were(
    usage: object, counts: dict[str, int], known: bool
) -> None:
    assert read_usage(usage, NAMES) == (counts, known)


def completion(content: Any, usage: Any) -> ChatCompletion:
    """An answer as the SDK builds it from any JSON (no validation, as the client does)."""
    message = {"role": "assistant", "content": content}
    return ChatCompletion.construct(
        id="x",
        object="chat.completion",
        created=0,
        model="qwen3-vl-plus",
        choices=[{"index": 0, "message": message, "finish_reason": "stop"}],
        usage=usage,
    )


@pytest.mark.parametrize("usage", [{}, {"prompt_tokens": None}, {"prompt_tokens": 1e300}, None])
def test_the_sdks_answer_with_odd_usage_still_gives_its_caption(usage: Any) -> None:
    answer = completion("A red chair.", usage)
    assert answer_text(answer) == "A red chair."
    assert read_usage(answer.usage, NAMES)[1] is False


def test_an_answer_that_is_no_completion_is_the_services_failure_not_a_paid_answer() -> None:
    with pytest.raises(ValueError, match="no choices"):
        answer_text({"error": "gateway page"})
    # A completion without a readable message was paid for: no caption, no error here.
    assert answer_text({"choices": [], "usage": {"prompt_tokens": 5}}) == ""
    assert answer_text({"choices": [{"message": {"content": 42}}]}) is None
    assert answer_text({"choices": "nope", "usage": {}}) is None


def batch_line(body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": "r1", "response": {"status_code": 200, "body": body}}


@pytest.mark.parametrize(
    "usage",
    [{}, {"prompt_tokens": None, "completion_tokens": None}, {"prompt_tokens": -5}, "x", None],
)
def test_a_batch_answer_with_odd_usage_keeps_its_caption_with_unknown_tokens(usage: Any) -> None:
    body = {"choices": [{"message": {"content": "A red chair."}}], "usage": usage}
    line = parse_line(batch_line(body), URL)
    assert line.caption == "A red chair." and line.error is None
    assert line.tokens_known is False
    assert 0 <= line.prompt_tokens <= MAX_CALL_TOKENS


def test_a_blank_batch_answer_is_the_rows_error_and_its_tokens_still_count() -> None:
    body = {
        "choices": [{"message": {"content": "\u200b \n"}}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 2},
    }
    line = parse_line(batch_line(body), URL)
    assert line.caption is None and line.error is not None
    assert (line.error.code, line.error.permanent, line.error.scope) == (
        "empty_caption",
        False,
        "row",
    )
    assert (line.prompt_tokens, line.completion_tokens, line.tokens_known) == (300, 2, True)


def test_unknown_token_calls_are_counted_with_the_usage() -> None:
    usage = Usage()
    usage.add(prompt_tokens=10, unknown_token_calls=1)
    assert usage.as_dict()["unknown_token_calls"] == 1
    assert usage.as_dict()["total_tokens"] == 10


def test_the_unusable_streak_stops_only_for_several_images_with_nothing_usable_between() -> None:
    streak = UnusableStreak(4)
    # One image answered blank on every try is that row's problem, however many tries.
    assert [streak.note("image-a") for _ in range(6)] == [None] * 6
    assert streak.note("image-b") == (7, 2)
    streak.usable()
    assert [streak.note(x) for x in ("a", "b", "c")] == [None, None, None]
    assert streak.note("d") == (4, 4)
