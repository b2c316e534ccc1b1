"""Search finds a row from a query in any of its caption languages.

What is embedded is every language's caption, one per line (``WorkItem.embedding_text``); the
rows here are written by the pipeline's own stages (claimed, embedded by the stand-in's
embedding model, written back), with Chinese and English captions as a structured answer
gives them. A Chinese query meets the Chinese caption, an English one the English caption.
"""

from __future__ import annotations

from pathlib import Path

from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.search import search_captions
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings
from enrich_pipeline_tests.helpers import Items

CAPTIONS = {
    "blue": {
        "zh": "一把蓝色的现代椅子，放在简约的客厅里。",
        "en": "A modern blue chair in a minimalist living room.",
    },
    "red": {
        "zh": "木桌上放着一个红色陶瓷花瓶，里面插着鲜花。",
        "en": "A red ceramic vase with fresh flowers on a wooden table.",
    },
    "green": {
        "zh": "一台笔记本电脑放在工业风的金属书桌上。",
        "en": "A laptop on an industrial metal desk.",
    },
}


def test_a_query_in_either_caption_language_finds_the_row(
    items: Items, store: Store, api_settings: DashScopeSettings, image_dir: Path
) -> None:
    ids = {color: items.add("alice", str(image_dir / f"{color}.jpg")) for color in CAPTIONS}
    provider = DashScopeProvider(api_settings)
    chunk = stages.claim_chunk(
        store, "alice", list(ids.values()), worker="w1", lease_seconds=60, max_attempts=3
    )
    color_of = {item_id: color for color, item_id in ids.items()}
    for work in chunk.items:
        work.captions = dict(CAPTIONS[color_of[work.item.id]])
        work.caption = work.captions["zh"]
    stages.embed_chunk(chunk, provider)
    result = stages.write_chunk(
        store,
        chunk,
        provenance=Provenance("qwen3-vl-plus", "v1", languages=("zh", "en")),
        embedding_model=provider.embedding_model,
    )
    assert result.stats.succeeded == 3
    stored = items.row(ids["red"])["metadata"]
    assert stored["caption"] == CAPTIONS["red"]["zh"]
    assert stored["caption_i18n"] == CAPTIONS["red"]

    for query, color in (
        ("蓝色椅子", "blue"),
        ("陶瓷花瓶", "red"),
        ("笔记本电脑", "green"),
        ("a blue chair", "blue"),
        ("ceramic vase with flowers", "red"),
        ("laptop on a desk", "green"),
    ):
        hits = search_captions(store, provider, "alice", query, method="sql")
        assert hits[0].item_id == ids[color], (query, [(h.caption, h.score) for h in hits])
        assert hits[0].score > hits[1].score, (query, hits)
    # The hit shows the first language's caption, as metadata.caption holds it.
    assert search_captions(store, provider, "alice", "红色花瓶")[0].caption == CAPTIONS["red"]["zh"]
