"""Search: rows by meaning (a text in any caption language), by picture, or like a row,
ranked by caption vectors, image vectors or both fused, among the rows the filters admit.

Each signal compares only vectors of the query's model and length: the caption signal the
provider's embedding model's (``enrich_embeddings``), the image signal the multimodal model's
(``enrich_image_embeddings``), which puts texts and images in one space, so a text finds
pictures. Both at once are fused by reciprocal rank fusion: a row's score is the sum over the
signals of 1 / (60 + its rank there) (Cormack, Clarke and Buettcher, "Reciprocal rank fusion
outperforms Condorcet and individual rank learning methods", SIGIR 2009,
doi:10.1145/1571941.1572114; k = 60 as pgvector-python's example,
https://github.com/pgvector/pgvector-python/blob/master/examples/hybrid_search/rrf.py). Ranks,
not cosines, are summed because the two models' similarities are on different scales (a
caption cosine of 0.6 and an image cosine of 0.3 may mean the same closeness), and RRF needs no
tuned weight. What a search could not compare (another model's vectors, offline captions,
vectors of an image that changed since) is said in ``SearchResult.notes``.

The ``enrich-search`` command (``cli/search.py``) and its page are thin shells around ``search``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from enrich_pipeline.db.dialect import Dialect
from enrich_pipeline.db.search_rank import Filters, Group, Ranked, Signal
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import (
    ImageLoadError,
    ImagePolicy,
    load_image,
    prepare_for_vision,
)
from enrich_pipeline.enrichment.records import joined_captions
from enrich_pipeline.pipeline.image_vectors import image_model_name
from enrich_pipeline.providers.base import Provider, ProviderError, usable_vector
from enrich_pipeline.providers.offline import OFFLINE_EMBEDDING_MODEL, OFFLINE_MODEL
from enrich_pipeline.settings import ConfigError

Method = Literal["auto", "fastann", "pgvector", "sql"]
Mode = Literal["caption", "image", "both"]

# The bounds of one search, however it is asked (the command line, the page): text-embedding-v4
# takes up to 8,192 tokens, and a search text is a phrase, not a document.
MAX_QUERY_CHARS = 2000
MAX_FILTERS, MAX_FILTER_CHARS = 20, 100

# Reciprocal rank fusion's constant (see the module's docstring).
RRF_K = 60
# Candidates each signal brings to the fusion: enough that a row ranked well by one signal and
# moderately by the other is not cut before it is fused.
FUSION_DEPTH = 50


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
class SearchQuery:
    text: str | None = None  # in any configured caption language
    like_id: str | None = None  # an item's stored vectors as the query (no call)
    like_image: str | None = None  # URL (SSRF-guarded loader) or local path (CLI only)
    users: tuple[str, ...] = ()  # () = every user
    mode: Mode | None = None  # None: "both" when an image model is set, else "caption"
    colors: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()  # rows that have a caption in each of these languages
    top_k: int = 10
    method: Method = "auto"


@dataclass(frozen=True)
class SignalScore:
    signal: Literal["caption", "image"]
    model: str
    dimensions: int
    similarity: float  # cosine similarity
    rank: int  # 1-based rank within that signal


@dataclass(frozen=True)
class Hit:
    item_id: str
    user_id: str
    caption: str
    captions: dict[str, str]  # caption_i18n (every language)
    dominant_colors: list[str]
    style_tags: list[str]
    object_tags: list[str]
    score: float  # RRF score when fused, else the signal's similarity
    signals: tuple[SignalScore, ...]  # one per signal that ranked it
    filters_met: tuple[str, ...]  # e.g. ("user alice", "color red", "tag chair", "language zh")


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    mode: Mode
    notes: list[str]  # what was not compared, and why


def search(
    store: Store,
    provider: Provider,
    query: SearchQuery,
    *,
    image_policy: ImagePolicy | None = None,
    max_image_side: int = 896,
) -> SearchResult:
    """The ``query.top_k`` best rows for ``query`` (see the module's docstring).

    ``image_policy`` loads ``like_image``: None refuses local paths (a page's visitor must not
    read the server's files); the command line passes one that allows them. Raises
    ``ConfigError`` for a query that cannot be run as asked (one line), ``ProviderError`` when
    the query's vector cannot be made.
    """
    asked = [q for q in (query.text, query.like_id, query.like_image) if q is not None]
    if len(asked) != 1:
        raise ConfigError("a search takes exactly one of: a text, like an item, like an image")
    if query.text is not None and not query.text.strip():
        raise ConfigError("the search text is empty")
    if not 1 <= query.top_k:
        raise ConfigError(f"top_k must be at least 1, got {query.top_k}")
    method = ranking(store.dialect, query.method)
    vision = image_model_name(provider)
    mode: Mode = query.mode or ("both" if vision else "caption")
    if query.like_image is not None:
        if query.mode == "caption":
            raise ConfigError("a picture has no caption vector: search like an image by image")
        mode = "image"  # a picture has no caption vector
    signals: list[Signal] = ["caption", "image"] if mode == "both" else [mode]
    if "image" in signals and not vision:
        raise ConfigError(
            "search by image needs an image embedding model: set ENRICH_IMAGE_EMBEDDING_MODEL"
        )
    filters = Filters(
        users=tuple(query.users),
        colors=tuple(query.colors),
        tags=tuple(query.tags),
        languages=tuple(query.languages),
        exclude_item=query.like_id,
    )
    if query.like_id is not None and not store.search.ranking.item_exists(query.like_id):
        raise ConfigError(f"no item {query.like_id} in the items table")
    depth = max(FUSION_DEPTH, 5 * query.top_k) if len(signals) > 1 else query.top_k
    notes: list[str] = []
    ranked: dict[Signal, tuple[str, int, list[Ranked]]] = {}
    for signal in signals:
        found = _query_vector(store, provider, query, signal, image_policy, max_image_side)
        model = _model_of(provider, signal)
        if found is None:
            notes.append(f"item {query.like_id} has no current {signal} vector of {model}: "
                         f"the {signal} signal was not used")  # fmt: skip
            continue
        signal_filters = filters
        if signal == "caption" and not provider.offline:
            # Offline captions' vectors are hashed words whatever label an earlier version
            # gave them: only an offline query may meet them.
            signal_filters = replace(filters, skip_caption_model=OFFLINE_MODEL)
        rows = store.search.ranking.rank(
            signal, found, model=model, limit=depth, filters=signal_filters, method=method
        )
        ranked[signal] = (model, len(found), rows)
        note = _not_compared(store, signal, query.users, model, len(found), provider.offline,
                             hits=len(rows))  # fmt: skip
        if note:
            notes.append(note)
    return SearchResult(_fuse(ranked, query, fused=len(signals) > 1), mode, notes)


def search_captions(
    store: Store,
    provider: Provider,
    user_id: str,
    text: str,
    *,
    top_k: int = 10,
    colors: Sequence[str] = (),
    tags: Sequence[str] = (),
    method: Method = "auto",
) -> list[Hit]:
    """One user's rows by caption similarity to ``text``: ``search`` by caption alone."""
    query = SearchQuery(
        text=text,
        users=(user_id,),
        mode="caption",
        colors=tuple(colors),
        tags=tuple(tags),
        top_k=top_k,
        method=method,
    )
    return search(store, provider, query).hits


def _model_of(provider: Provider, signal: Signal) -> str:
    return provider.embedding_model if signal == "caption" else str(image_model_name(provider))


def _query_vector(
    store: Store,
    provider: Provider,
    query: SearchQuery,
    signal: Signal,
    image_policy: ImagePolicy | None,
    max_image_side: int,
) -> list[float] | None:
    """The query as a vector in ``signal``'s space: the text embedded by that signal's model,
    the picture by the image model, or the item's stored vector (None when it has none)."""
    model = _model_of(provider, signal)
    if query.like_id is not None:
        return store.search.ranking.stored_vector(signal, query.like_id, model=model)
    if query.like_image is not None:
        policy = image_policy or ImagePolicy(allow_local_files=False)
        try:
            picture = prepare_for_vision(
                load_image(query.like_image, policy), max_side=max_image_side
            )
        except ImageLoadError as exc:
            raise ConfigError(f"the image to search like cannot be used: {exc}") from None
        vectors = provider.embed_images([picture])
    elif signal == "caption":
        vectors = provider.embed([str(query.text)])
    else:
        vectors = provider.embed_image_texts([str(query.text)])
    vector = vectors[0] if vectors else []
    if not usable_vector(vector):  # not finite, or empty (the model refused this input)
        raise ProviderError(
            "bad_embedding",
            f"the {signal} embedding model returned an unusable vector for the query",
            permanent=False,
            kind="embedding",
        )
    return list(vector)


def _fuse(
    ranked: dict[Signal, tuple[str, int, list[Ranked]]], query: SearchQuery, *, fused: bool
) -> list[Hit]:
    scores: dict[str, list[SignalScore]] = {}
    rows: dict[str, Ranked] = {}
    for signal, (model, dims, found) in ranked.items():
        for rank, row in enumerate(found, start=1):
            scores.setdefault(row.item_id, []).append(
                SignalScore(signal, model, dims, row.similarity, rank)
            )
            rows.setdefault(row.item_id, row)

    def score(item_id: str) -> float:
        if fused:
            return sum(1.0 / (RRF_K + s.rank) for s in scores[item_id])
        return scores[item_id][0].similarity

    order = sorted(scores, key=lambda item_id: (-score(item_id), item_id))
    return [_hit(rows[i], score(i), tuple(scores[i]), query) for i in order[: query.top_k]]


def _hit(row: Ranked, score: float, signals: tuple[SignalScore, ...], query: SearchQuery) -> Hit:
    md: dict[str, Any] = row.metadata if isinstance(row.metadata, dict) else {}
    met = [f"user {row.user_id}"] if query.users else []
    met += [f"color {c}" for c in query.colors]
    met += [f"tag {t}" for t in query.tags]
    met += [f"language {lang}" for lang in query.languages]
    return Hit(
        item_id=row.item_id,
        user_id=row.user_id,
        caption=str(md.get("caption") or ""),
        captions=_languages(md.get("caption_i18n")),
        dominant_colors=_strings(md.get("dominant_colors")),
        style_tags=_strings(md.get("style_tags")),
        object_tags=_strings(md.get("object_tags")),
        score=score,
        signals=signals,
        filters_met=tuple(met),
    )


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _languages(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str) and v.strip()}


def _not_compared(
    store: Store,
    signal: Signal,
    users: Sequence[str],
    model: str,
    dimensions: int,
    offline: bool,
    *,
    hits: int,
) -> str:
    groups = store.search.ranking.groups(signal, users, OFFLINE_MODEL)
    if signal == "caption":
        others = [g for g in groups if not _caption_compared(g, model, dimensions, offline)]
        if not others:
            return ""
        return describe_not_compared(
            others, users=users, model=model, dimensions=dimensions, hits=hits
        )
    return describe_images_not_compared(groups, model=model, dimensions=dimensions, hits=hits)


def _caption_compared(group: Group, model: str, dimensions: int, offline: bool) -> bool:
    if group.model != model or group.dimensions != dimensions:
        return False
    return offline or not group.offline_captions


def describe_not_compared(
    groups: Sequence[Group], *, users: Sequence[str], model: str, dimensions: int, hits: int
) -> str:
    """Which caption vectors a search could not compare, and the command that makes them
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
    whose = f"for user {', '.join(users)}" if users else "for any user"
    said = [
        f"no caption vectors {made} {whose}"
        if hits == 0
        else f"only caption vectors {made} were compared",
        f"; not compared: {'; '.join(parts)}.",
    ]
    if any(not g.offline_captions for g in groups):
        said.append(" Re-embed the other models' with enrich-search --reembed.")
    if any(g.offline_captions for g in groups):
        command = "enrich-captions --recaption" + "".join(
            f" --user-id {shlex.quote(u)}" for u in users
        )
        said.append(f" Caption the offline rows with a model: {command}")
    return "".join(said)


def describe_images_not_compared(
    groups: Sequence[Group], *, model: str, dimensions: int, hits: int
) -> str:
    """Which image vectors a search by ``model`` could not compare: another model's or length's,
    and those made from an image the row no longer holds."""
    stale = sum(g.count for g in groups if g.stale)
    others = [g for g in groups if not g.stale and (g.model != model or g.dimensions != dimensions)]
    parts = [f"{g.count} made by {g.model} ({g.dimensions} dims)" for g in others]
    if stale:
        parts.append(
            f"{stale} made from an image the row no longer holds (a run captions and embeds "
            "the new image)"
        )
    if not parts:
        return ""
    made = f"image vectors made by {model} ({dimensions} dims)"
    said = f"no {made} to compare" if hits == 0 else f"only {made} were compared"
    return f"{said}; not compared: {'; '.join(parts)}."


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
