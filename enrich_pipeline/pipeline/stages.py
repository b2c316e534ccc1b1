"""The enrichment stages, free of Dagster: the ops and the command line both call these.

In the Dagster graph a chunk moves through ``claim_chunk`` -> ``visual_attributes`` ->
``caption_chunk`` -> ``embed_chunk`` -> ``write_chunk``, one op each. The command line streams
items through the per-item stages (``load_visual``, ``caption_item``) instead, and writes chunks
with the same ``embed_chunk`` and ``write_chunk`` (engine.py); batch mode accepts the Batch
API's answers with the same ``accept_caption`` and writes them with the same ``write_chunk``.

Anything one row's data causes is that row's error: each stage records a per-item error instead
of raising, whatever goes wrong for that item (a decoder bug, hostile caption text, a vector that
is not finite). Only a stop of the provider (``FatalProviderError``: a rejected key, a missing
model, the provider given up on) ends the run, and the caller then releases the claims so that
nothing is left marked. Whose fault a failure is decides whether the row is charged an attempt
(``ItemError.blame``, ``settle_blame``): rows the provider failed are given back untouched.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

from enrich_pipeline.db.pending import IGNORE, OnImageChange
from enrich_pipeline.db.store import Store
from enrich_pipeline.db.writes import FailureRow, SuccessRow, replacing
from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.colors import dominant_colors
from enrich_pipeline.enrichment.images import (
    ImageLoadError,
    ImagePolicy,
    load_image,
    prepare_for_vision,
)
from enrich_pipeline.enrichment.records import (
    BLAME_LIKELY_ROW,
    BLAME_PROVIDER,
    BLAME_ROW,
    BLAME_UNCLEAR,
    UNSETTLED,
    ItemError,
    Provenance,
    WorkItem,
    metadata_patch,
    utc_timestamp,
)
from enrich_pipeline.enrichment.structured import Answer, Question, accepted_tags
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.enrichment.text import clean_caption, clean_message, fit_caption
from enrich_pipeline.pipeline.broker import CaptionBroker, CaptionCache
from enrich_pipeline.pipeline.stats import ChunkResult, ItemOutcome, RunStats
from enrich_pipeline.providers.answers import UNUSABLE_CODES
from enrich_pipeline.providers.base import (
    SCOPE_ROW,
    SCOPE_THROTTLE,
    FatalProviderError,
    Provider,
    ProviderError,
    row_at_fault,
    usable_vector,
)
from enrich_pipeline.providers.dashscope import MAX_EMBEDDING_BATCH
from enrich_pipeline.settings.dashscope import DEFAULT_PROMPT

T = TypeVar("T")


@dataclass
class Chunk:
    user_id: str
    worker: str
    items: list[WorkItem]
    skipped: list[str] = field(default_factory=list)

    def live(self) -> list[WorkItem]:
        return [w for w in self.items if w.ok]


def chunked(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def _parallel(fn: Callable[[T], None], items: Sequence[T], workers: int) -> None:
    """Run ``fn`` over items on a thread pool; a fatal error cancels what has not started."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in futures:
                future.result()
        except FatalProviderError:
            for future in futures:
                future.cancel()
            raise


def claim_chunk(
    store: Store,
    user_id: str,
    ids: Sequence[str],
    *,
    worker: str,
    lease_seconds: int,
    max_attempts: int,
    recaption: tuple[str, str] | None = None,
    stale: OnImageChange = IGNORE,
) -> Chunk:
    items, skipped = store.items.claim(
        user_id,
        ids,
        worker=worker,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        recaption=recaption,
        stale=stale,
    )
    return Chunk(
        user_id=user_id,
        worker=worker,
        items=[WorkItem(i) for i in items],
        skipped=skipped,
    )


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def load_visual(
    work: WorkItem,
    *,
    policy: ImagePolicy,
    max_image_side: int,
    color_count: int = 5,
    vision_model: str | None = None,
    embed_image: bool = False,
) -> None:
    """Load one image once: dominant colors from its pixels, a downscaled copy for the model
    (kept past the caption for the image vector when ``embed_image``)."""
    work.embed_image = embed_image
    metadata = work.item.metadata
    if metadata is not None and not isinstance(metadata, dict):
        work.fail(
            ItemError(
                "metadata_not_object",
                f"metadata is a JSON {_JSON_TYPES.get(type(metadata), 'value')}, not an object; "
                "the row was left unchanged",
                True,
                "read",
            )
        )
        return
    try:
        loaded = load_image(work.item.image, policy)
        work.content_sha256 = loaded.content_sha256
        # The copy for the model first: an image the model would refuse (too_small) costs no
        # colour clustering either.
        work.vision = prepare_for_vision(
            loaded, max_side=max_image_side, model=vision_model or vision_tokens.DEFAULT_MODEL
        )
        work.dominant_colors = dominant_colors(loaded.image, k=color_count)
    except ImageLoadError as exc:
        work.fail(ItemError(exc.code, clean_message(exc), exc.permanent, "image"))
    except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one row, not the run
        work.fail(ItemError("image_error", _describe(exc), True, "image"))


def _describe(exc: BaseException) -> str:
    return clean_message(f"{type(exc).__name__}: {exc}")


def visual_attributes(
    chunk: Chunk,
    *,
    policy: ImagePolicy,
    max_image_side: int,
    color_count: int = 5,
    concurrent: int = 5,
    vision_model: str | None = None,
    progress: Callable[[], None] | None = None,
    embed_image: bool = False,
) -> Chunk:
    """Visual attributes of every live item of the chunk, ``concurrent`` images at a time;
    the copy for the model is sized for ``vision_model``'s patch grid and cap. ``progress`` is
    called after each image (a run's heartbeat counts it)."""

    def one(work: WorkItem) -> None:
        load_visual(
            work,
            policy=policy,
            max_image_side=max_image_side,
            color_count=color_count,
            vision_model=vision_model,
            embed_image=embed_image,
        )
        if progress is not None:
            progress()

    _parallel(one, chunk.live(), concurrent)
    return chunk


def accept_caption(
    work: WorkItem,
    caption: Answer | str,
    vocabulary: TagVocabulary = DEFAULT_VOCABULARY,
    *,
    cached: bool = False,
) -> None:
    """Take an answer for the item (online, from the cache or from a batch answer; a bare
    caption is an English text answer): every language's caption made fit to store
    (``text.clean_caption``, capped at ``text.CAPTION_MAX_CHARS`` and marked
    ``caption_truncated``), the tags the model chose that are in the vocabulary (the others
    dropped and counted) or, for a text answer, the keyword rules' tags, the downscaled image
    dropped to keep memory flat. Whatever provider it came from, a caption that is empty once
    cleaned is no caption."""
    answer = Answer.plain(caption) if isinstance(caption, str) else caption
    captions: dict[str, str] = {}
    truncated = False
    for code, raw in answer.captions.items():
        text, cut = fit_caption(clean_caption(raw))
        captions[code] = text
        truncated = truncated or cut
    if not captions or not all(captions.values()):
        # Paid for and unusable: the row's error, as the providers raise it (answers.py).
        work.fail(
            ItemError("empty_caption", "the model returned an empty caption", False, "caption")
        )
        return
    work.captions = captions
    work.caption = next(iter(captions.values()))
    work.caption_truncated = truncated
    work.from_cache = cached
    work.answer_format = answer.answer_format
    work.tags_source = answer.tags_source
    work.style_tags, work.object_tags, work.tags_dropped = accepted_tags(answer, vocabulary)
    if not work.embed_image:
        work.vision = None


def _blame(error: ProviderError) -> str:
    """A provider error's first verdict: the row's, the provider's, or unclear until the
    provider's other calls are known (``settle_blame``)."""
    if error.scope == SCOPE_ROW:
        return BLAME_ROW
    if error.scope == SCOPE_THROTTLE:
        return BLAME_PROVIDER
    return BLAME_LIKELY_ROW if error.status == 500 else BLAME_UNCLEAR


def caption_item(
    work: WorkItem, broker: CaptionBroker, vocabulary: TagVocabulary = DEFAULT_VOCABULARY
) -> None:
    """Caption one item (its answer: captions and tags); a provider error fails the item, a
    stop of the provider (rejected key, provider given up on) propagates to stop the run.
    Anything else that goes wrong for this item fails this item alone (``internal_error``,
    transient)."""
    try:
        answer, cached = broker.answer(work)
        accept_caption(work, answer, vocabulary, cached=cached)
    except FatalProviderError as stop:
        if stop.row_error is not None:  # the row's own (paid, unusable) answers met the stop
            error = stop.row_error
            work.fail(ItemError(error.code, clean_message(error), error.permanent, "caption"))
        raise
    except ProviderError as exc:
        work.fail(ItemError(exc.code, clean_message(exc), exc.permanent, "caption", _blame(exc)))
    except Exception as exc:  # noqa: BLE001 - one row's trouble must not end the run
        work.fail(ItemError("internal_error", _describe(exc), False, "caption"))


def settle_blame(chunk: Chunk, provider: Provider, kind: str = "vision") -> Chunk:
    """Decide the unclear failures of a chunk whose calls are all done: a service error (5xx,
    timeout, connection, unreadable answer) that persisted through one row's retries
    is that row's while most of the provider's recent calls succeed, and the provider's
    otherwise (the row is given back untouched, its attempts unchanged). With no success to go
    by, an HTTP 500 that is the run's only failed call is the row's (``Governor.row_at_fault``).
    """
    for w in chunk.items:
        if w.error is not None and w.error.blame in UNSETTLED:
            likely = w.error.blame == BLAME_LIKELY_ROW
            own = row_at_fault(provider, kind, likely_row=likely)
            w.error = replace(w.error, blame=BLAME_ROW if own else BLAME_PROVIDER)
    return chunk


def caption_chunk(
    chunk: Chunk,
    provider: Provider,
    *,
    concurrent: int = 5,
    vocabulary: TagVocabulary = DEFAULT_VOCABULARY,
    cache: CaptionCache | None = None,
    prompt_version: str = "",
    question: Question | None = None,
) -> Chunk:
    """Caption every live item, ``concurrent`` calls at a time: each call asks ``question``
    (captions in its languages, tags from its vocabulary; default: English, ``vocabulary``).

    With a cache, an image already answered by this model, prompt version, answer format and
    languages (in any row, any run) costs no call, and rows of the chunk that share an image
    share one call.
    """
    live = chunk.live()
    question = question or Question(DEFAULT_PROMPT, vocabulary=vocabulary)
    broker = CaptionBroker(provider, cache, prompt_version, question)
    broker.prefetch(w.content_sha256 for w in live if w.content_sha256)
    _parallel(lambda w: caption_item(w, broker, vocabulary), live, concurrent)
    return settle_blame(chunk, provider)


def embed_chunk(
    chunk: Chunk, provider: Provider, *, enabled: bool = True, concurrent: int = 4
) -> Chunk:
    """Embed the chunk's captions, ten per request, ``concurrent`` requests at a time.

    An embedding failure does not cost the caption that was already paid for: the caption is
    written without a vector and the gap is counted (and shown by the asset check). A vector
    that is not finite or not of the configured length is refused for its row alone. A stop of
    the provider propagates; the caller still writes the chunk's paid captions (engine,
    ``defs.ops._provider_step``).
    """
    if not enabled:
        return chunk
    live = [w for w in chunk.live() if w.caption]
    batches = [live[i : i + MAX_EMBEDDING_BATCH] for i in range(0, len(live), MAX_EMBEDDING_BATCH)]

    def one(batch: list[WorkItem]) -> None:
        try:
            vectors = provider.embed([w.embedding_text for w in batch])
        except FatalProviderError:
            raise
        except ProviderError:  # a failed batch costs its vectors, not the captions
            return
        if len(vectors) != len(batch):
            return
        for work, vector in zip(batch, vectors, strict=True):
            if usable_vector(vector):
                # float32, as stored (real[]): a quarter of a list of Python floats in memory.
                work.embedding = array("f", vector)

    _parallel(one, batches, concurrent)
    return chunk


def record_unusable(store: Store, chunk: Chunk, *, run_id: str | None = None) -> list[ItemOutcome]:
    """At a stop of the run: charge the chunk's rows whose paid answers were unusable (blank,
    no readable caption), so that a model that answers nothing usable costs each row at most
    ``max_attempts`` runs. The caller gives the chunk's other rows back, as on any stop."""
    failures = [
        FailureRow(w.item.id, w.error)
        for w in chunk.items
        if w.error is not None and w.error.charged and w.error.code in UNUSABLE_CODES
    ]
    if failures:
        store.items.write_chunk(
            chunk.user_id, worker=chunk.worker, successes=[], failures=failures, run_id=run_id
        )
    return [
        ItemOutcome(f.item_id, "failed", error=f.error.message, error_code=f.error.code)
        for f in failures
    ]


def write_chunk(
    store: Store,
    chunk: Chunk,
    *,
    provenance: Provenance,
    embedding_model: str | None,
    run_id: str | None = None,
    image_embedding_model: str | None = None,
) -> ChunkResult:
    """Write the chunk back in one transaction and say what happened to each item.

    ``embedding_model`` is None when the run does not embed captions; otherwise a written
    caption without a vector is counted as an embedding failure. Only the rows' own failures go
    to the ledger; rows the provider failed (throttling, an outage) and rows the run never got
    to are given back: claims released, no ledger entry, attempts unchanged.
    """
    generated_at = utc_timestamp()
    successes = [
        SuccessRow(
            w.item.id,
            w.item.image,
            metadata_patch(w, provenance, generated_at),
            w.embedding,
            # A stale or re-captioned row's caption is replaced only if it is still there.
            **replacing(w.item.metadata),
            image_vector=w.image_vector,
            content_sha256=w.content_sha256,
        )
        for w in chunk.items
        if w.ok and w.caption
    ]
    failures = [
        FailureRow(w.item.id, w.error)
        for w in chunk.items
        if w.error is not None and w.error.charged
    ]
    given_back = [
        w
        for w in chunk.items
        if (w.error is not None and not w.error.charged) or (w.error is None and not w.caption)
    ]
    outcome = store.items.write_chunk(
        chunk.user_id,
        worker=chunk.worker,
        successes=successes,
        failures=failures,
        embedding_model=embedding_model,
        run_id=run_id,
        image_embedding_model=image_embedding_model,
    )
    if given_back:
        store.items.release(chunk.user_id, [w.item.id for w in given_back], worker=chunk.worker)
    written = set(outcome.written)
    outcomes: list[ItemOutcome] = []
    stats = RunStats()
    for w in chunk.items:
        if w.error is not None and not w.error.charged:
            outcomes.append(
                ItemOutcome(
                    w.item.id,
                    "skipped",
                    error=f"not charged, left pending: {w.error.message}",
                    error_code=w.error.code,
                    deferred=True,
                )
            )
        elif w.error is None and not w.caption:
            outcomes.append(
                ItemOutcome(w.item.id, "skipped", error="not processed: the run stopped")
            )
        elif w.error is not None:
            outcomes.append(
                ItemOutcome(w.item.id, "failed", error=w.error.message, error_code=w.error.code)
            )
        elif w.item.id in written:
            outcomes.append(
                ItemOutcome(
                    w.item.id,
                    "succeeded",
                    w.caption,
                    tuple(w.dominant_colors),
                    tuple(w.style_tags),
                    tuple(w.object_tags),
                    cached=w.from_cache,
                    tags_dropped=w.tags_dropped,
                )
            )
            if w.embedding is not None:
                stats.embedded += 1
            elif embedding_model is not None:
                stats.embedding_failed += 1
            if image_embedding_model is not None:
                stats.count_image_vector(w.image_vector_outcome)
        elif w.item.id in outcome.refused:
            # The database refused this row's write (a trigger, a constraint): its own error,
            # in the ledger with the database's words; the chunk's other rows are written.
            refusal = outcome.refused[w.item.id]
            outcomes.append(
                ItemOutcome(w.item.id, "failed", error=refusal.message, error_code=refusal.code)
            )
        else:
            outcomes.append(
                ItemOutcome(w.item.id, "skipped", error="caption written by someone else meanwhile")
            )
    outcomes.extend(
        ItemOutcome(i, "skipped", error="claimed by another run or no longer pending")
        for i in chunk.skipped
    )
    stats.add(outcomes)
    return ChunkResult(outcomes, stats)
