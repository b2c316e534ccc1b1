"""The answer cache in the database: keyed by model, prompt version, answer format and
languages; the whole answer stored; entries from before structured answers still served; the
offline provider's answers never cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy, VisionImage, load_image
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.enrichment.structured import JSON_OBJECT, TEXT, Answer, Question
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.base import Usage
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.providers.offline import OfflineProvider
from enrich_pipeline.settings import DashScopeSettings, RunSettings
from enrich_pipeline.settings.dashscope import DEFAULT_PROMPT
from enrich_pipeline_tests.helpers import Items
from enrich_pipeline_tests.standin import StandIn

LOCAL = ImagePolicy(allow_local_files=True)


class _Answers:
    """A provider (the protocol, not a project module) whose answer format the test sets and
    whose calls it counts."""

    model_label = "qwen3-vl-plus"
    offline = False

    def __init__(self, answer_format: str) -> None:
        self.answer_format = answer_format
        self.usage = Usage()
        self.calls = 0

    def answer(self, image: VisionImage, question: Question) -> Answer:
        self.calls += 1
        captions = {
            code: f"{code} caption {self.calls}: a modern chair" for code in question.languages
        }
        if self.answer_format == TEXT:
            return Answer(captions, TEXT)
        return Answer(captions, self.answer_format, ("modern",), ("sofa",), "model")

    def embed(self, texts: Any) -> list[list[float]]:
        return [[]] * len(texts)

    def close(self) -> None:
        pass


def _caption(
    store: Store, items: Items, ids: list[str], provider: Any, question: Question
) -> stages.Chunk:
    chunk = stages.claim_chunk(store, "alice", ids, worker="w", lease_seconds=60, max_attempts=3)
    stages.visual_attributes(chunk, policy=LOCAL, max_image_side=256, concurrent=1)
    stages.caption_chunk(
        chunk, provider, concurrent=1, cache=store.cache, prompt_version="v1", question=question
    )
    return chunk


def _entries(items: Items) -> list[tuple]:
    return items.execute(
        "SELECT model, prompt_version, answer_format, languages, caption, answer"
        " FROM {ns}.enrich_answer_cache ORDER BY created_at, answer_format, languages"
    )


def test_answers_are_cached_apart_by_format_and_languages(
    items: Items, store: Store, image_dir: Path
) -> None:
    image = str(image_dir / "blue.jpg")
    zh_en = Question(DEFAULT_PROMPT, ("zh", "en"))
    structured = _Answers(JSON_OBJECT)

    first = _caption(store, items, [items.add("alice", image)], structured, zh_en)
    (work,) = first.items
    assert work.captions == {
        "zh": "zh caption 1: a modern chair",
        "en": "en caption 1: a modern chair",
    }
    assert (work.tags_source, work.answer_format) == ("model", JSON_OBJECT)
    assert (work.style_tags, work.object_tags) == (["modern"], ["sofa", "furniture"])
    ((model, version, fmt, langs, caption, answer),) = _entries(items)
    assert (model, version, fmt, langs) == ("qwen3-vl-plus", "v1", JSON_OBJECT, "zh,en")
    assert caption == "zh caption 1: a modern chair"
    assert Answer.from_cache(caption, answer, fmt, ("zh", "en")).object_tags == ("sofa",)

    # The same image, the same format and languages: served by the cache.
    again = _caption(store, items, [items.add("alice", image)], structured, zh_en)
    assert structured.calls == 1 and again.items[0].from_cache
    assert again.items[0].object_tags == ["sofa", "furniture"]

    # Another format, or other languages: another answer, paid and cached apart.
    text = _Answers(TEXT)
    plain = _caption(store, items, [items.add("alice", image)], text, zh_en)
    english = _caption(
        store, items, [items.add("alice", image)], structured, Question(DEFAULT_PROMPT)
    )
    assert text.calls == 1 and structured.calls == 2
    assert not plain.items[0].from_cache and not english.items[0].from_cache
    assert plain.items[0].tags_source == "rules" and plain.items[0].object_tags == [
        "chair",
        "furniture",
    ]
    keys = {(fmt, langs) for _, _, fmt, langs, _, _ in _entries(items)}
    assert keys == {(JSON_OBJECT, "zh,en"), (TEXT, "zh,en"), (JSON_OBJECT, "en")}


def test_an_entry_cached_before_structured_answers_is_served_with_tags_by_the_rules(
    items: Items, store: Store, api_settings: DashScopeSettings, image_dir: Path, standin: StandIn
) -> None:
    image = str(image_dir / "green.jpg")
    sha = load_image(image, LOCAL).content_sha256
    items.execute(
        "INSERT INTO {ns}.enrich_answer_cache (content_sha256, model, prompt_version,"
        " answer_format, languages, caption, answer) VALUES (%s, %s, %s, 'text', 'en', %s, NULL)",
        (sha, api_settings.vision_model, api_settings.prompt_version, "A rustic wooden table."),
    )
    item = items.add("alice", image)
    engine = Engine(
        store, DashScopeProvider(api_settings), api_settings, RunSettings(), image_policy=LOCAL
    )

    stats = engine.enrich("alice")

    assert (stats.succeeded, stats.cache_hits) == (1, 1)
    assert standin.count("chat") == 0
    md = items.row(item)["metadata"]
    assert md["caption"] == "A rustic wooden table."
    assert md["caption_i18n"] == {"en": "A rustic wooden table."}
    assert (md["style_tags"], md["object_tags"]) == (["rustic"], ["table", "furniture"])
    assert (md["tags_source"], md["answer_format"]) == ("rules", "text")


def test_offline_answers_are_never_cached(items: Items, store: Store, image_dir: Path) -> None:
    image = str(image_dir / "red.jpg")
    provider = OfflineProvider()
    question = Question(DEFAULT_PROMPT, ("zh", "en"))
    chunk = _caption(
        store, items, [items.add("alice", image), items.add("alice", image)], provider, question
    )
    result = stages.write_chunk(
        store,
        chunk,
        provenance=Provenance(provider.model_label, "v1", True, question.languages),
        embedding_model=None,
    )
    assert result.stats.succeeded == 2
    assert _entries(items) == []
    md = items.row(chunk.items[0].item.id)["metadata"]
    assert md["caption_source"] == "offline"
    assert set(md["caption_i18n"]) == {"zh", "en"}
    assert md["caption_i18n"]["zh"].startswith("(离线说明)")
    assert "红色" in md["caption_i18n"]["zh"]
    assert md["caption"] == md["caption_i18n"]["zh"]
