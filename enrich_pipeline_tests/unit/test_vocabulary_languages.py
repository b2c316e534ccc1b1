"""The tag vocabulary in several languages: labels and aliases per language, Chinese for every
default tag, rules that match a Chinese caption, and user files that add any language (checked,
with errors that say where). Tags stay canonical English keys whatever the caption's language."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from enrich_pipeline.bootstrap import load_vocabulary
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary, derive_tags
from enrich_pipeline.settings import ConfigError

SECTIONS = ("styles", "objects", "categories")


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


def test_a_chinese_caption_gets_the_english_tags() -> None:
    caption = "一张现代简约风格的客厅里摆着一把蓝色椅子和一盏落地灯。"
    assert derive_tags(caption) == (
        ["modern", "minimalist"],
        ["room", "chair", "furniture", "lamp", "decor"],
    )
    # Aliases name the same tag; a longer phrase wins over the words inside it.
    assert derive_tags("两把座椅")[1] == ["chair", "furniture"]
    assert derive_tags("床头柜上的台灯")[1] == ["table", "furniture", "lamp", "decor"]
    # Latin letters next to Han characters are words of their own: T恤 is a T-shirt.
    assert derive_tags("白色T恤和牛仔裤")[1] == ["shirt", "clothing", "pants"]


def test_phrases_that_contain_a_keyword_but_mean_something_else_give_no_tag() -> None:
    # 画面包含 ("the picture contains") holds 面包 (bread); 马路 (road) holds 马 (horse).
    assert derive_tags("画面包含一把木椅") == ([], ["chair", "furniture"])
    assert derive_tags("马路边的熊猫") == ([], ["animal"])
    assert derive_tags("咖啡色的沙发")[1] == ["sofa", "furniture"]


def test_every_default_tag_has_a_chinese_label_and_english_stays_the_key() -> None:
    chinese = DEFAULT_VOCABULARY.labels("zh")
    english = DEFAULT_VOCABULARY.labels("en")
    tags = [tag for section in SECTIONS for tag in getattr(DEFAULT_VOCABULARY, section)]
    assert list(chinese) == list(english) == tags
    assert all(english[tag] == tag for tag in tags)
    for tag, label in chinese.items():
        assert label and all(unicodedata.name(ch).startswith("CJK") for ch in label), (tag, label)
    assert len(set(chinese.values())) == len(tags), "two tags share a Chinese label"
    assert chinese["chair"] == "椅子" and chinese["furniture"] == "家具"
    assert DEFAULT_VOCABULARY.languages == ("en", "zh")
    # A regional code falls back to its language, an unknown language to English.
    assert DEFAULT_VOCABULARY.labels("zh-Hant")["chair"] == "椅子"
    assert DEFAULT_VOCABULARY.labels("fr")["chair"] == "chair"


def test_each_default_chinese_label_finds_its_own_tag() -> None:
    for section, kind in (("styles", 0), ("objects", 1), ("categories", 1)):
        for tag in getattr(DEFAULT_VOCABULARY, section):
            label = DEFAULT_VOCABULARY.labels("zh")[tag]
            assert tag in derive_tags(label)[kind], (tag, label, derive_tags(label))


def test_a_user_file_adds_labels_and_aliases_in_any_language(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "styles": {"wabi-sabi": {"en": ["wabi sabi"], "ja": ["侘寂", "わびさび"]}},
            "objects": {
                "chair": {"fr": {"label": "chaise", "aliases": ["fauteuil"]}, "zh": ["马扎"]},
                "kettle": {"en": ["teapot"], "zh": ["水壶", "茶壶"]},
                "lamp": {"zh": {"label": "灯具"}},
            },
            "categories": {"kitchenware": ["kettle"]},
            "ignore": {"fr": ["chaise longue"]},
        },
    )
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.languages == ("en", "fr", "ja", "zh")
    assert vocabulary.labels("fr")["chair"] == "chaise"
    assert vocabulary.labels("ja")["wabi-sabi"] == "侘寂"
    assert vocabulary.labels("zh")["kettle"] == "水壶"
    # A label given replaces the default's; aliases are added to the default's.
    assert vocabulary.labels("zh")["lamp"] == "灯具" and vocabulary.labels("zh")["chair"] == "椅子"
    assert derive_tags("Deux fauteuils et une théière", vocabulary)[1] == ["chair", "furniture"]
    assert derive_tags("わびさびの茶壶と马扎", vocabulary) == (
        ["wabi-sabi"],
        ["kettle", "kitchenware", "chair", "furniture"],
    )
    assert derive_tags("une chaise longue", vocabulary) == ([], [])
    assert derive_tags("一盏灯", vocabulary)[1] == ["lamp", "decor"]  # the old label still matches


@pytest.mark.parametrize(
    ("document", "said"),
    [
        (
            {"objects": {"chair": {"Chinese": ["椅子"]}}},
            "objects.chair: 'Chinese' is not a language",
        ),
        (
            {"objects": {"chair": {"zh": {"label": " "}}}},
            "objects.chair.zh: label ' ' contains no word",
        ),
        ({"objects": {"cart": {"zh": []}}}, "objects.cart.zh: a language new to the tag needs"),
        (
            {"objects": {"chair": {"zh": {"name": "椅"}}}},
            "objects.chair.zh: unknown key(s) ['name']",
        ),
        (
            {"objects": {"chair": {"zh": {"aliases": "凳子"}}}},
            "objects.chair.zh.aliases: expected a list",
        ),
        (
            {"objects": {"chair": {"zh": ["椅子", 3]}}},
            "objects.chair.zh: keyword 3 contains no word",
        ),
        ({"objects": {"chair": "椅子"}}, "'objects' must map tag names to lists of words"),
        ({"ignore": ["画面"]}, "'ignore' must map language codes to lists of phrases"),
        ({"ignore": {"zh": "画面"}}, "'ignore' must map language codes to lists of phrases"),
        ({"labels": {}}, "unknown section(s) ['labels']"),
    ],
)
def test_a_malformed_user_file_is_one_clear_error(
    tmp_path: Path, document: object, said: str
) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_vocabulary(str(path))
    message = str(caught.value)
    assert message.startswith(f"ENRICH_TAG_VOCABULARY: tag vocabulary {path}: "), message
    assert said in message, message


def test_words_given_in_code_follow_the_same_rules() -> None:
    vocabulary = TagVocabulary(objects={"chair": {"zh": ["椅子", "座椅"]}, "desk": ["bureau"]})
    assert vocabulary.labels("zh") == {"chair": "椅子", "desk": "desk"}
    assert derive_tags("座椅与bureau", vocabulary)[1] == ["chair", "desk"]
    assert vocabulary.extend(objects={"chair": None}).labels("zh") == {"desk": "desk"}
    with pytest.raises(ValueError, match="objects.chair.zh: keyword '  ' contains no word"):
        TagVocabulary(objects={"chair": {"zh": ["椅子", "  "]}})
