"""Where the stand-in follows what DashScope documents for structured output, thinking and
languages (``standin.structured``), and what its pictures show (``standin.scenes``), exercised
through the real `openai` client as the pipeline sends them: online and in a batch."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import openai
import pytest
from PIL import Image

from enrich_pipeline.enrichment import synthetic
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, derive_tags
from enrich_pipeline_tests.standin import StandIn
from enrich_pipeline_tests.standin.faults import FAULTS
from enrich_pipeline_tests.standin.scenes import TEMPLATES
from enrich_pipeline_tests.standin.tokens import count_tokens

STYLES = set(DEFAULT_VOCABULARY.styles)
OBJECTS = set(DEFAULT_VOCABULARY.objects) | set(DEFAULT_VOCABULARY.categories)
KEYWORD_400 = (
    "<400> InternalError.Algo.InvalidParameter: 'messages' must contain the word 'json' in some "
    "form, to use 'response_format' of type 'json_object'."
)
SYSTEM = {"role": "system", "content": "You caption product photos. Answer in JSON."}
NO_THINKING = {"enable_thinking": False}


def _client(server: StandIn) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


RED = Image.new("RGB", (640, 480), (200, 30, 30))
RED_URL = _data_url(RED)
LAMP = synthetic.draw_sample("lamp", (40, 80, 200), (245, 245, 245))


def _messages(
    prompt: str = "Describe this product.", url: str = RED_URL, system: bool = True
) -> list[dict[str, Any]]:
    user = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": prompt},
        ],
    }
    return [SYSTEM, user] if system else [user]


def _schema(languages: list[str], styles: list[str], objects: list[str]) -> dict[str, Any]:
    """The contract's json_schema response_format."""
    tags = {"type": "array", "items": {"type": "string", "enum": []}}
    schema = {
        "type": "object",
        "properties": {
            "captions": {
                "type": "object",
                "properties": {lang: {"type": "string"} for lang in languages},
                "required": languages,
                "additionalProperties": False,
            },
            "style_tags": {**tags, "items": {"type": "string", "enum": styles}},
            "object_tags": {**tags, "items": {"type": "string", "enum": objects}},
        },
        "required": ["captions", "style_tags", "object_tags"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "image_enrichment", "strict": True, "schema": schema},
    }


def _answer(response: Any) -> dict[str, Any]:
    return json.loads(response.choices[0].message.content)


# -- which model takes which response_format ---------------------------------------------------


@pytest.mark.parametrize(
    "model", ["qwen3-vl-plus", "qwen3-vl-flash", "qwen-vl-max", "qwen3.5-flash", "qwen3.6-plus"]
)
def test_vision_models_take_json_object_and_answer_the_contract(model: str) -> None:
    with StandIn() as server:
        response = _client(server).chat.completions.create(
            model=model,
            messages=_messages("Describe this product.\nLanguages: zh, en"),
            response_format={"type": "json_object"},
            extra_body=NO_THINKING,
        )
    answer = _answer(response)
    assert set(answer) == {"captions", "style_tags", "object_tags"}
    assert list(answer["captions"]) == ["zh", "en"]
    assert all(isinstance(c, str) and c.strip() for c in answer["captions"].values())
    assert answer["style_tags"] and set(answer["style_tags"]) <= STYLES
    assert answer["object_tags"] and set(answer["object_tags"]) <= OBJECTS


@pytest.mark.parametrize("model", ["qwen3-vl-plus", "qwen-vl-max", "qwen3.5-plus", "qwen3.6-plus"])
def test_json_schema_is_refused_by_every_vision_model_naming_response_format(model: str) -> None:
    with StandIn() as server:
        with pytest.raises(openai.BadRequestError) as info:
            _client(server).chat.completions.create(
                model=model,
                messages=_messages(),
                response_format=_schema(["en"], ["modern"], ["chair"]),
                extra_body=NO_THINKING,
            )
    assert info.value.status_code == 400
    assert info.value.code == "invalid_parameter_error"
    message = info.value.body["message"]
    assert "response_format" in message and "`json_schema`" in message
    assert "supported values are: `text` and `json_object`" in message


def test_a_model_taking_no_response_format_refuses_json_object_too() -> None:
    with StandIn() as server:
        with pytest.raises(openai.BadRequestError) as info:
            _client(server).chat.completions.create(
                model="qvq-max", messages=_messages(), response_format={"type": "json_object"}
            )
    assert "response_format" in info.value.body["message"]
    assert "supported values are: `text`." in info.value.body["message"]


def test_json_schema_where_taken_answers_only_its_enums_and_its_languages() -> None:
    # No vision model is documented to take json_schema: the knob grants it, as a test of the
    # client's json_schema path needs.
    with StandIn(response_formats={"qwen3-vl-plus": ["json_schema", "json_object"]}) as server:
        fmt = _schema(["en", "zh"], ["modern", "rustic"], ["lamp", "shelf", "bed", "sofa"])
        response = _client(server).chat.completions.create(
            model="qwen3-vl-plus", messages=_messages(), response_format=fmt
        )
        plain = _client(server).chat.completions.create(
            model="qwen3-vl-plus", messages=_messages(), response_format={"type": "json_object"}
        )
    answer = _answer(response)
    assert list(answer["captions"]) == ["en", "zh"]  # the schema's languages, in its order
    assert set(answer["style_tags"]) <= {"modern", "rustic"}
    assert set(answer["object_tags"]) <= {"lamp", "shelf", "bed", "sofa"}
    assert answer["object_tags"]  # the red picture shows a lamp by a bookshelf and a bed
    # The model reads the schema: it counts as input.
    schema_tokens = count_tokens(json.dumps(fmt["json_schema"]["schema"]))
    assert response.usage.prompt_tokens - plain.usage.prompt_tokens == schema_tokens


def test_json_object_without_the_word_json_gets_the_documented_400() -> None:
    with StandIn() as server:
        client = _client(server)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="qwen3-vl-plus",
                messages=_messages("Describe this product.", system=False),
                response_format={"type": "json_object"},
            )
        # The check is case-insensitive and any message counts.
        client.chat.completions.create(
            model="qwen3-vl-plus",
            messages=_messages("Describe this product as Json.", system=False),
            response_format={"type": "json_object"},
        )
    assert info.value.status_code == 400
    assert info.value.body == {
        "message": KEYWORD_400,
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_parameter_error",
    }
    assert [r["status"] for r in server.requests] == [400, 200]


# -- thinking ----------------------------------------------------------------------------------


def test_qwen35_and_36_think_by_default_and_bill_the_thinking_as_output() -> None:
    with StandIn() as server:
        client = _client(server)
        thinking = client.chat.completions.create(model="qwen3.5-plus", messages=_messages())
        direct = client.chat.completions.create(
            model="qwen3.5-plus", messages=_messages(), extra_body=NO_THINKING
        )
        vl = client.chat.completions.create(model="qwen3-vl-plus", messages=_messages())
        vl_on = client.chat.completions.create(
            model="qwen3-vl-plus", messages=_messages(), extra_body={"enable_thinking": True}
        )
    reasoning = thinking.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert reasoning and count_tokens(reasoning) > 100
    assert thinking.choices[0].message.content == direct.choices[0].message.content
    thought = thinking.usage.completion_tokens_details.reasoning_tokens
    assert thought == count_tokens(reasoning)
    assert thinking.usage.completion_tokens == direct.usage.completion_tokens + thought
    assert thinking.usage.prompt_tokens == direct.usage.prompt_tokens
    assert getattr(direct.choices[0].message, "reasoning_content", None) is None
    # Qwen3-VL is hybrid but off by default.
    assert getattr(vl.choices[0].message, "reasoning_content", None) is None
    assert vl_on.choices[0].message.reasoning_content  # type: ignore[attr-defined]


def test_thinking_budget_caps_the_thinking_tokens() -> None:
    with StandIn() as server:
        response = _client(server).chat.completions.create(
            model="qwen3.6-plus", messages=_messages(), extra_body={"thinking_budget": 50}
        )
    assert 0 < response.usage.completion_tokens_details.reasoning_tokens <= 50


def test_a_response_format_with_thinking_on_is_refused_naming_both() -> None:
    with StandIn() as server:
        with pytest.raises(openai.BadRequestError) as info:
            _client(server).chat.completions.create(
                model="qwen3.5-plus", messages=_messages(), response_format={"type": "json_object"}
            )
    message = info.value.body["message"]
    assert "response_format" in message and "enable_thinking" in message


# -- what the picture shows --------------------------------------------------------------------


def test_every_synthetic_template_has_its_scene() -> None:
    assert [t.en for t in TEMPLATES] == list(synthetic._TEMPLATES)
    for template in TEMPLATES:
        assert set(template.styles) <= STYLES and set(template.objects) <= OBJECTS
        assert template.unnamed and set(template.unnamed) <= set(template.objects)
        # Keyword rules over the English sentence cannot find the unnamed objects.
        _, rule_objects = derive_tags(template.en.format(color="red"))
        assert not set(template.unnamed) & set(rule_objects), template.en


def test_model_tags_name_objects_the_caption_never_mentions() -> None:
    with StandIn() as server:
        response = _client(server).chat.completions.create(
            model="qwen3-vl-plus", messages=_messages(), response_format={"type": "json_object"}
        )
    answer = _answer(response)
    caption = answer["captions"]["en"]
    assert caption == synthetic.synthetic_caption(RED)  # the picture's template sentence
    _, rule_objects = derive_tags(caption)
    assert set(answer["object_tags"]) - set(rule_objects)  # e.g. the bed in the bedroom


def test_a_demo_drawing_is_seen_as_its_subject() -> None:
    with StandIn() as server:
        client = _client(server)
        structured = client.chat.completions.create(
            model="qwen3-vl-plus",
            messages=_messages("Describe.\nLanguages: zh, en", url=_data_url(LAMP)),
            response_format={"type": "json_object"},
        )
        text = client.chat.completions.create(
            model="qwen3-vl-plus", messages=_messages(url=_data_url(LAMP))
        )
    answer = _answer(structured)
    assert answer["object_tags"] == ["lamp", "decor"]
    assert "台灯" in answer["captions"]["zh"]
    assert text.choices[0].message.content == answer["captions"]["en"]
    assert "blue lamp" in answer["captions"]["en"]


# -- languages -----------------------------------------------------------------------------------


def test_text_answers_follow_the_languages_line() -> None:
    with StandIn() as server:
        client = _client(server)
        legacy = client.chat.completions.create(
            model="qwen3-vl-plus", messages=_messages("Describe. Answer in English.")
        )
        lines = client.chat.completions.create(
            model="qwen3-vl-plus", messages=_messages("Describe.\nLanguages: zh, en, ja\n")
        )
        chinese = client.chat.completions.create(
            model="qwen3-vl-plus", messages=_messages("Describe.\nLanguages: zh")
        )
    english = synthetic.synthetic_caption(RED)
    assert legacy.choices[0].message.content == english
    zh, en, ja = lines.choices[0].message.content.split("\n")
    assert zh.startswith("zh: ") and "红色" in zh and "落地灯" in zh
    assert en == f"en: {english}"
    assert ja == f"ja: [ja] {english}"  # no Japanese: the English sentence, marked
    assert chinese.choices[0].message.content == zh.removeprefix("zh: ")
    assert chinese.usage.completion_tokens == count_tokens(zh.removeprefix("zh: "))


# -- answer faults and token counts -------------------------------------------------------------


def test_answer_faults_break_the_json_or_the_vocabulary() -> None:
    assert {"malformed_answer", "unknown_tags"} <= FAULTS
    with StandIn() as server:
        client = _client(server)

        def ask() -> Any:
            return client.chat.completions.create(
                model="qwen3-vl-plus", messages=_messages(), response_format={"type": "json_object"}
            )

        server.inject("malformed_answer")
        malformed = ask()
        server.inject("unknown_tags", endpoint="chat")
        unknown = _answer(ask())
        server.inject("nul_caption")
        nul = _answer(ask())
        good = ask()
    content = malformed.choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)
    assert malformed.usage.completion_tokens == count_tokens(content)
    assert set(unknown["style_tags"]) - STYLES and set(unknown["object_tags"]) - OBJECTS
    assert "\x00" in nul["captions"]["en"]
    assert good.usage.completion_tokens == count_tokens(good.choices[0].message.content)
    assert [r["fault"] for r in server.requests] == [
        "malformed_answer",
        "unknown_tags",
        "nul_caption",
        None,
    ]


# -- batch ---------------------------------------------------------------------------------------


def _run_batch(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    lines = "".join(
        json.dumps(
            {"custom_id": str(n), "method": "POST", "url": "/v1/chat/completions", "body": b}
        )
        + "\n"
        for n, b in enumerate(bodies)
    )
    upload = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    found: dict[str, dict[str, Any]] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            for raw in client.files.content(file_id).text.splitlines():
                line = json.loads(raw)
                found[line["custom_id"]] = line
    return found


def test_batch_lines_get_the_same_structured_handling_as_online_calls() -> None:
    structured = {
        "model": "qwen3.5-flash",
        "messages": _messages("Describe.\nLanguages: zh, en"),
        "response_format": {"type": "json_object"},
        "enable_thinking": False,
    }
    with StandIn() as server:
        client = _client(server)
        online = client.chat.completions.create(
            model="qwen3.5-flash",
            messages=structured["messages"],
            response_format={"type": "json_object"},
            extra_body=NO_THINKING,
        )
        lines = _run_batch(
            client,
            [
                structured,
                {**structured, "enable_thinking": True},  # thinking with a format: refused
                {**structured, "response_format": _schema(["en"], [], [])},  # not for vision
                {k: v for k, v in structured.items() if k in ("model", "messages")},  # thinks
            ],
        )
    answered = lines["0"]["response"]["body"]
    assert answered["choices"][0]["message"]["content"] == online.choices[0].message.content
    assert answered["usage"]["completion_tokens"] == online.usage.completion_tokens
    for refused in ("1", "2"):
        error = lines[refused]["response"]["body"]["error"]
        assert lines[refused]["response"]["status_code"] == 400
        assert "response_format" in error["message"]
    thinking = lines["3"]["response"]["body"]["choices"][0]["message"]
    assert thinking["reasoning_content"] and thinking["content"].startswith("zh: ")
