"""Style and object tags derived from a caption by transparent keyword rules.

Rules instead of a second model call: tags are free, deterministic, explainable ("the caption
said *armchair*") and users extend the vocabulary with a JSON file. Matching works on word
tokens, never substrings, so "cart" cannot produce "car" and "bookshelf" cannot produce "book".
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from os import PathLike
from pathlib import Path
from types import MappingProxyType

__all__ = ["DEFAULT_VOCABULARY", "TagVocabulary", "derive_tags"]

Keywords = Mapping[str, tuple[str, ...]]
# Values accepted by extend(): a keyword list, or None to remove a tag from the vocabulary.
KeywordUpdates = Mapping[str, Iterable[str] | str | None]

_SECTIONS = ("styles", "objects", "categories")

# Han, kana and similar scripts do not separate words with spaces, so each character is a token
# and a keyword such as "椅子" matches as a two-token phrase. Other scripts split on non-letters.
_TOKEN = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3100-\u312f]|[^\W_]+",
    re.UNICODE,
)

_IRREGULAR_PLURALS = {
    "person": ("people", "persons"),
    "man": ("men",),
    "woman": ("women",),
    "child": ("children",),
    "foot": ("feet",),
    "tooth": ("teeth",),
    "mouse": ("mice",),
    "goose": ("geese",),
    "ox": ("oxen",),
}
_VOWELS = frozenset("aeiou")


def _normalize(text: str) -> str:
    # NFKD + dropping combining marks lets "rétro" match "retro" and "Café" match "cafe";
    # casefold handles cases lower() misses (German ß, Greek final sigma).
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped).casefold()


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(_normalize(text))


def _plural_forms(word: str) -> set[str]:
    """The word and its likely plurals.

    Plurals are generated for keywords rather than caption words being stemmed: a wrong
    generated form ("rooves") just never matches, whereas a wrong stem would turn caption words
    into other words ("bus" -> "bu", "glass" -> "glas").
    """
    forms = {word}
    if not word.isalpha() or len(word) < 2:
        return forms
    forms.update(_IRREGULAR_PLURALS.get(word, ()))
    if word.endswith("man") and len(word) > 3:
        forms.add(word[:-3] + "men")  # fireman, chairman, sportsman
    if word.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(word + "es")
    elif word.endswith("y") and word[-2] not in _VOWELS:
        forms.add(word[:-1] + "ies")
    else:
        forms.add(word + "s")
        if word.endswith("o"):
            forms.add(word + "es")  # tomato, potato (photos and pianos take the plain s)
        elif word.endswith("fe"):
            forms.add(word[:-2] + "ves")  # knife, wife
        elif word.endswith("f"):
            forms.add(word[:-1] + "ves")  # shelf, leaf
    return forms


@dataclass(frozen=True)
class _Target:
    kind: str  # "style", "object" or "category"
    tag: str


@dataclass(frozen=True)
class _Matcher:
    """Keyword phrases indexed by first token, longest first, for greedy longest matching."""

    index: Mapping[str, tuple[tuple[tuple[str, ...], tuple[_Target, ...]], ...]]

    @classmethod
    def build(cls, phrases: Mapping[tuple[str, ...], list[_Target]]) -> _Matcher:
        grouped: dict[str, list[tuple[tuple[str, ...], tuple[_Target, ...]]]] = {}
        for phrase, targets in phrases.items():
            grouped.setdefault(phrase[0], []).append((phrase, tuple(targets)))
        return cls(
            {
                first: tuple(sorted(entries, key=lambda entry: -len(entry[0])))
                for first, entries in grouped.items()
            }
        )

    def scan(self, tokens: list[str]) -> list[tuple[int, tuple[_Target, ...]]]:
        """Non-overlapping matches in caption order.

        Longest match wins and consumes its tokens, so "table lamp" is a lamp and not also a
        table, and "office chair" does not make the picture an office.
        """
        found: list[tuple[int, tuple[_Target, ...]]] = []
        position = 0
        while position < len(tokens):
            for phrase, targets in self.index.get(tokens[position], ()):
                if tuple(tokens[position : position + len(phrase)]) == phrase:
                    found.append((position, targets))
                    position += len(phrase)
                    break
            else:
                position += 1
        return found


def _freeze(section: str, mapping: Mapping[str, Iterable[str] | str]) -> Keywords:
    frozen: dict[str, tuple[str, ...]] = {}
    for raw_tag, raw_keywords in mapping.items():
        if not isinstance(raw_tag, str) or not raw_tag.strip():
            raise ValueError(f"{section}: tag names must be non-empty strings, got {raw_tag!r}")
        tag = raw_tag.strip().lower()
        keywords = (raw_keywords,) if isinstance(raw_keywords, str) else tuple(raw_keywords)
        for keyword in keywords:
            if not isinstance(keyword, str) or not _tokens(keyword):
                raise ValueError(f"{section}.{tag}: keyword {keyword!r} contains no word")
        merged = frozen.get(tag, ()) + keywords
        frozen[tag] = tuple(dict.fromkeys(k.strip() for k in merged))
    return MappingProxyType(frozen)


@dataclass(frozen=True)
class TagVocabulary:
    """Tags and the caption keywords that trigger them.

    ``categories`` are broader object tags. A category entry that names an object tag is
    implied whenever that object is found ("chair" -> "furniture"); any other entry is matched
    as a caption keyword ("bedroom" -> "room"). Every tag name also matches itself.
    """

    styles: Keywords = field(default_factory=dict)
    objects: Keywords = field(default_factory=dict)
    categories: Keywords = field(default_factory=dict)
    _style_matcher: _Matcher = field(init=False, repr=False, compare=False)
    _object_matcher: _Matcher = field(init=False, repr=False, compare=False)
    _implied: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise and compile once: derive_tags runs per row, the vocabulary per process.
        for section in _SECTIONS:
            object.__setattr__(self, section, _freeze(section, getattr(self, section)))

        style_phrases: dict[tuple[str, ...], list[_Target]] = {}
        for tag, keywords in self.styles.items():
            _add_phrases(style_phrases, (tag, *keywords), _Target("style", tag))

        object_phrases: dict[tuple[str, ...], list[_Target]] = {}
        for tag, keywords in self.objects.items():
            _add_phrases(object_phrases, (tag, *keywords), _Target("object", tag))
        implied: dict[str, list[str]] = {}
        object_tags = {_normalize(tag) for tag in self.objects}
        for category, members in self.categories.items():
            caption_words = [category]
            for member in members:
                if _normalize(member) in object_tags:
                    implied.setdefault(_normalize(member), []).append(category)
                else:
                    caption_words.append(member)
            _add_phrases(object_phrases, caption_words, _Target("category", category))

        object.__setattr__(self, "_style_matcher", _Matcher.build(style_phrases))
        object.__setattr__(self, "_object_matcher", _Matcher.build(object_phrases))
        object.__setattr__(
            self, "_implied", MappingProxyType({k: tuple(v) for k, v in implied.items()})
        )

    __hash__ = None  # type: ignore[assignment]  # holds mappings; equality only

    def extend(
        self,
        *,
        styles: KeywordUpdates | None = None,
        objects: KeywordUpdates | None = None,
        categories: KeywordUpdates | None = None,
    ) -> TagVocabulary:
        """A copy with keywords added to existing tags, new tags appended, and tags whose
        update is ``None`` removed."""
        updates = {"styles": styles, "objects": objects, "categories": categories}
        merged: dict[str, dict[str, tuple[str, ...]]] = {}
        for section in _SECTIONS:
            current = dict(getattr(self, section))
            for raw_tag, keywords in (updates[section] or {}).items():
                tag = str(raw_tag).strip().lower()
                if keywords is None:
                    current.pop(tag, None)
                    continue
                extra = (keywords,) if isinstance(keywords, str) else tuple(keywords)
                current[tag] = current.get(tag, ()) + extra
            merged[section] = current
        return TagVocabulary(**merged)

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> TagVocabulary:
        """The default vocabulary extended with a JSON file of the same three sections."""
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"tag vocabulary {path}: invalid JSON: {exc}") from None
        return DEFAULT_VOCABULARY.extend(**_sections(document, f"tag vocabulary {path}"))


def _sections(document: object, where: str) -> dict[str, KeywordUpdates]:
    """The three sections of a vocabulary document, checked."""
    if not isinstance(document, dict):
        raise ValueError(f"{where}: expected a JSON object")
    unknown = sorted(set(document) - set(_SECTIONS))
    if unknown:
        # A typo such as "style" would otherwise be silently ignored.
        raise ValueError(f"{where}: unknown section(s) {unknown}; expected {list(_SECTIONS)}")
    sections: dict[str, KeywordUpdates] = {}
    for section in _SECTIONS:
        value = document.get(section, {})
        # A bare string is refused: "armchair, stool" would silently become one phrase.
        if not isinstance(value, dict) or not all(
            v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            for v in value.values()
        ):
            raise ValueError(
                f"{where}: {section!r} must map tag names to lists of strings"
                " (or null to remove a tag)"
            )
        sections[section] = value
    return sections


def _add_phrases(
    phrases: dict[tuple[str, ...], list[_Target]], keywords: Iterable[str], target: _Target
) -> None:
    for keyword in keywords:
        words = _tokens(keyword)
        if not words:
            continue
        # Only the last word takes a plural: "living rooms", "coffee tables".
        for last in _plural_forms(words[-1]):
            targets = phrases.setdefault((*words[:-1], last), [])
            if target not in targets:
                targets.append(target)


# The default vocabulary targets what the table holds: saved pages, products and photos, mostly
# interiors, fashion and everyday objects. It is a data file read like a user's extension
# (``data/vocabulary.json``); extend it with TagVocabulary.from_file().
DEFAULT_VOCABULARY = TagVocabulary(
    **_sections(
        json.loads(resources.files(__package__).joinpath("data/vocabulary.json").read_text()),
        "the default vocabulary",
    )
)


def derive_tags(
    caption: str, vocabulary: TagVocabulary = DEFAULT_VOCABULARY
) -> tuple[list[str], list[str]]:
    """``(style_tags, object_tags)`` found in ``caption``, in order of first appearance.

    A category implied by an object follows that object directly:
    "A modern blue chair in a minimalist living room" gives
    ``(["modern", "minimalist"], ["chair", "furniture", "room"])``.
    """
    if not caption:
        return [], []
    tokens = _tokens(caption)

    styles: dict[str, None] = {}
    for _position, targets in vocabulary._style_matcher.scan(tokens):
        for target in targets:
            styles.setdefault(target.tag)

    objects: dict[str, None] = {}
    for _position, targets in vocabulary._object_matcher.scan(tokens):
        # Objects first, then what they imply, then categories named in the caption itself.
        for target in targets:
            if target.kind == "object":
                objects.setdefault(target.tag)
                for category in vocabulary._implied.get(_normalize(target.tag), ()):
                    objects.setdefault(category)
        for target in targets:
            if target.kind == "category":
                objects.setdefault(target.tag)
    return list(styles), list(objects)
