"""The records that flow through a run, and the metadata patch they become.

Plain dataclasses, picklable, so Dagster can pass them between ops and the CLI can use them
directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from enrich_pipeline.enrichment.images import VisionImage


@dataclass(frozen=True)
class PendingItem:
    id: str
    user_id: str
    image: str
    metadata: Any


@dataclass(frozen=True)
class ItemError:
    """Why one item failed. ``permanent`` errors are not retried by later runs."""

    code: str
    message: str
    permanent: bool
    stage: str


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


def utc_timestamp(now: datetime | None = None) -> str:
    """The legacy format: naive UTC ISO-8601 with microseconds, e.g. 2025-11-27T20:00:00.000000."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def metadata_patch(work: WorkItem, provenance: Provenance, generated_at: str) -> dict[str, Any]:
    """The keys merged into ``metadata``; nothing else of the row is touched."""
    patch: dict[str, Any] = {
        "caption": work.caption,
        "dominant_colors": work.dominant_colors,
        "style_tags": work.style_tags,
        "object_tags": work.object_tags,
        "caption_generated_at": generated_at,
        "caption_model": provenance.model,
        "caption_prompt_version": provenance.prompt_version,
    }
    if provenance.offline:
        patch["caption_source"] = "offline"
    return patch
