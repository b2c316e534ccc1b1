"""What the stand-in's "model" sees in a picture: a caption in English and Chinese, and the
style and object tags a model would judge from the picture itself.

The pictures are the project's synthetic ones: each caption template of
``enrichment.synthetic`` (which the stand-in has always answered) and the demo's sample drawings
(``synthetic.recognize_sample``). Each scene lists the vocabulary tags its picture shows,
including at least one object the English sentence never names (the window the light comes
through, the office chair at the desk): keyword rules over the caption cannot find those, so a
test can tell tags the model chose from tags derived by the rules. Tags are the canonical English
keys of the project's default vocabulary (``objects`` and ``categories`` together in
``object_tags``), as the wire contract asks.

The Chinese renderings are real sentences, written for each template; other languages get a
deterministic fallback (the English sentence marked with the language code), which says plainly
that the stand-in does not translate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from enrich_pipeline.enrichment.colors import COLOR_NAMES_ZH, color_name
from enrich_pipeline.enrichment.synthetic import (
    draw_sample,
    recognize_sample,
    synthetic_caption,
    synthetic_caption_for_key,
)
from enrich_pipeline.enrichment.tags import derive_tags


@dataclass(frozen=True)
class Template:
    """One caption template of ``synthetic``, as the stand-in's model sees its picture."""

    en: str
    zh: str
    styles: tuple[str, ...]
    objects: tuple[str, ...]  # vocabulary objects and categories, unnamed ones included
    unnamed: tuple[str, ...]  # the objects in ``objects`` the English sentence does not name


# Keyed by synthetic's English templates, word for word (a unit test checks that every template
# of synthetic has its entry here).
TEMPLATES: tuple[Template, ...] = (
    Template(
        "A modern {color} chair in a minimalist living room with natural light.",
        "一把{color}的现代风格椅子，摆在自然光充足的极简风格客厅里。",
        ("modern", "minimalist"),
        ("chair", "furniture", "room", "window", "rug"),
        ("window", "rug"),
    ),
    Template(
        "A vintage {color} leather sofa beside a wooden table in a cozy room.",
        "一张{color}的复古皮沙发，旁边是一张木桌，房间温馨舒适。",
        ("vintage", "cozy"),
        ("sofa", "table", "furniture", "room", "pillow", "rug"),
        ("pillow", "rug"),
    ),
    Template(
        "A {color} ceramic vase with flowers on a rustic kitchen shelf.",
        "乡村风格厨房的搁架上放着一只插着鲜花的{color}陶瓷花瓶。",
        ("rustic",),
        ("vase", "flower", "shelf", "decor", "furniture", "room", "bowl", "kitchenware"),
        ("bowl", "kitchenware"),
    ),
    Template(
        "A sleek {color} laptop on an industrial metal desk in a bright office.",
        "明亮的办公室里，一张工业风金属书桌上放着一台{color}的轻薄笔记本电脑。",
        ("modern", "industrial"),
        ("laptop", "table", "electronics", "furniture", "room", "chair", "cup"),
        ("chair", "cup"),
    ),
    Template(
        "A minimalist {color} lamp standing next to a bookshelf in a scandinavian bedroom.",
        "北欧风格的卧室里，一盏{color}的极简风格落地灯立在书架旁。",
        ("minimalist", "scandinavian"),
        ("lamp", "shelf", "decor", "furniture", "room", "bed", "book"),
        ("bed", "book"),
    ),
    Template(
        "A rustic {color} wooden cabinet with brass handles in a farmhouse kitchen.",
        "农舍风格的厨房里，有一个带黄铜把手的{color}乡村风格木柜。",
        ("rustic",),
        ("cabinet", "furniture", "room", "plate", "kitchenware"),
        ("plate", "kitchenware"),
    ),
    Template(
        "A modern {color} armchair with a wool throw near a large window.",
        "一张搭着羊毛毯的{color}现代风格扶手椅，靠近一扇大窗户。",
        ("modern", "cozy"),
        ("chair", "window", "furniture", "pillow", "plant", "nature"),
        ("pillow", "plant"),
    ),
    Template(
        "An industrial {color} pendant light hanging over a concrete dining table.",
        "一盏{color}的工业风吊灯悬挂在混凝土餐桌上方。",
        ("industrial",),
        ("lamp", "table", "decor", "furniture", "chair"),
        ("chair",),
    ),
)

# The demo's drawings: their subject in Chinese and the category a model would add.
SAMPLES = {
    "chair": ("椅子", "furniture"),
    "lamp": ("台灯", "decor"),
    "vase": ("花瓶", "decor"),
    "sofa": ("沙发", "furniture"),
    "laptop": ("笔记本电脑", "electronics"),
}


@dataclass(frozen=True)
class Scene:
    """What the model says a picture shows: captions by language, and tags."""

    captions: dict[str, str]  # "en" and "zh"
    styles: tuple[str, ...]
    objects: tuple[str, ...]

    def caption(self, language: str) -> str:
        """The caption in ``language``: English, Chinese, or the English sentence marked with
        the code (the stand-in writes no other language)."""
        known = self.captions.get(language)
        return known if known is not None else f"[{language}] {self.captions['en']}"


def _pattern(template: str) -> re.Pattern[str]:
    head, _, tail = template.partition("{color}")
    return re.compile(re.escape(head) + r"(\w+)" + re.escape(tail))


_PATTERNS = tuple((_pattern(t.en), t) for t in TEMPLATES)


def scene_of_caption(caption: str) -> Scene:
    """The scene behind one of synthetic's template captions. A sentence no template made
    (synthetic changed) falls back to the caption's keyword tags, so answers stay valid."""
    for pattern, template in _PATTERNS:
        match = pattern.fullmatch(caption)
        if match:
            color = match.group(1)
            zh = template.zh.format(color=COLOR_NAMES_ZH.get(color, color))
            return Scene({"en": caption, "zh": zh}, template.styles, template.objects)
    styles, objects = derive_tags(caption)
    return Scene({"en": caption}, tuple(styles), tuple(objects))


def _sample_scene(subject: str, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> Scene:
    fg_name, bg_name = color_name(fg), color_name(bg)
    article = "An" if fg_name[:1] in "aeiou" else "A"
    en = f"{article} {fg_name} {subject} drawn as a flat silhouette on a {bg_name} background."
    subject_zh, category = SAMPLES[subject]
    fg_zh, bg_zh = COLOR_NAMES_ZH.get(fg_name, fg_name), COLOR_NAMES_ZH.get(bg_name, bg_name)
    zh = f"{bg_zh}背景上的一个{fg_zh}{subject_zh}剪影。"
    return Scene({"en": en, "zh": zh}, ("minimalist",), (subject, category))


def scene_of_image(image: Image.Image) -> Scene:
    """What the picture shows: a demo drawing's subject, or a synthetic template's scene."""
    known = recognize_sample(image)
    if known is not None:
        return _sample_scene(*known)
    return scene_of_caption(synthetic_caption(image))


def scene_of_key(key: str) -> Scene:
    """No pixels (a remote URL, text only): the template scene synthetic picks for the key."""
    return scene_of_caption(synthetic_caption_for_key(key))


# recognize_sample fills a module-level cache of reference masks on first use, without a lock;
# the stand-in answers on its event loop and in batch worker threads, so the cache is filled
# here, once, at import, before any request can race on it.
recognize_sample(draw_sample("chair", (0, 0, 0), (255, 255, 255)))
