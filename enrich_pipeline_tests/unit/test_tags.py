"""Rule-based style and object tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary, derive_tags


def test_design_example() -> None:
    caption = "A modern blue chair in a minimalist living room."
    assert derive_tags(caption) == (["modern", "minimalist"], ["chair", "furniture", "room"])


def test_order_of_first_appearance_without_duplicates() -> None:
    styles, objects = derive_tags(
        "A cozy sofa and a modern lamp; another sofa, a MODERN rug, cozy and contemporary."
    )
    assert styles == ["cozy", "modern"]
    assert objects == ["sofa", "furniture", "lamp", "decor", "rug"]


def test_plurals() -> None:
    assert derive_tags("Two armchairs, three sofas and some shelves")[1] == [
        "chair",
        "furniture",
        "sofa",
        "shelf",
    ]
    assert derive_tags("Knives and dishes on the counter")[1] == ["plate", "kitchenware"]
    assert derive_tags("Two women and their puppies")[1] == ["person", "dog", "animal"]
    assert derive_tags("Bright living rooms")[1] == ["room"]


def test_multi_word_keywords_take_the_longest_match() -> None:
    assert derive_tags("A table lamp on a coffee table")[1] == [
        "lamp",
        "decor",
        "table",
        "furniture",
    ]
    assert derive_tags("An office chair")[1] == ["chair", "furniture"]
    assert derive_tags("Mid-century  design, mid century feel")[0] == ["retro"]


def test_no_partial_word_matches() -> None:
    assert derive_tags("A shopping cart") == ([], [])
    assert derive_tags("Carpets and a bookshelf")[1] == ["rug", "decor", "shelf", "furniture"]
    assert derive_tags("Postmodernism and catalogues") == ([], [])


def test_case_and_unicode() -> None:
    assert derive_tags("RÉTRO Café CHAIRS")[0] == ["retro"]
    assert derive_tags("RÉTRO Café CHAIRS")[1] == ["chair", "furniture"]
    assert derive_tags("Ein gemütliches Zimmer: modern.")[0] == ["modern"]
    assert derive_tags("") == ([], [])


def test_extend_returns_merged_copy() -> None:
    vocabulary = DEFAULT_VOCABULARY.extend(
        styles={"japandi": ["japandi", "wabi-sabi"]},
        objects={"cart": ("cart", "trolley"), "chair": ["throne"]},
        categories={"vehicle": ["cart"]},
    )
    assert derive_tags("A wabi-sabi trolley beside a throne", vocabulary) == (
        ["japandi"],
        ["cart", "vehicle", "chair", "furniture"],
    )
    # The default is untouched.
    assert derive_tags("A wabi-sabi trolley beside a throne") == ([], [])
    assert "cart" not in DEFAULT_VOCABULARY.objects

    removed = DEFAULT_VOCABULARY.extend(styles={"modern": None})
    assert derive_tags("A modern chair", removed)[0] == []


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(
        json.dumps(
            {
                "styles": {"wabi-sabi": ["wabi sabi"]},
                "objects": {"chair": ["椅子"], "kettle": ["kettle", "teapot"]},
                "categories": {"kitchenware": ["kettle"]},
            },
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    vocabulary = TagVocabulary.from_file(path)
    assert derive_tags("Wabi Sabi teapots next to 一把椅子", vocabulary) == (
        ["wabi-sabi"],
        ["kettle", "kitchenware", "chair", "furniture"],
    )
    assert derive_tags("A minimalist sofa", vocabulary) == (["minimalist"], ["sofa", "furniture"])


@pytest.mark.parametrize(
    "document",
    [
        {"style": {"modern": ["modern"]}},
        {"objects": {"chair": "armchair, stool"}},
        {"objects": {"lamp": [3]}},
        {"objects": ["chair"]},
        [],
    ],
)
def test_from_file_rejects_malformed(tmp_path: Path, document: object) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError):
        TagVocabulary.from_file(path)


def test_vocabulary_rejects_empty_keywords() -> None:
    with pytest.raises(ValueError):
        TagVocabulary(objects={"chair": ("   ",)})
