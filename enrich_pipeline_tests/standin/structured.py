"""Structured output (``response_format``), thinking and languages, as the stand-in serves them.

What DashScope documents, and where (stored copies; public URLs):

- Which model takes which ``response_format`` (``formats_for``). JSON Schema: the comparison
  table of the structured-output page names only text models (qwen3-max, qwen-plus, qwen-flash
  and later snapshots, deepseek-v3.2) and **no vision model**
  (https://alibabacloud.com/help/zh/model-studio/json-mode, Feb 06 2026;
  https://www.alibabacloud.com/help/ja/doc-detail/2862209.html, Feb 17 2026). JSON Object:
  "most Qwen models"; the text list (https://www.alibabacloud.com/help/en/model-studio/json-mode,
  Mar 27 2026) names the Max, Plus (qwen3.5-plus), Flash (qwen3.5-flash), Turbo and Coder series;
  for vision, the old page names qwen-vl-max and qwen-vl-plus only, not their snapshots or
  -latest (https://help.aliyun.com/zh/model-studio/user-guide/json-mode), and the vision page
  says "Qwen3.6/3.5 series ... Structured output: Supported in non-thinking mode"
  (https://docs.qwencloud.com/developer-guides/multimodal/vision). For qwen3-vl-plus/-flash no
  official page could be read: only a third-party scrape of the Bailian console marks
  ``structured_output: true``; they take json_object here. Any other model (thinking-only ones,
  qvq and ``-thinking``, among them) takes no response_format but text.
- The refusal of a response_format a model does not take: **not documented**. The stand-in
  answers 400 ``invalid_parameter_error`` naming ``response_format.type``, worded as another
  OpenAI-compatible vendor words it (agno-agi/agno#2553), behind DashScope's usual prefix.
- json_object needs the word "json" (any case) in a system or user message, else "'messages'
  must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
  (the structured-output page; the 400 ``invalid_parameter_error`` body with the
  ``<400> InternalError.Algo.InvalidParameter:`` prefix as users got it, agno-agi/agno#5317).
  The page says json_schema does not need the word; users report the same check on json_schema
  (plastic-labs/honcho#663, qwen3.6-plus): the stand-in checks both, the stricter reading.
- Thinking (``thinking_mode``): on by default for the Qwen3.5 and Qwen3.6 series, off by default
  for the other hybrid models (Qwen3, Qwen3-VL), always on for thinking-only models
  (https://docs.qwencloud.com/developer-guides/text-generation/thinking;
  https://help.aliyun.com/en/model-studio/visual-reasoning). ``enable_thinking`` at the top of
  the body (the SDK's ``extra_body``) switches a hybrid model; ``thinking_budget`` caps the
  thinking tokens. The thinking comes back in ``message.reasoning_content`` and is billed as
  output ("generating extra tokens at output price",
  https://docs.qwencloud.com/developer-guides/text-generation/batch): the stand-in counts it in
  ``completion_tokens`` and, in OpenAI's shape, ``completion_tokens_details.reasoning_tokens``.
- Thinking with a response_format: structured output is listed for "non-thinking mode" only;
  what the service answers otherwise is **not documented**. The stand-in refuses it with a 400
  naming ``response_format`` and ``enable_thinking`` (a client that forgot to turn thinking off
  learns it on the first call, not from a bill).

How long a real model thinks over a caption is not documented either: the stand-in's reasoning
is a few hundred tokens (``reasoning_text``), an assumption the cost benchmark states.

Languages and tags follow the project's wire contract: json_schema names the languages as the
properties of ``captions`` and the tags as the enums of ``style_tags`` / ``object_tags``; other
requests name the languages on a line ``Languages: zh, en`` (none: English) and take tags from
the default vocabulary's keys. A text answer is the caption, or with several languages one
``<code>: <caption>`` line each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY
from enrich_pipeline_tests.standin.errors import INVALID, Reply
from enrich_pipeline_tests.standin.scenes import Scene
from enrich_pipeline_tests.standin.tokens import count_tokens

TEXT, JSON_OBJECT, JSON_SCHEMA = "text", "json_object", "json_schema"
RESPONSE_FORMATS = (TEXT, JSON_OBJECT, JSON_SCHEMA)

# Families named on the pages in the module docstring: a name matches when it is the family
# or the family followed by "-" (its snapshots).
_JSON_SCHEMA_FAMILIES = ("qwen3-max", "qwen-plus", "qwen-flash", "deepseek-v3.2")
_JSON_OBJECT_FAMILIES = (
    *_JSON_SCHEMA_FAMILIES,
    "qwen-max",
    "qwen-turbo",
    "qwen3-coder-plus",
    "qwen3-coder-flash",
    "qwen3.5-plus",
    "qwen3.5-flash",
    "qwen3.6-plus",
    "qwen3.6-flash",
    "qwen3-vl-plus",
    "qwen3-vl-flash",
)
_JSON_OBJECT_EXACT = frozenset({"qwen-vl-max", "qwen-vl-plus"})  # not snapshots, not -latest
_THINKING_BY_DEFAULT = ("qwen3.5-", "qwen3.6-")
_HYBRID = (*_THINKING_BY_DEFAULT, "qwen3-vl-plus", "qwen3-vl-flash", "qwen-plus", "qwen-flash")

_KEYWORD = "'messages' must contain the word 'json' in some form, to use 'response_format' of type"
_LANGUAGES = re.compile(r"^\s*Languages:\s*(.+?)\s*$", re.MULTILINE)
_UNKNOWN_STYLE, _UNKNOWN_OBJECT = "steampunk", "spaceship"  # in no vocabulary of the project


def _in_family(model: str, families: Iterable[str]) -> bool:
    return any(model == f or model.startswith(f + "-") for f in families)


def thinking_only(model: str) -> bool:
    return model.startswith("qvq") or "-thinking" in model


def formats_for(model: str, overrides: Mapping[str, Iterable[str]] | None = None) -> frozenset[str]:
    """The response_format types ``model`` takes (``overrides``: the server's knob)."""
    if overrides and model in overrides:
        return frozenset({TEXT, *overrides[model]})
    if thinking_only(model):
        return frozenset({TEXT})
    kinds = {TEXT}
    if _in_family(model, _JSON_OBJECT_FAMILIES) or model in _JSON_OBJECT_EXACT:
        kinds.add(JSON_OBJECT)
    if _in_family(model, _JSON_SCHEMA_FAMILIES):
        kinds.add(JSON_SCHEMA)
    return frozenset(kinds)


def thinking_mode(model: str, body: Mapping[str, Any]) -> bool:
    """Whether ``model`` thinks for this body."""
    if thinking_only(model):
        return True
    if not any(model.startswith(p) for p in _HYBRID):
        return False
    asked = body.get("enable_thinking")
    if isinstance(asked, bool):
        return asked
    return any(model.startswith(p) for p in _THINKING_BY_DEFAULT)


@dataclass(frozen=True)
class Request:
    """What a chat body asks of the answer."""

    kind: str  # TEXT, JSON_OBJECT or JSON_SCHEMA
    languages: tuple[str, ...]
    languages_stated: bool  # a Languages line or a captions schema named them
    styles: frozenset[str]  # tags the answer may use
    objects: frozenset[str]
    thinking: bool
    thinking_budget: int | None
    schema_tokens: int  # the schema's tokens, which the model reads as input


def read_request(
    body: Mapping[str, Any],
    model: str,
    texts: list[str],
    overrides: Mapping[str, Iterable[str]] | None = None,
) -> Request:
    """Check ``body``'s response_format and thinking against ``model``; `texts` are its
    messages' text parts. Raises ``Reply`` with the refusals in the module docstring."""
    fmt = body.get("response_format")
    kind = TEXT
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        supported = formats_for(model, overrides)
        if kind not in supported:
            allowed = " and ".join(f"`{k}`" for k in RESPONSE_FORMATS if k in supported)
            raise Reply(
                400,
                f"{INVALID}The parameter `response_format.type` specified in the request are "
                f"not valid: invalid value: `{kind}`, supported values are: {allowed}.",
            )
    thinking = thinking_mode(model, body)
    if kind != TEXT:
        if thinking:
            raise Reply(
                400,
                f"{INVALID}The response_format parameter is only supported in non-thinking "
                "mode: set enable_thinking to false.",
            )
        if not any("json" in t.lower() for t in texts):
            raise Reply(400, f"{INVALID}{_KEYWORD} 'json_object'.")
    budget = body.get("thinking_budget")
    budget = budget if isinstance(budget, int) and not isinstance(budget, bool) else None
    styles = frozenset(DEFAULT_VOCABULARY.styles)
    objects = frozenset(DEFAULT_VOCABULARY.objects) | frozenset(DEFAULT_VOCABULARY.categories)
    languages: tuple[str, ...] = ()
    schema_tokens = 0
    if kind == JSON_SCHEMA:
        schema = _schema(fmt)
        schema_tokens = count_tokens(json.dumps(schema))
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        captions = props.get("captions") if isinstance(props.get("captions"), dict) else {}
        if isinstance(captions.get("properties"), dict):
            languages = tuple(str(k) for k in captions["properties"])
        styles = _enum(props.get("style_tags"), styles)
        objects = _enum(props.get("object_tags"), objects)
    if not languages:
        stated = [m.group(1) for t in texts for m in _LANGUAGES.finditer(t)]
        if stated:
            languages = tuple(c.strip() for c in stated[-1].split(",") if c.strip())
    return Request(
        kind=kind,
        languages=languages or ("en",),
        languages_stated=bool(languages),
        styles=styles,
        objects=objects,
        thinking=thinking,
        thinking_budget=budget,
        schema_tokens=schema_tokens,
    )


def _schema(fmt: Mapping[str, Any]) -> dict[str, Any]:
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise Reply(400, f"{INVALID}response_format.json_schema.schema must be an object.")
    return schema


def _enum(prop: Any, default: frozenset[str]) -> frozenset[str]:
    items = prop.get("items") if isinstance(prop, dict) else None
    enum = items.get("enum") if isinstance(items, dict) else None
    return frozenset(str(v) for v in enum) if isinstance(enum, list) else default


def answer_content(scene: Scene, request: Request, fault: str | None) -> str:
    """The message content: the answer JSON, or the caption text. The answer faults of
    ``faults.ANSWER_FAULTS`` are served here."""
    captions = {lang: scene.caption(lang) for lang in request.languages}
    if request.kind == TEXT:
        if len(captions) == 1:
            return next(iter(captions.values()))
        return "\n".join(f"{lang}: {text}" for lang, text in captions.items())
    answer = {
        "captions": captions,
        "style_tags": [t for t in scene.styles if t in request.styles],
        "object_tags": [t for t in scene.objects if t in request.objects],
    }
    if fault == "unknown_tags":
        answer["style_tags"] = [*answer["style_tags"], _UNKNOWN_STYLE]
        answer["object_tags"] = [*answer["object_tags"], _UNKNOWN_OBJECT]
    text = json.dumps(answer, ensure_ascii=False)
    if fault == "malformed_answer":  # cut mid-string, as a model stopped short would leave it
        return text[: len(text) // 2]
    return text


def reasoning_text(scene: Scene, request: Request) -> str:
    """What a thinking model writes before its answer: deterministic, a few hundred tokens,
    cut to ``thinking_budget`` tokens when the body sets one."""
    objects = ", ".join(scene.objects) or "nothing I can name"
    styles = ", ".join(scene.styles) or "no clear style"
    languages = ", ".join(request.languages)
    steps = [
        "The user wants a short description of the picture for a product catalogue.",
        f"Let me look at the whole image first. I can see: {objects}.",
        f"The overall look suggests these styles: {styles}.",
        f"The answer has to be given in these languages: {languages}.",
        f"In English I would say: {scene.captions['en']}",
        "Is there anything in the background I should mention? Let me check the corners, the "
        "light, the floor and the walls, and whether any object is cut off by the frame.",
        "The caption should be one or two sentences, concrete, without guessing brands, "
        "prices or anything the picture does not show.",
    ]
    if request.kind != TEXT:
        steps.append(
            "The tags must come from the allowed lists only, in lower case, without "
            "duplicates; I should not invent tags that are not on the lists."
        )
    for lang in request.languages:
        steps.append(
            f"For {lang}, I will check that the sentence reads naturally and names the main "
            "object, its color and the room or setting, and that nothing is repeated."
        )
    steps.append(
        "Let me double-check the colors against the image once more, then write the final "
        "answer exactly in the requested format."
    )
    text = " ".join(steps * 2)  # a model deliberates, then goes over its plan again
    if request.thinking_budget is not None:
        words = text.split(" ")
        while words and count_tokens(" ".join(words)) > request.thinking_budget:
            words = words[: max(0, len(words) - max(1, len(words) // 10))]
        text = " ".join(words)
    return text
