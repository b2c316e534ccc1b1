"""What a vision call asks for and how its answer is read: the schema from the vocabulary, the
prompt per answer format and languages, and the reading of answer texts into captions and tags
(model tags checked against the vocabulary, text answers tagged by the keyword rules)."""

from __future__ import annotations

import json

import pytest

from enrich_pipeline.enrichment.records import TAGS_FROM_MODEL, TAGS_FROM_RULES
from enrich_pipeline.enrichment.structured import (
    JSON_OBJECT,
    JSON_SCHEMA,
    TEXT,
    Answer,
    MalformedAnswer,
    Question,
    accepted_tags,
    object_keys,
    read_answer,
    style_keys,
)
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY
from enrich_pipeline.settings.dashscope import DEFAULT_PROMPT

pytestmark = pytest.mark.unit

ZH_EN = Question(DEFAULT_PROMPT, ("zh", "en"))
EN = Question(DEFAULT_PROMPT)


def test_the_schema_has_one_required_caption_per_language_and_tags_as_vocabulary_enums() -> None:
    schema = ZH_EN.schema()
    assert schema["required"] == ["captions", "style_tags", "object_tags"]
    assert schema["additionalProperties"] is False
    captions = schema["properties"]["captions"]
    assert list(captions["properties"]) == ["zh", "en"]
    assert captions["required"] == ["zh", "en"] and captions["additionalProperties"] is False
    styles = schema["properties"]["style_tags"]["items"]["enum"]
    objects = schema["properties"]["object_tags"]["items"]["enum"]
    assert styles == list(DEFAULT_VOCABULARY.styles)
    assert set(objects) == set(DEFAULT_VOCABULARY.objects) | set(DEFAULT_VOCABULARY.categories)
    assert "modern" in styles and {"chair", "furniture"} <= set(objects)


def test_an_english_text_question_is_the_legacy_prompt_unchanged() -> None:
    (message,) = EN.messages(TEXT, "data:image/png;base64,AA==")
    assert message["role"] == "user"
    assert message["content"][1]["text"] == DEFAULT_PROMPT


@pytest.mark.parametrize("fmt", [JSON_SCHEMA, JSON_OBJECT])
def test_a_structured_question_says_json_in_a_system_message_and_names_the_languages(
    fmt: str,
) -> None:
    system, user = ZH_EN.messages(fmt, "data:image/png;base64,AA==")
    assert system["role"] == "system" and "JSON" in system["content"]
    text = user["content"][1]["text"]
    assert "Languages: zh, en" in text.splitlines()
    assert "Answer in English" not in text
    # json_object has no schema: the tags to choose from are in the prompt.
    assert ("Style tags to choose from: " in text) == (fmt == JSON_OBJECT)


def test_a_text_question_in_two_languages_asks_for_one_line_each() -> None:
    (user,) = ZH_EN.messages(TEXT, "data:image/png;base64,AA==")
    text = user["content"][1]["text"]
    assert text.splitlines()[-1] == "Languages: zh, en"
    assert "<code>: <caption>" in text


def test_a_structured_answer_gives_every_caption_and_the_models_tags() -> None:
    text = json.dumps(
        {
            "captions": {"zh": "一把现代的蓝色椅子。", "en": "A modern blue chair."},
            "style_tags": ["Modern"],
            "object_tags": ["chair", "sofa"],
        }
    )
    answer = read_answer(text, JSON_OBJECT, ("zh", "en"))
    assert dict(answer.captions) == {"zh": "一把现代的蓝色椅子。", "en": "A modern blue chair."}
    assert answer.caption == "一把现代的蓝色椅子。"
    assert answer.tags_source == TAGS_FROM_MODEL
    styles, objects, dropped = accepted_tags(answer)
    # The sofa the caption never names is kept (the model saw it); a category follows its object.
    assert (styles, objects, dropped) == (["modern"], ["chair", "furniture", "sofa"], 0)


def test_tags_outside_the_vocabulary_are_dropped_and_counted() -> None:
    text = json.dumps(
        {
            "captions": {"en": "A lamp-shaped vase."},
            "style_tags": ["modern", "glamorous"],
            "object_tags": ["vase", "spaceship", 7],
        }
    )
    styles, objects, dropped = accepted_tags(read_answer(text, JSON_SCHEMA, ("en",)))
    assert styles == ["modern"]
    assert "vase" in objects and "spaceship" not in objects and "lamp" not in objects
    assert dropped == 3  # glamorous, spaceship, and the 7 that is not a tag at all


def test_a_fenced_json_answer_is_read() -> None:
    text = '```json\n{"captions": {"en": "A chair."}, "style_tags": [], "object_tags": []}\n```'
    assert read_answer(text, JSON_OBJECT, ("en",)).caption == "A chair."


@pytest.mark.parametrize(
    "text",
    [
        "A modern chair.",  # not JSON
        '["A modern chair."]',  # not an object
        '{"caption": "A modern chair."}',  # no captions object
        '{"captions": {"en": "A chair."}}',  # the zh caption missing
        '{"captions": {"en": "A chair.", "zh": "  \\u200b "}}',  # empty once cleaned
        '{"captions": {"en": "A chair.", "zh": "椅子"}, "style_tags": "modern"}',  # not a list
        '{"captions": {"en": "A chair.", "zh": "椅子"',  # cut off (max_tokens)
        "[" * 200_000 + "]" * 200_000,  # nested deeper than the parser recurses
    ],
)
def test_a_malformed_answer_is_refused(text: str) -> None:
    with pytest.raises(MalformedAnswer):
        read_answer(text, JSON_OBJECT, ("zh", "en"))


def test_a_text_answer_in_two_languages_is_read_by_its_lines_and_tagged_by_the_rules() -> None:
    answer = read_answer("zh: 一把蓝色椅子。\nen: A modern blue chair.", TEXT, ("zh", "en"))
    assert dict(answer.captions) == {"zh": "一把蓝色椅子。", "en": "A modern blue chair."}
    assert answer.tags_source == TAGS_FROM_RULES
    styles, objects, dropped = accepted_tags(answer)
    assert styles == ["modern"] and objects[:2] == ["chair", "furniture"] and dropped == 0
    with pytest.raises(MalformedAnswer):
        read_answer("en: A modern blue chair.", TEXT, ("zh", "en"))


def test_an_english_text_answer_is_the_caption_tagged_by_the_keyword_rules() -> None:
    answer = read_answer("A modern blue chair in a minimalist living room.", TEXT, ("en",))
    assert accepted_tags(answer) == (["modern", "minimalist"], ["chair", "furniture", "room"], 0)


def test_a_cached_answer_reads_back_as_it_was_given() -> None:
    given = read_answer(
        '{"captions": {"zh": "椅子。", "en": "A chair."}, "style_tags": [], '
        '"object_tags": ["chair"]}',
        JSON_OBJECT,
        ("zh", "en"),
    )
    again = Answer.from_cache(given.caption, given.to_json(), JSON_OBJECT, ("zh", "en"))
    assert again == given
    # An entry from before structured answers: a caption alone, tags by the rules.
    legacy = Answer.from_cache("A modern chair.", None, TEXT, ("en",))
    assert legacy.captions == {"en": "A modern chair."} and legacy.tags_source == TAGS_FROM_RULES
    assert accepted_tags(legacy)[:2] == (["modern"], ["chair", "furniture"])


def test_the_tag_lists_are_the_vocabularys_canonical_keys() -> None:
    assert all(k == k.lower() for k in style_keys(DEFAULT_VOCABULARY))
    assert len(object_keys(DEFAULT_VOCABULARY)) == len(set(object_keys(DEFAULT_VOCABULARY)))
