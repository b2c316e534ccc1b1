"""Style and object tags derived from a caption by transparent keyword rules.

Rules instead of a second model call: tags are free, deterministic, explainable ("the caption
said *armchair*") and users extend the vocabulary with a JSON file. Matching works on word
tokens, never substrings, so "cart" cannot produce "car" and "bookshelf" cannot produce "book".

Tags are canonical English keys; each has words per language, a label (what a prompt shows the
model, ``TagVocabulary.labels``) and aliases, and every language's words match any caption, so
"一把椅子" gives ``chair``. Scripts without spaces (Chinese, Japanese) are matched character by
character, longest phrase first; the ``ignore`` phrases are words that contain a keyword but
mean something else ("画面包含…": the picture contains, not 面包, bread).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from os import PathLike
from pathlib import Path
from types import MappingProxyType

from enrich_pipeline.enrichment.words import LANGUAGE_CODE, characters_and_words

__all__ = ["DEFAULT_VOCABULARY", "TagVocabulary", "Words", "derive_tags"]

ENGLISH = "en"


@dataclass(frozen=True)
class Words:
    """A tag's words in one language: its label, then the other words that name it."""

    label: str
    aliases: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return (self.label, *self.aliases)


# A tag's words by language code; English is always there, labelled with the tag itself.
Terms = Mapping[str, Words]
Keywords = Mapping[str, Terms]
# What a tag may be given as (to the constructor, extend() or a JSON file): English aliases (a
# list, or one string); by language, a list of words (a language's first list starts with its
# label) or {"label": ..., "aliases": [...]}; or None (extend() only) to remove the tag.
LanguageUpdate = Words | Iterable[str] | Mapping[str, object]
TagUpdate = Iterable[str] | str | Mapping[str, LanguageUpdate] | None
KeywordUpdates = Mapping[str, TagUpdate]
# Phrases by language code.
Ignored = Mapping[str, tuple[str, ...]]

_SECTIONS = ("styles", "objects", "categories")
_DOCUMENT_KEYS = (*_SECTIONS, "ignore")


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
    # Han, kana and similar scripts do not separate words with spaces, so each character is a
    # token and a keyword such as "椅子" matches as a two-token phrase.
    return characters_and_words(_normalize(text))


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


def _checked_words(where: str, words: object) -> tuple[str, ...]:
    # A bare string is refused here: "armchair, stool" would silently become one phrase.
    if isinstance(words, str) or not isinstance(words, Iterable):
        raise ValueError(f"{where}: expected a list of words, got {words!r}")
    checked = []
    for word in words:
        if not isinstance(word, str) or not _tokens(word):
            raise ValueError(f"{where}: keyword {word!r} contains no word")
        checked.append(word.strip())
    return tuple(checked)


def _merge_language(
    where: str, tag: str, code: str, current: Words | None, update: LanguageUpdate
) -> Words:
    """``current`` with ``update`` applied: aliases are appended; a label is set by a
    ``{"label": ...}`` update, or by the first word of a language's first list (English's
    label is the tag itself)."""
    if not isinstance(code, str) or not LANGUAGE_CODE.fullmatch(code):
        raise ValueError(f"{where}: {code!r} is not a language code such as en, zh or zh-Hant")
    where = f"{where}.{code}"
    label: str | None = None
    if isinstance(update, Words):
        label, aliases = update.label, update.aliases
    elif isinstance(update, Mapping):
        unknown = sorted(set(update) - {"label", "aliases"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected label and aliases")
        raw_label = update.get("label")
        if raw_label is not None:
            if not isinstance(raw_label, str) or not _tokens(raw_label):
                raise ValueError(f"{where}: label {raw_label!r} contains no word")
            label = raw_label
        aliases = _checked_words(f"{where}.aliases", update.get("aliases", ()))
    else:
        aliases = _checked_words(where, update)
    if label is not None:
        label = label.strip()
    elif current is not None:
        label = current.label
    elif code == ENGLISH:
        label = tag
    elif aliases:
        label, aliases = aliases[0], aliases[1:]
    else:
        raise ValueError(f"{where}: a language new to the tag needs at least its label")
    # A replaced label stays one of the words: extending a vocabulary never unlearns a word.
    known = (current.all if current is not None else ()) + aliases
    return Words(label, tuple(word for word in dict.fromkeys(known) if word != label))


def _merge_tag(where: str, tag: str, current: Terms | None, update: TagUpdate) -> dict[str, Words]:
    merged: dict[str, Words] = dict(current or {})
    if isinstance(update, str):
        update = {ENGLISH: (update,)}
    elif not isinstance(update, Mapping):
        if not isinstance(update, Iterable):
            raise ValueError(f"{where}: expected a list of words or words by language")
        update = {ENGLISH: tuple(update)}
    for code, words in update.items():
        merged[code] = _merge_language(where, tag, code, merged.get(code), words)
    if ENGLISH not in merged:
        merged[ENGLISH] = Words(tag)
    return merged


def _tag_name(section: str, raw_tag: object) -> str:
    if not isinstance(raw_tag, str) or not raw_tag.strip():
        raise ValueError(f"{section}: tag names must be non-empty strings, got {raw_tag!r}")
    return raw_tag.strip().lower()


def _freeze(section: str, mapping: Mapping[str, TagUpdate]) -> Keywords:
    frozen: dict[str, dict[str, Words]] = {}
    for raw_tag, update in mapping.items():
        tag = _tag_name(section, raw_tag)
        frozen[tag] = _merge_tag(f"{section}.{tag}", tag, frozen.get(tag), update)
    return MappingProxyType({tag: MappingProxyType(terms) for tag, terms in frozen.items()})


def _freeze_ignored(mapping: Mapping[str, Iterable[str]]) -> Ignored:
    frozen: dict[str, tuple[str, ...]] = {}
    for code, phrases in mapping.items():
        if not isinstance(code, str) or not LANGUAGE_CODE.fullmatch(code):
            raise ValueError(f"ignore: {code!r} is not a language code such as en or zh")
        known = frozen.get(code, ()) + _checked_words(f"ignore.{code}", phrases)
        frozen[code] = tuple(dict.fromkeys(known))
    return MappingProxyType(frozen)


@dataclass(frozen=True)
class TagVocabulary:
    """Tags and the caption words, in every language, that trigger them.

    ``categories`` are broader object tags. A category entry that names an object tag is
    implied whenever that object is found ("chair" -> "furniture"); any other entry is matched
    as a caption keyword ("bedroom" -> "room"). Every tag name also matches itself.
    ``ignore`` holds phrases that contain a keyword but mean something else: they are
    matched like keywords, and give no tag.
    """

    styles: Keywords = field(default_factory=dict)
    objects: Keywords = field(default_factory=dict)
    categories: Keywords = field(default_factory=dict)
    ignore: Ignored = field(default_factory=dict)
    _style_matcher: _Matcher = field(init=False, repr=False, compare=False)
    _object_matcher: _Matcher = field(init=False, repr=False, compare=False)
    _implied: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise and compile once: derive_tags runs per row, the vocabulary per process.
        for section in _SECTIONS:
            object.__setattr__(self, section, _freeze(section, getattr(self, section)))
        object.__setattr__(self, "ignore", _freeze_ignored(self.ignore))

        style_phrases: dict[tuple[str, ...], list[_Target]] = {}
        for tag, terms in self.styles.items():
            _add_phrases(style_phrases, _every_word(tag, terms), _Target("style", tag))

        object_phrases: dict[tuple[str, ...], list[_Target]] = {}
        for tag, terms in self.objects.items():
            _add_phrases(object_phrases, _every_word(tag, terms), _Target("object", tag))
        implied: dict[str, list[str]] = {}
        object_tags = {_normalize(tag) for tag in self.objects}
        for category, terms in self.categories.items():
            caption_words = []
            for member in _every_word(category, terms):
                if _normalize(member) in object_tags and member != category:
                    implied.setdefault(_normalize(member), []).append(category)
                else:
                    caption_words.append(member)
            _add_phrases(object_phrases, caption_words, _Target("category", category))

        ignored = [phrase for phrases in self.ignore.values() for phrase in phrases]
        for phrases in (style_phrases, object_phrases):
            _add_phrases(phrases, ignored, None)
        object.__setattr__(self, "_style_matcher", _Matcher.build(style_phrases))
        object.__setattr__(self, "_object_matcher", _Matcher.build(object_phrases))
        object.__setattr__(
            self, "_implied", MappingProxyType({k: tuple(v) for k, v in implied.items()})
        )

    __hash__ = None  # type: ignore[assignment]  # holds mappings; equality only

    def categories_of(self, tag: str) -> tuple[str, ...]:
        """The categories an object tag implies ("chair" -> ("furniture",)), as the rules
        add them after the object."""
        return self._implied.get(_normalize(tag), ())

    @property
    def languages(self) -> tuple[str, ...]:
        """Every language some tag has words in, English first."""
        codes = {
            code
            for section in _SECTIONS
            for terms in getattr(self, section).values()
            for code in terms
        }
        return (ENGLISH, *sorted(codes - {ENGLISH}))

    def labels(self, language: str) -> Mapping[str, str]:
        """Each tag's label in ``language``, for a prompt to show beside the canonical keys:
        styles, then objects, then categories, in vocabulary order. A tag without words in
        that language falls back to its base language's ("zh" for "zh-Hant"), then to
        English (the tag itself, unless a label was given)."""
        base = language.split("-", 1)[0]
        found: dict[str, str] = {}
        for section in _SECTIONS:
            for tag, terms in getattr(self, section).items():
                words = terms.get(language) or terms.get(base) or terms[ENGLISH]
                found.setdefault(tag, words.label)
        return MappingProxyType(found)

    def extend(
        self,
        *,
        styles: KeywordUpdates | None = None,
        objects: KeywordUpdates | None = None,
        categories: KeywordUpdates | None = None,
        ignore: Mapping[str, Iterable[str]] | None = None,
    ) -> TagVocabulary:
        """A copy with words added to existing tags (in any language), new tags appended, and
        tags whose update is ``None`` removed."""
        updates = {"styles": styles, "objects": objects, "categories": categories}
        merged: dict[str, dict[str, Terms]] = {}
        for section in _SECTIONS:
            current: dict[str, Terms] = dict(getattr(self, section))
            for raw_tag, update in (updates[section] or {}).items():
                tag = _tag_name(section, raw_tag)
                if update is None:
                    current.pop(tag, None)
                    continue
                current[tag] = _merge_tag(f"{section}.{tag}", tag, current.get(tag), update)
            merged[section] = current
        phrases = {code: list(words) for code, words in self.ignore.items()}
        for code, words in (ignore or {}).items():
            phrases.setdefault(code, []).extend(_checked_words(f"ignore.{code}", words))
        return TagVocabulary(**merged, ignore=phrases)

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> TagVocabulary:
        """The default vocabulary extended with a JSON file of the same sections."""
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"tag vocabulary {path}: invalid JSON: {exc}") from None
        where = f"tag vocabulary {path}"
        sections = _sections(document, where)
        try:
            return DEFAULT_VOCABULARY.extend(**sections)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def _every_word(tag: str, terms: Terms) -> list[str]:
    return [tag, *(word for words in terms.values() for word in words.all)]


def _sections(document: object, where: str) -> dict[str, object]:
    """The sections of a vocabulary document, checked for shape (the words are checked as the
    vocabulary is built)."""
    if not isinstance(document, dict):
        raise ValueError(f"{where}: expected a JSON object")
    unknown = sorted(set(document) - set(_DOCUMENT_KEYS))
    if unknown:
        # A typo such as "style" would otherwise be silently ignored.
        raise ValueError(f"{where}: unknown section(s) {unknown}; expected {list(_DOCUMENT_KEYS)}")
    sections: dict[str, object] = {}
    for section in _SECTIONS:
        value = document.get(section, {})
        if not isinstance(value, dict) or not all(
            v is None or isinstance(v, list | dict) for v in value.values()
        ):
            raise ValueError(
                f"{where}: {section!r} must map tag names to lists of words, to words by "
                'language ({"zh": ["椅子", "座椅"]}), or to null to remove a tag'
            )
        sections[section] = value
    ignore = document.get("ignore", {})
    if not isinstance(ignore, dict) or not all(isinstance(v, list) for v in ignore.values()):
        raise ValueError(f"{where}: 'ignore' must map language codes to lists of phrases")
    sections["ignore"] = ignore
    return sections


def _add_phrases(
    phrases: dict[tuple[str, ...], list[_Target]],
    keywords: Iterable[str],
    target: _Target | None,
) -> None:
    """Index ``keywords`` as phrases for ``target``; with None, as phrases that give no tag
    (the ``ignore`` list: matched, so their words are consumed, and dropped)."""
    for keyword in keywords:
        words = _tokens(keyword)
        if not words:
            continue
        # Only the last word takes a plural: "living rooms", "coffee tables".
        for last in _plural_forms(words[-1]):
            targets = phrases.setdefault((*words[:-1], last), [])
            if target is not None and target not in targets:
                targets.append(target)


# The default vocabulary targets what the table holds: saved pages, products and photos, mostly
# interiors, fashion and everyday objects. It is a data file read like a user's extension
# (``data/vocabulary.json``); extend it with TagVocabulary.from_file().
DEFAULT_VOCABULARY = TagVocabulary(
    **_sections(  # type: ignore[arg-type]
        json.loads(
            resources.files(__package__).joinpath("data/vocabulary.json").read_text("utf-8")
        ),
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
