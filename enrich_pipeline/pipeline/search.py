"""Caption search: a user's items by text, ranked by caption-embedding similarity.

The query is embedded with the same model as the captions; ranking uses pgvector when the
extension is installed and plain SQL on ``real[]`` otherwise, with the same results. The
``enrich-search`` command (``cli/search.py``) is a thin shell around ``search_captions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from enrich_pipeline.db.dialect import Dialect
from enrich_pipeline.db.store import Store
from enrich_pipeline.providers.base import Provider, ProviderError, usable_vector
from enrich_pipeline.settings import ConfigError

Method = Literal["auto", "fastann", "pgvector", "sql"]


def ranking(dialect: Dialect, method: Method = "auto") -> Literal["fastann", "pgvector", "sql"]:
    """The ranking the server can do: FastANN on AnalyticDB, pgvector where installed, plain
    SQL anywhere; asking for one the server lacks is one clear error."""
    if method == "auto":
        return "fastann" if dialect.fastann else "pgvector" if dialect.pgvector else "sql"
    if method == "fastann" and not dialect.fastann:
        raise ConfigError("this server has no FastANN index method (AnalyticDB vector search)")
    if method == "pgvector" and not dialect.pgvector:
        raise ConfigError("the pgvector extension is not installed in this database")
    return method


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    score: float
    caption: str
    dominant_colors: list[str]
    style_tags: list[str]
    object_tags: list[str]


def search_captions(
    store: Store,
    provider: Provider,
    user_id: str,
    query: str,
    *,
    top_k: int = 10,
    colors: Sequence[str] = (),
    tags: Sequence[str] = (),
    method: Method = "auto",
) -> list[SearchHit]:
    if not query.strip():
        raise ConfigError("the search text is empty")
    chosen = ranking(store.dialect, method)
    (vector,) = provider.embed([query])
    if not usable_vector(vector):  # the provider's vector was not finite or of the wrong size
        raise ProviderError(
            "bad_embedding", "the embedding model returned an unusable vector", permanent=False
        )
    rows = store.search.rank(user_id, vector, top_k=top_k, colors=colors, tags=tags, method=chosen)
    return [
        SearchHit(
            item_id,
            score,
            str(md.get("caption", "")),
            list(md.get("dominant_colors") or []),
            list(md.get("style_tags") or []),
            list(md.get("object_tags") or []),
        )
        for item_id, score, md in rows
    ]


@dataclass(frozen=True)
class Reembedded:
    """What ``reembed_non_finite`` did."""

    replaced: int = 0
    no_caption: int = 0  # a vector whose item has no caption (or is gone): nothing to embed
    refused: int = 0  # the model answered a vector that is not usable either


# Ten texts per request, as the pipeline embeds captions (text-embedding-v4's batch limit).
REEMBED_BATCH = 10


def reembed_non_finite(
    store: Store, provider: Provider, user_id: str | None, *, model: str, dimensions: int
) -> Reembedded:
    """Embed again the captions whose stored vector holds NaN or an infinity (an older
    version's): search skips such vectors and the ``embedding_dimensions`` check counts them."""
    replaced = no_caption = refused = 0
    after = ""
    while rows := store.search.non_finite_vectors(user_id, after=after, limit=REEMBED_BATCH):
        after = rows[-1][0]
        texts = [(item_id, caption) for item_id, _, caption in rows if caption and caption.strip()]
        no_caption += len(rows) - len(texts)
        vectors = provider.embed([caption for _, caption in texts]) if texts else []
        good = [
            (item_id, vector)
            for (item_id, _), vector in zip(texts, vectors, strict=True)
            if usable_vector(vector, dimensions)
        ]
        refused += len(texts) - len(good)
        replaced += store.search.replace_non_finite(good, model)
    return Reembedded(replaced, no_caption, refused)
