"""The image-vector stage: the chunk's downscaled images embedded by the image model
(``ENRICH_IMAGE_EMBEDDING_MODEL``), in the same chunk as their captions, written in the same
transaction (``stages.write_chunk``).

The image is the one the run already loaded and downscaled for the caption (``load_visual``
keeps it past the caption when the run embeds images): nothing is downloaded twice. Paid once:
a row whose stored vector is current (same model, length and image value) is not embedded
again, and an image whose bytes another row of the user already has a vector for gets a copy of
it (``db.image_vectors``).

Errors follow the caption embedding's rule: an image vector that cannot be had costs the vector,
never the caption already paid for. An image the model refuses (or one over the documented size)
is that row's, counted; a call that failed past its retries costs its images' vectors; a stop of
the provider (``FatalProviderError``: key, model, account; the image model given up on)
propagates, and the caller still writes the chunk's paid captions (engine,
``defs.chunk_steps.provider_step``).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from enrich_pipeline.db.image_vectors import ImageVectorRow
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import (
    IMAGE_COPIED,
    IMAGE_CURRENT,
    IMAGE_EMBEDDED,
    IMAGE_FAILED,
    WorkItem,
    image_digest,
)
from enrich_pipeline.pipeline.stages import Chunk, _parallel, visual_attributes
from enrich_pipeline.providers.base import (
    FatalProviderError,
    Provider,
    ProviderError,
    usable_vector,
)

# Images per task: a few requests' worth, so that a chunk's calls run side by side.
_GROUP = 8


def image_model_of(provider: Provider) -> tuple[str, int] | None:
    """The provider's image model and vector length, or None when images are not embedded."""
    model = getattr(provider, "image_embedding_model", None)
    dims = getattr(provider, "image_embedding_dimensions", None)
    return (model, dims) if model and dims else None


def image_model_name(provider: Provider) -> str | None:
    """The provider's image model, None when images are not embedded."""
    target = image_model_of(provider)
    return target[0] if target else None


def drop_images(items: Sequence[WorkItem]) -> None:
    """The downscaled images let go (memory stays flat): after the stage, or at a stop."""
    for w in items:
        w.vision = None


def embed_images_chunk(
    chunk: Chunk,
    provider: Provider,
    *,
    store: Store | None = None,
    concurrent: int = 2,
    captioned_only: bool = True,
) -> Chunk:
    """Embed the images of the chunk's live rows (with a caption, unless ``captioned_only`` is
    off: ``enrich-captions --embed-images``), then drop the images. See the module docstring."""
    target = image_model_of(provider)
    wanted = [
        w
        for w in chunk.live()
        if w.vision is not None and w.embed_image and (w.caption or not captioned_only)
    ]
    if target is None or not wanted:
        drop_images(chunk.items)
        return chunk
    model, dims = target
    try:
        todo = _reuse(wanted, store, model, dims)

        def one(group: list[WorkItem]) -> None:
            try:
                vectors = provider.embed_images([w.vision for w in group if w.vision])
            except FatalProviderError:
                raise
            except ProviderError:  # past its retries: these images' vectors, not the captions
                vectors = []
            if len(vectors) != len(group):
                vectors = [[] for _ in group]
            for work, vector in zip(group, vectors, strict=True):
                if usable_vector(vector, dims):
                    work.image_vector = array("f", vector)
                    work.image_vector_outcome = IMAGE_EMBEDDED
                else:
                    work.image_vector_outcome = IMAGE_FAILED

        # Rows of the chunk that share image bytes share one call.
        first: dict[str, WorkItem] = {}
        twins: list[WorkItem] = []
        calls: list[WorkItem] = []
        for w in todo:
            if w.content_sha256 and w.content_sha256 in first:
                twins.append(w)
            else:
                calls.append(w)
                if w.content_sha256:
                    first[w.content_sha256] = w
        groups = [calls[i : i + _GROUP] for i in range(0, len(calls), _GROUP)]
        _parallel(one, groups, concurrent)
        for w in twins:
            source = first[w.content_sha256 or ""]
            w.image_vector = source.image_vector
            w.image_vector_outcome = (
                IMAGE_COPIED if source.image_vector is not None else IMAGE_FAILED
            )
    finally:
        drop_images(chunk.items)
    return chunk


def _reuse(wanted: list[WorkItem], store: Store | None, model: str, dims: int) -> list[WorkItem]:
    """Mark the rows that need no call (a current vector, or a copy by image bytes); returns
    the rest."""
    if store is None:
        return wanted
    known = store.items.known_image_vectors(
        model,
        dims,
        [(w.item.user_id, w.item.id, image_digest(w.item.image), w.content_sha256) for w in wanted],
    )
    todo = []
    for w in wanted:
        copy = known.by_content.get((w.item.user_id, w.content_sha256 or ""))
        if (w.item.user_id, w.item.id) in known.current:
            w.image_vector_outcome = IMAGE_CURRENT
        elif copy is not None and usable_vector(copy, dims):
            w.image_vector = array("f", copy)
            w.image_vector_outcome = IMAGE_COPIED
        else:
            todo.append(w)
    return todo


@dataclass
class Backfill:
    """What ``enrich-captions --embed-images`` did."""

    rows: int = 0
    embedded: int = 0
    copied: int = 0
    failed: int = 0  # the image could not be loaded, or the model gave no vector


def backfill(
    store: Store,
    provider: Provider,
    *,
    user_id: str | None,
    policy: ImagePolicy,
    max_image_side: int,
    vision_model: str | None,
    batch_size: int,
    concurrent: int,
    max_items: int | None = None,
) -> Backfill:
    """Image vectors for rows captioned before the image model was set (or whose vector is
    missing or stale): each image loaded and downscaled as a caption run does, embedded, and
    stored if the row still holds that image. No caption call; rows with a current vector are
    not listed, so a second run pays nothing. A stop of the provider propagates."""
    target = image_model_of(provider)
    if target is None:
        raise ValueError("no image embedding model is set (ENRICH_IMAGE_EMBEDDING_MODEL)")
    model, dims = target
    done = Backfill()
    after: str | None = None

    while max_items is None or done.rows < max_items:
        limit = batch_size if max_items is None else min(batch_size, max_items - done.rows)
        rows = store.items.without_image_vector(user_id, model, dims, limit=limit, after=after)
        if not rows:
            break
        after = rows[-1].id
        items = [WorkItem(r) for r in rows]
        chunk = Chunk(user_id or "", "embed-images", items)
        visual_attributes(
            chunk,
            policy=policy,
            max_image_side=max_image_side,
            concurrent=concurrent,
            vision_model=vision_model,
            embed_image=True,
        )
        embed_images_chunk(
            chunk, provider, store=store, concurrent=concurrent, captioned_only=False
        )
        vectors = [
            ImageVectorRow(
                w.item.id,
                w.item.user_id,
                w.image_vector,
                image_digest(w.item.image),
                w.content_sha256,
            )
            for w in items
            if w.image_vector is not None
        ]
        store.items.write_image_vectors(model, vectors)
        done.rows += len(items)
        done.embedded += sum(w.image_vector_outcome == IMAGE_EMBEDDED for w in items)
        done.copied += sum(w.image_vector_outcome == IMAGE_COPIED for w in items)
        done.failed += sum(w.image_vector is None for w in items)
    return done
