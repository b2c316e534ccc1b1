"""Which answer format a batch submission uses: what collected batches showed of the model's
formats (a refusal or mostly malformed answers lower it for good, a batch answered well in a
better format raises it again), and ENRICH_ANSWER_FORMAT set explicitly winning."""

from __future__ import annotations

import pytest

from enrich_pipeline.enrichment.structured import JSON_OBJECT, JSON_SCHEMA, TEXT
from enrich_pipeline.providers.formats import AUTO, batch_format, batch_verdict

pytestmark = pytest.mark.unit

BEIJING = "https://dashscope.aliyuncs.com/compatible-mode/v1"
MODEL = "qwen3-vl-plus"  # documented: json_object, then text


def test_a_refused_line_lowers_the_format_one_step() -> None:
    assert batch_verdict(JSON_OBJECT, refused=1, malformed=0, wellformed=5) == TEXT
    assert batch_verdict(JSON_SCHEMA, refused=3, malformed=0, wellformed=0) == JSON_OBJECT


def test_mostly_malformed_answers_lower_the_format_a_few_do_not() -> None:
    assert batch_verdict(JSON_OBJECT, refused=0, malformed=3, wellformed=2) == TEXT
    assert batch_verdict(JSON_OBJECT, refused=0, malformed=1, wellformed=2) == JSON_OBJECT
    # One image malformed in a batch of one: the row's error, not the format's.
    assert batch_verdict(JSON_OBJECT, refused=0, malformed=1, wellformed=0) is None


def test_a_batch_without_answers_tells_nothing_and_text_has_nothing_below() -> None:
    assert batch_verdict(JSON_OBJECT, refused=0, malformed=0, wellformed=0) is None
    assert batch_verdict(TEXT, refused=0, malformed=0, wellformed=4) == TEXT
    assert batch_verdict(TEXT, refused=2, malformed=0, wellformed=0) is None


def test_without_verdicts_the_documented_format_is_used_silently() -> None:
    assert batch_format(AUTO, MODEL, BEIJING, []) == (JSON_OBJECT, None)


def test_a_refusal_lowers_the_models_next_submissions_for_good() -> None:
    refused = [(JSON_OBJECT, TEXT, "batch_1")]
    fmt, note = batch_format(AUTO, MODEL, BEIJING, refused)
    assert fmt == TEXT
    assert note is not None and "\n" not in note
    assert "batch_1" in note and "json_object" in note and "ENRICH_ANSWER_FORMAT" in note
    # Text batches answered well since do not raise it back.
    later = [*refused, (TEXT, TEXT, "batch_2"), (TEXT, TEXT, "batch_3")]
    assert batch_format(AUTO, MODEL, BEIJING, later)[0] == TEXT


def test_a_batch_answered_well_in_a_better_format_raises_it_again() -> None:
    verdicts = [(JSON_OBJECT, TEXT, "batch_1"), (JSON_OBJECT, JSON_OBJECT, "batch_2")]
    assert batch_format(AUTO, MODEL, BEIJING, verdicts) == (JSON_OBJECT, None)


def test_a_refusal_of_a_better_format_does_not_raise_a_lower_limit() -> None:
    # json_object refused (-> text), then an explicit json_schema refused (-> json_object).
    verdicts = [(JSON_OBJECT, TEXT, "batch_1"), (JSON_SCHEMA, JSON_OBJECT, "batch_2")]
    fmt, note = batch_format(AUTO, MODEL, BEIJING, verdicts)
    assert fmt == TEXT and note is not None and "batch_1" in note


def test_answer_format_set_explicitly_wins_and_says_what_was_seen() -> None:
    refused = [(JSON_OBJECT, TEXT, "batch_1")]
    fmt, note = batch_format(JSON_OBJECT, MODEL, BEIJING, refused)
    assert fmt == JSON_OBJECT
    assert note is not None and "ENRICH_ANSWER_FORMAT" in note and "batch_1" in note
    assert batch_format(TEXT, MODEL, BEIJING, refused) == (TEXT, None)


def test_verdicts_of_unknown_formats_are_ignored() -> None:
    assert batch_format(AUTO, MODEL, BEIJING, [("xml", TEXT, "b")]) == (JSON_OBJECT, None)
