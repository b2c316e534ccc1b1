"""The stand-in refuses images DashScope cannot take, as DashScope does: a side of 10 px or less,
or longer than 200:1, is a 400 InvalidParameter (through the real `openai` client)."""

from __future__ import annotations

import base64
import io
from typing import Any

import openai
import pytest
from PIL import Image

from enrich_pipeline_tests.standin import StandIn


def image_url(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 90, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(server: StandIn, size: tuple[int, int]) -> Any:
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    parts = [
        {"type": "image_url", "image_url": {"url": image_url(size)}},
        {"type": "text", "text": "Describe this product."},
    ]
    return client.chat.completions.create(
        model="qwen3-vl-plus", messages=[{"role": "user", "content": parts}]
    )


@pytest.mark.parametrize(
    ("size", "bracket"),
    [
        ((896, 4), "[height:4 or width:896 must be larger than 10]"),
        ((1, 896), "[height:896 or width:1 must be larger than 10]"),
        ((10, 10), "[height:10 or width:10 must be larger than 10]"),
        ((2211, 11), "[absolute aspect ratio must be smaller than 200, got 201]"),
    ],
)
def test_an_image_the_service_cannot_take_is_a_400_invalid_parameter(
    standin: StandIn, size: tuple[int, int], bracket: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(standin, size)
    assert info.value.code == "invalid_parameter_error"
    assert info.value.body["message"] == (
        "<400> InternalError.Algo.InvalidParameter: The image length and width do not meet the"
        f" model restrictions. {bracket}"
    )
    assert [r["status"] for r in standin.requests] == [400]


@pytest.mark.parametrize("size", [(11, 11), (2200, 11), (11, 2200), (896, 672)])
def test_images_within_the_limits_are_answered(standin: StandIn, size: tuple[int, int]) -> None:
    assert chat(standin, size).choices[0].message.content
    assert [r["status"] for r in standin.requests] == [200]
