"""Caption search: a user's items by text, ranked by caption-embedding similarity.

The query is embedded by the provider's embedding model, and only vectors that model made, of
the same length, are compared (``vectors_not_compared`` says what else the user has). Ranking
uses pgvector when the extension is installed and plain SQL on ``real[]`` otherwise, with the
same results. The ``enrich-search`` command (``cli/search.py``) is a thin shell around
``search_captions``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from enrich_pipeline.db.dialect import Dialect
from enrich_pipeline.db.search import VectorGroup
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.records import joined_captions
from enrich_pipeline.providers.base import Provider, ProviderError, usable_vector
from enrich_pipeline.providers.offline import OFFLINE_EMBEDDING_MODEL, OFFLINE_MODEL
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
    rows = store.search.rank(
        user_id,
        vector,
        top_k=top_k,
        colors=colors,
        tags=tags,
        method=chosen,
        model=provider.embedding_model,
        # Offline captions' vectors are hashed words whatever label an earlier version gave
        # them: only an offline query may meet them.
        skip_caption_model=None if provider.offline else OFFLINE_MODEL,
    )
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


def vectors_not_compared(
    store: Store, user_id: str, *, model: str, dimensions: int, offline: bool
) -> list[VectorGroup]:
    """The user's caption vectors a search by ``model`` (``dimensions`` long) does not compare:
    another model's or length's, and offline captions' unless the search is offline."""

    def compared(group: VectorGroup) -> bool:
        if group.model != model or group.dimensions != dimensions:
            return False
        return offline or not group.offline_captions

    return [
        group for group in store.search.vector_groups(user_id, OFFLINE_MODEL) if not compared(group)
    ]


def describe_not_compared(
    groups: Sequence[VectorGroup], *, user_id: str, model: str, dimensions: int, hits: int
) -> str:
    """Which of the user's vectors a search could not compare, and the command that makes them
    comparable."""
    parts = []
    for group in groups:
        if not group.offline_captions:
            parts.append(f"{group.count} made by {group.model} ({group.dimensions} dims)")
        elif group.model == OFFLINE_EMBEDDING_MODEL:
            parts.append(f"{group.count} made by {group.model} for offline captions")
        else:
            parts.append(
                f"{group.count} of offline captions, labelled {group.model} by an earlier version"
            )
    made = f"made by {model} ({dimensions} dims)"
    said = [
        f"no caption vectors {made} for user {user_id}"
        if hits == 0
        else f"only caption vectors {made} were compared",
        f"; not compared: {'; '.join(parts)}.",
    ]
    if any(not g.offline_captions for g in groups):
        said.append(" Re-embed the other models' with enrich-search --reembed.")
    if any(g.offline_captions for g in groups):
        command = f"enrich-captions --recaption --user-id {shlex.quote(user_id)}"
        said.append(f" Caption the offline rows with a model: {command}")
    return "".join(said)


def stored_embedding_text(
    caption: str | None, captions: dict[str, str], languages: Sequence[str]
) -> str:
    """What the pipeline embeds for a stored row (``WorkItem.embedding_text``): every language's
    caption, one per line, the configured languages first in their order. ``caption`` decides:
    a row whose caption was removed has nothing to embed, and one whose caption a person
    rewrote (``caption_i18n`` no longer holds it) has that caption alone."""
    if not caption or not caption.strip():
        return ""
    if caption not in captions.values():
        return caption
    ordered = [captions[code] for code in languages if code in captions]
    ordered += [text for code, text in sorted(captions.items()) if code not in languages]
    return joined_captions(ordered)


@dataclass(frozen=True)
class Reembedded:
    """What ``reembed`` did."""

    replaced: int = 0  # vectors that held NaN or an infinity
    other_model: int = 0  # vectors another model, or another length, made
    relabelled: int = 0  # offline captions' vectors given the offline model's name
    no_caption: int = 0  # a vector whose item has no caption (or is gone): nothing to embed
    refused: int = 0  # the model answered a vector that is not usable either


# Ten texts per request, as the pipeline embeds captions (text-embedding-v4's batch limit).
REEMBED_BATCH = 10


def reembed(
    store: Store,
    provider: Provider,
    user_id: str | None,
    *,
    dimensions: int,
    languages: Sequence[str] = ("en",),
) -> Reembedded:
    """Make the stored vectors comparable with the provider's queries.

    First, vectors of offline captions that an earlier version labelled with the real
    embedding model get the offline model's name (no call). Then the captions whose stored
    vector holds NaN or an infinity (an older version's), or was made by another model or
    length, are embedded again by the provider (its ``embedding_model``, ``dimensions`` long).
    Offline captions keep their offline vectors: they need a model's caption first.
    """
    relabelled = store.search.label_offline_vectors(
        user_id,
        offline_caption_model=OFFLINE_MODEL,
        offline_embedding_model=OFFLINE_EMBEDDING_MODEL,
    )
    model = provider.embedding_model
    replaced = other_model = no_caption = refused = 0
    after = ""
    while rows := store.search.vectors_to_reembed(
        user_id,
        model=model,
        dimensions=dimensions,
        offline_caption_model=OFFLINE_MODEL,
        after=after,
        limit=REEMBED_BATCH,
    ):
        after = rows[-1].item_id
        texts = [
            (row, text)
            for row in rows
            if (text := stored_embedding_text(row.caption, row.captions, languages)).strip()
        ]
        no_caption += len(rows) - len(texts)
        vectors = provider.embed([text for _, text in texts]) if texts else []
        good = [
            (row, vector)
            for (row, _), vector in zip(texts, vectors, strict=True)
            if usable_vector(vector, dimensions)
        ]
        refused += len(texts) - len(good)
        # A vector a run replaced meanwhile is kept, and not counted.
        done = store.search.replace_vectors([(row.item_id, v) for row, v in good], model)
        replaced += sum(1 for row, _ in good if row.item_id in done and row.non_finite)
        other_model += sum(1 for row, _ in good if row.item_id in done and not row.non_finite)
    return Reembedded(replaced, other_model, relabelled, no_caption, refused)
