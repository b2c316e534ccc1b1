"""The structured answer: one vision call returns every configured language's caption and the
style and object tags chosen from the vocabulary.

Pure domain, free of any API: the JSON schema a request carries (tags as enums of the
vocabulary's canonical keys), the messages for each answer format, and the reading of an
answer's text into captions and tags. Which format a model takes, and the request body, are API
policy (``providers/formats.py``, ``providers/wire.py``).

Three formats, best first (the run steps down this ladder, never up):

- ``json_schema``: the answer must match the schema (``strict``), tags are enums;
- ``json_object``: the answer is a JSON object; the prompt lists the tags to choose from;
- ``text``: a plain caption (one language) or one ``<code>: <caption>`` line per language;
  tags then come from the keyword rules over the captions (``tags.derive_tags``).

Tags are canonical English keys (``styles`` keys; ``objects`` and ``categories`` keys), lower
case, whatever the caption languages, so that filters on ``style_tags`` / ``object_tags`` work
the same for every language. Tags the model returns outside the vocabulary are dropped and
counted, never stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from enrich_pipeline.enrichment.records import TAGS_FROM_MODEL, TAGS_FROM_RULES
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary, derive_tags
from enrich_pipeline.enrichment.text import clean_caption

JSON_SCHEMA = "json_schema"
JSON_OBJECT = "json_object"
TEXT = "text"
FORMATS = (JSON_SCHEMA, JSON_OBJECT, TEXT)  # best first: the order the run steps down

SCHEMA_NAME = "image_enrichment"
KEYS = ("captions", "style_tags", "object_tags")

# Names that help the model read a code; the `Languages:` line keeps the codes themselves.
_LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Simplified Chinese",
    "zh-Hans": "Simplified Chinese",
    "zh-Hant": "Traditional Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "it": "Italian",
    "ru": "Russian",
    "ar": "Arabic",
    "id": "Indonesian",
    "vi": "Vietnamese",
    "th": "Thai",
}
_ENGLISH_ONLY = re.compile(r"\s*Answer in English\.?\s*$", re.I)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S | re.I)
_LINE = re.compile(r"^\s*[\[(]?([A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*)[\])]?\s*[:：]\s*(.*)$")

SYSTEM_JSON = (
    "You describe images for a product catalogue. Reply with one JSON object and nothing "
    "else: no code fence, no text before or after it."
)


class MalformedAnswer(ValueError):
    """An answer that is not what was asked for: not JSON, not an object, a language's caption
    missing or empty. The provider layer makes it the row's error ``malformed_answer``."""


@dataclass(frozen=True)
class Question:
    """What each vision call asks: captions in ``languages`` (in order; the first is
    ``metadata.caption``), tags from ``vocabulary``; ``prompt`` is the configured caption
    prompt (``DashScopeSettings.prompt``), sent unchanged for an English text answer."""

    prompt: str
    languages: tuple[str, ...] = ("en",)
    vocabulary: TagVocabulary = field(default_factory=lambda: DEFAULT_VOCABULARY)
    _schema: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("a question asks for at least one language")
        object.__setattr__(self, "_schema", _schema(self.languages, self.vocabulary))

    __hash__ = None  # type: ignore[assignment]  # holds the vocabulary; equality only

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the answer (``json_schema`` format); a fresh copy."""
        return json.loads(json.dumps(self._schema))

    def messages(self, answer_format: str, image_url: str) -> list[dict[str, Any]]:
        """The chat messages asking for this answer in ``answer_format``: with a system message
        naming JSON whenever a response_format is sent (DashScope refuses ``json_object``
        otherwise, and reportedly checks ``json_schema`` too: RESEARCH, structured output)."""
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": self.prompt_text(answer_format)},
        ]
        user = {"role": "user", "content": content}
        if answer_format == TEXT:
            return [user]
        return [{"role": "system", "content": SYSTEM_JSON}, user]

    def prompt_text(self, answer_format: str) -> str:
        """The user prompt's text for ``answer_format``."""
        if answer_format not in FORMATS:
            raise ValueError(f"unknown answer format {answer_format!r}")
        if answer_format == TEXT and self.languages == ("en",):
            return self.prompt  # the legacy prompt, unchanged
        base = _ENGLISH_ONLY.sub("", self.prompt).rstrip()
        names = ", ".join(
            f"{code} ({_LANGUAGE_NAMES[code]})"
            for code in self.languages
            if code in _LANGUAGE_NAMES
        )
        said = f" Language names: {names}." if names else ""
        languages = f"Languages: {', '.join(self.languages)}"
        if answer_format == TEXT:
            return (
                f"{base}\nWrite that description in each language below, one line per "
                f"language, as <code>: <caption>, in the order given, and nothing else.{said}\n"
                f"{languages}"
            )
        lines = [
            base,
            'Answer with a JSON object with the keys "captions", "style_tags" and '
            '"object_tags". "captions": an object with one key per language code below, each '
            "that description in that language." + said,
            '"style_tags": the styles the image shows; "object_tags": the objects and kinds of '
            "thing it shows. Choose tags only from the lists given, as written (lower case); "
            "leave a list empty rather than guess.",
        ]
        if answer_format == JSON_OBJECT:
            # json_schema carries the lists as enums; json_object has only the prompt.
            lines.append("Style tags to choose from: " + ", ".join(style_keys(self.vocabulary)))
            lines.append("Object tags to choose from: " + ", ".join(object_keys(self.vocabulary)))
        lines.append(languages)
        return "\n".join(lines)


def style_keys(vocabulary: TagVocabulary) -> list[str]:
    """The style tags a model may return: the vocabulary's ``styles`` keys."""
    return list(vocabulary.styles)


def object_keys(vocabulary: TagVocabulary) -> list[str]:
    """The object tags a model may return: ``objects`` keys, then ``categories`` keys."""
    return list(dict.fromkeys([*vocabulary.objects, *vocabulary.categories]))


def _schema(languages: tuple[str, ...], vocabulary: TagVocabulary) -> dict[str, Any]:
    def tags(keys: list[str]) -> dict[str, Any]:
        return {"type": "array", "items": {"type": "string", "enum": keys}}

    return {
        "type": "object",
        "properties": {
            "captions": {
                "type": "object",
                "properties": {code: {"type": "string"} for code in languages},
                "required": list(languages),
                "additionalProperties": False,
            },
            "style_tags": tags(style_keys(vocabulary)),
            "object_tags": tags(object_keys(vocabulary)),
        },
        "required": list(KEYS),
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Answer:
    """One image's answer: a caption per language (in the asked order) and, when the model
    chose them, its tags as it returned them (``None``: tags by the keyword rules).

    ``malformed_tags`` counts tag entries that were not strings (dropped at reading)."""

    captions: Mapping[str, str]
    answer_format: str = TEXT
    style_tags: tuple[str, ...] | None = None
    object_tags: tuple[str, ...] | None = None
    tags_source: str = TAGS_FROM_RULES
    malformed_tags: int = 0

    @property
    def caption(self) -> str:
        """The first language's caption (``metadata.caption``)."""
        return next(iter(self.captions.values()), "")

    @classmethod
    def plain(cls, caption: str, language: str = "en") -> Answer:
        """A caption alone, in one language: tags by the rules."""
        return cls({language: caption})

    def to_json(self) -> str:
        """The whole answer as the answer cache stores it (``enrich_answer_cache.answer``)."""
        document: dict[str, Any] = {"captions": dict(self.captions)}
        if self.style_tags is not None:
            document["style_tags"] = list(self.style_tags)
        if self.object_tags is not None:
            document["object_tags"] = list(self.object_tags)
        document["tags_source"] = self.tags_source
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_cache(
        cls, caption: str, answer: str | None, answer_format: str, languages: Iterable[str]
    ) -> Answer:
        """An answer cache entry: ``answer`` NULL is a caption alone (entries from before
        structured answers: English text, tags by the rules). An entry that cannot be read is
        a miss (``MalformedAnswer``)."""
        codes = tuple(languages)
        if answer is None:
            return cls.plain(caption, codes[0] if codes else "en")
        try:
            document = json.loads(answer)
        except ValueError as exc:
            raise MalformedAnswer(f"cached answer is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise MalformedAnswer("cached answer is not an object")
        captions = _captions(document.get("captions"), codes)
        source = document.get("tags_source")
        if source == TAGS_FROM_MODEL:
            styles, bad_s = _tag_list(document.get("style_tags"), "style_tags")
            objects, bad_o = _tag_list(document.get("object_tags"), "object_tags")
            return cls(captions, answer_format, styles, objects, TAGS_FROM_MODEL, bad_s + bad_o)
        return cls(captions, answer_format)


def _captions(value: object, languages: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise MalformedAnswer('the answer has no "captions" object')
    captions: dict[str, str] = {}
    for code in languages:
        text = value.get(code)
        cleaned = clean_caption(text) if isinstance(text, str) else ""
        if not cleaned:
            raise MalformedAnswer(f"the answer has no {code} caption")
        captions[code] = cleaned
    return captions


def _tag_list(value: object, key: str) -> tuple[tuple[str, ...], int]:
    """A tag list as returned: strings kept (trimmed, lower case, once each), other entries
    dropped and counted; no list at all is an empty one."""
    if value is None:
        return (), 0
    if not isinstance(value, list):
        raise MalformedAnswer(f'"{key}" is not a list')
    kept = [v.strip().lower() for v in value if isinstance(v, str) and v.strip()]
    return tuple(dict.fromkeys(kept)), len(value) - len(kept)


def _json_document(text: str) -> object:
    fenced = _FENCE.match(text)
    try:
        # Models asked for bare JSON still fence it now and then: the fence is not the answer.
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        raise MalformedAnswer("the answer is not JSON") from None
    except RecursionError:
        # Nesting deeper than the parser recurses (a hostile answer within the size cap).
        raise MalformedAnswer("the answer is JSON nested too deeply to read") from None


def read_answer(text: str, answer_format: str, languages: Iterable[str]) -> Answer:
    """The answer a model's message text gives, read for ``answer_format``.

    Raises ``MalformedAnswer`` when it is not what was asked for. Captions are cleaned
    (``text.clean_caption``); tags are kept as returned (lower case), to be checked against
    the vocabulary when the answer is accepted (``accepted_tags``)."""
    codes = tuple(languages)
    if answer_format == TEXT:
        return Answer(_text_captions(text, codes), TEXT)
    document = _json_document(text)
    if not isinstance(document, dict):
        raise MalformedAnswer(f"the answer is a JSON {type(document).__name__}, not an object")
    captions = _captions(document.get("captions"), codes)
    styles, bad_s = _tag_list(document.get("style_tags"), "style_tags")
    objects, bad_o = _tag_list(document.get("object_tags"), "object_tags")
    return Answer(captions, answer_format, styles, objects, TAGS_FROM_MODEL, bad_s + bad_o)


def _text_captions(text: str, languages: tuple[str, ...]) -> dict[str, str]:
    """A text answer: the caption itself for one language, else one ``<code>: <caption>``
    line per language (a single language's answer without its prefix is taken whole)."""
    if languages == ("en",):
        caption = clean_caption(text)
        if not caption:
            raise MalformedAnswer("the answer has no en caption")
        return {"en": caption}
    found: dict[str, str] = {}
    wanted = {code.lower(): code for code in languages}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match.group(1).lower() in wanted:
            code = wanted[match.group(1).lower()]
            found.setdefault(code, clean_caption(match.group(2)))
    if not found and len(languages) == 1:
        found[languages[0]] = clean_caption(text)
    missing = [code for code in languages if not found.get(code)]
    if missing:
        raise MalformedAnswer(f"the answer has no {', '.join(missing)} caption")
    return {code: found[code] for code in languages}


def rule_tags(
    captions: Iterable[str], vocabulary: TagVocabulary = DEFAULT_VOCABULARY
) -> tuple[list[str], list[str]]:
    """Tags by the keyword rules over every caption, in order of first appearance."""
    styles: dict[str, None] = {}
    objects: dict[str, None] = {}
    for caption in captions:
        found_styles, found_objects = derive_tags(caption, vocabulary)
        styles.update(dict.fromkeys(found_styles))
        objects.update(dict.fromkeys(found_objects))
    return list(styles), list(objects)


def accepted_tags(
    answer: Answer, vocabulary: TagVocabulary = DEFAULT_VOCABULARY
) -> tuple[list[str], list[str], int]:
    """``(style_tags, object_tags, dropped)`` to store for ``answer``: the model's tags that are
    in the vocabulary (a category implied by an object follows it, as the rules do), the others
    dropped and counted; or, for an answer without model tags, the keyword rules' tags."""
    if answer.style_tags is None or answer.object_tags is None:
        styles, objects = rule_tags(answer.captions.values(), vocabulary)
        return styles, objects, answer.malformed_tags
    allowed_styles = set(style_keys(vocabulary))
    allowed_objects = set(object_keys(vocabulary))
    styles = [t for t in answer.style_tags if t in allowed_styles]
    objects: dict[str, None] = {}
    for tag in answer.object_tags:
        if tag in allowed_objects:
            objects.setdefault(tag)
            for category in vocabulary.categories_of(tag):
                objects.setdefault(category)
    kept_objects = [t for t in answer.object_tags if t in allowed_objects]
    dropped = (
        len(answer.style_tags)
        - len(styles)
        + len(answer.object_tags)
        - len(kept_objects)
        + answer.malformed_tags
    )
    return styles, list(objects), dropped
