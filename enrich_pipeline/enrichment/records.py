"""The records that flow through a run, and the metadata patch they become.

Plain dataclasses, picklable, so Dagster can pass them between ops and the CLI can use them
directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.redaction import scrub_secrets

TAGS_FROM_MODEL = "model"
TAGS_FROM_RULES = "rules"


def image_digest(image: str) -> str:
    """What a caption records of the ``image`` value it was made from: the MD5 of its UTF-8
    text, in hex, as PostgreSQL's ``md5(text)`` computes it (present on every server the
    pipeline runs on, Greenplum 6 included), so that a changed image is found in SQL. A change
    detector, not a security boundary: nobody gains by forging a collision with their own row.
    """
    return hashlib.md5(image.encode("utf-8"), usedforsecurity=False).hexdigest()


def text_digest(caption: str) -> str:
    """What a caption records of its own text, the same MD5 hex (SQL:
    ``md5(metadata->>'caption')``): a person who edits the caption changes the text, not the
    digest, and the caption is theirs from then on (never replaced)."""
    return image_digest(caption)


def joined_captions(captions: Iterable[str]) -> str:
    """The text embedded for search: every language's caption, one per line, so that a query
    in any configured language meets its own words (see the README, "What the model returns,
    and in which language")."""
    return "\n".join(text for text in captions if text)


@dataclass(frozen=True)
class PendingItem:
    id: str
    user_id: str
    image: str
    metadata: Any


# Whose fault an item's failure is (``ItemError.blame``): the row's (recorded in the ledger and
# counted toward its attempts), the provider's (throttling, an outage: the row is given back
# untouched), or unclear until the provider's other calls are known (a 5xx or timeout on one
# row while most calls succeed is the row's; see ``pipeline.stages.settle_blame``). "Likely the
# row's" is an unclear error that is the row's even without that evidence when it is the run's
# only failure (an HTTP 500, which the request itself can cause).
BLAME_ROW = "row"
BLAME_PROVIDER = "provider"
BLAME_UNCLEAR = "unclear"
BLAME_LIKELY_ROW = "likely_row"
UNSETTLED = frozenset({BLAME_UNCLEAR, BLAME_LIKELY_ROW})


@dataclass(frozen=True)
class ItemError:
    """Why one item failed. ``permanent`` errors are not retried by later runs; an error whose
    ``blame`` is the provider's costs the row nothing (no ledger entry, attempts unchanged).
    The message is scrubbed of every known secret: it goes to the ledger, the report, logs and
    Dagster's events, and may quote a provider or a database."""

    code: str
    message: str
    permanent: bool
    stage: str
    blame: str = BLAME_ROW

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", scrub_secrets(self.message))

    @property
    def charged(self) -> bool:
        """Recorded in the ledger: the row's own error (unclear ones count as the row's)."""
        return self.blame != BLAME_PROVIDER


# What became of a row's image vector (``WorkItem.image_vector_outcome``): made by a call,
# copied from a row with the same image bytes, already current (neither paid), or not had.
IMAGE_EMBEDDED = "embedded"
IMAGE_COPIED = "copied"
IMAGE_CURRENT = "current"
IMAGE_FAILED = "failed"


@dataclass
class WorkItem:
    item: PendingItem
    vision: VisionImage | None = None
    content_sha256: str | None = None
    dominant_colors: list[str] = field(default_factory=list)
    caption: str | None = None
    style_tags: list[str] = field(default_factory=list)
    object_tags: list[str] = field(default_factory=list)
    embedding: Sequence[float] | None = None
    error: ItemError | None = None
    from_cache: bool = False
    caption_truncated: bool = False
    # Every configured language's caption, in the configured order; ``caption`` is the first.
    captions: dict[str, str] = field(default_factory=dict)
    # Where the tags came from: the model's structured answer ("model") or the keyword rules
    # over the caption ("rules"); and the answer format the caption was asked in.
    tags_source: str = TAGS_FROM_RULES
    answer_format: str = "text"
    # Tags the model returned outside the vocabulary, dropped (counted in the run's stats).
    tags_dropped: int = 0
    # Image vectors (ENRICH_IMAGE_EMBEDDING_MODEL): the downscaled image is kept past the
    # caption until it is embedded (no second download); the vector, and what became of it
    # (``pipeline.image_vectors``: one of the IMAGE_* outcomes above).
    embed_image: bool = False
    image_vector: Sequence[float] | None = None
    image_vector_outcome: str = ""

    @property
    def embedding_text(self) -> str:
        """The text embedded for search (``joined_captions``)."""
        if not self.captions:
            return self.caption or ""
        return joined_captions(self.captions.values())

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, error: ItemError) -> None:
        # The first error is the cause; later stages skip failed items and must not mask it.
        if self.error is None:
            self.error = error
        self.vision = None


@dataclass(frozen=True)
class Provenance:
    """What produced a caption, recorded with it so a model change can be acted on later."""

    model: str
    prompt_version: str
    offline: bool = False
    # The caption languages asked for, in order (``ENRICH_CAPTION_LANGUAGES``).
    languages: tuple[str, ...] = ("en",)


def utc_timestamp(now: datetime | None = None) -> str:
    """The legacy format: naive UTC ISO-8601 with microseconds, e.g. 2025-11-27T20:00:00.000000."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def metadata_patch(work: WorkItem, provenance: Provenance, generated_at: str) -> dict[str, Any]:
    """The keys merged into ``metadata``; nothing else of the row is touched."""
    patch: dict[str, Any] = {
        "caption": work.caption,
        "caption_i18n": dict(work.captions)
        or ({provenance.languages[0]: work.caption} if work.caption else {}),
        "dominant_colors": work.dominant_colors,
        "style_tags": work.style_tags,
        "object_tags": work.object_tags,
        "caption_generated_at": generated_at,
        "caption_model": provenance.model,
        "caption_prompt_version": provenance.prompt_version,
        "tags_source": work.tags_source,
        "answer_format": work.answer_format,
        # What the caption was made from: the image value (a change makes the row stale) and
        # the image's bytes (the cache's key); and the caption's own text (an edit by a person
        # makes the caption theirs).
        "caption_image_digest": image_digest(work.item.image),
        "caption_text_digest": text_digest(work.caption or ""),
    }
    if work.content_sha256:
        patch["caption_content_sha256"] = work.content_sha256
    if work.caption_truncated:
        patch["caption_truncated"] = True
    if provenance.offline:
        patch["caption_source"] = "offline"
    return patch
