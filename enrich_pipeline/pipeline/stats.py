"""What a run did, per item and in total: the legacy end-of-run statistics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from enrich_pipeline.enrichment.records import IMAGE_COPIED, IMAGE_CURRENT, IMAGE_EMBEDDED

SAMPLE_CAPTIONS = 5


@dataclass(frozen=True)
class ItemOutcome:
    item_id: str
    status: str  # "succeeded" | "failed" | "skipped"
    caption: str | None = None
    dominant_colors: tuple[str, ...] = ()
    style_tags: tuple[str, ...] = ()
    object_tags: tuple[str, ...] = ()
    error: str | None = None
    error_code: str | None = None
    cached: bool = False
    # Skipped because the provider failed it (throttling, an outage): given back, not charged.
    deferred: bool = False
    # Tags the model returned outside the vocabulary, dropped (structured answers).
    tags_dropped: int = 0


@dataclass
class RunStats:
    """The legacy end-of-run statistics, mergeable across chunks and users."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    embedded: int = 0
    embedding_failed: int = 0
    cache_hits: int = 0
    deferred: int = 0  # of the skipped: given back uncharged because the provider failed them
    tags_dropped: int = 0  # model tags outside the vocabulary, dropped from written rows
    # Image vectors of written rows: made by a call, copied from a row with the same image
    # bytes or already current (nothing paid), or missing (the model refused the image, or the
    # call failed: ``enrich-captions --embed-images`` fills them in later).
    image_embedded: int = 0
    image_vectors_reused: int = 0
    image_embedding_failed: int = 0
    samples: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.total if self.total else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.succeeded if self.succeeded else 0.0

    def add(self, outcomes: Iterable[ItemOutcome]) -> None:
        for o in outcomes:
            self.total += 1
            if o.status == "succeeded":
                self.succeeded += 1
                self.cache_hits += o.cached
                self.tags_dropped += o.tags_dropped
                if o.caption and len(self.samples) < SAMPLE_CAPTIONS:
                    self.samples.append(o.caption)
            elif o.status == "failed":
                self.failed += 1
                code = o.error_code or "error"
                self.errors[code] = self.errors.get(code, 0) + 1
            else:
                self.skipped += 1
                self.deferred += o.deferred

    def count_image_vector(self, outcome: str) -> None:
        """One written row's image vector (``WorkItem.image_vector_outcome``)."""
        if outcome == IMAGE_EMBEDDED:
            self.image_embedded += 1
        elif outcome in (IMAGE_COPIED, IMAGE_CURRENT):
            self.image_vectors_reused += 1
        else:
            self.image_embedding_failed += 1

    def merge(self, other: RunStats) -> None:
        self.image_embedded += other.image_embedded
        self.image_vectors_reused += other.image_vectors_reused
        self.image_embedding_failed += other.image_embedding_failed
        self.total += other.total
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.skipped += other.skipped
        self.embedded += other.embedded
        self.embedding_failed += other.embedding_failed
        self.cache_hits += other.cache_hits
        self.deferred += other.deferred
        self.tags_dropped += other.tags_dropped
        self.samples.extend(other.samples[: max(0, SAMPLE_CAPTIONS - len(self.samples))])
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n

    def report_rows(self) -> list[tuple[str, str]]:
        """The legacy report's statistics, as (label, value) lines."""
        rows = [
            ("Total", str(self.total)),
            ("Succeeded", str(self.succeeded)),
            ("Failed", str(self.failed)),
            ("Skipped", str(self.skipped)),
            ("Success rate", f"{self.success_rate * 100:.1f}%"),
            (
                "Cache hits",
                f"{self.cache_hits} ({self.cache_hit_rate * 100:.1f}% of succeeded, no API call)",
            ),
        ]
        if self.errors:
            rows.append(("Errors", ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))))
        if self.deferred:
            rows.append(
                (
                    "Not charged",
                    f"{self.deferred} (DashScope throttled or failed them: left pending, "
                    "attempts unchanged)",
                )
            )
        if self.tags_dropped:
            rows.append(
                ("Tags dropped", f"{self.tags_dropped} (the model's, not in the vocabulary)")
            )
        without = f" ({self.embedding_failed} without embedding)" if self.embedding_failed else ""
        rows.append(("Embedded", f"{self.embedded}{without}"))
        if self.image_embedded or self.image_vectors_reused or self.image_embedding_failed:
            parts = [f"{self.image_embedded}"]
            if self.image_vectors_reused:
                parts.append(f"{self.image_vectors_reused} already had one (not paid again)")
            if self.image_embedding_failed:
                parts.append(
                    f"{self.image_embedding_failed} without (enrich-captions --embed-images "
                    "fills them in)"
                )
            rows.append(("Image vectors", "; ".join(parts)))
        return rows

    def summary(self) -> dict[str, Any]:
        """The figures as one plain mapping: materialization metadata, batch stats, reports."""
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "success_rate": round(self.success_rate, 4),
            "embedded": self.embedded,
            "embedding_failed": self.embedding_failed,
            "cache_hits": self.cache_hits,
            "cache_hit_rate": round(self.cache_hit_rate, 4),
            "deferred": self.deferred,
            "tags_dropped": self.tags_dropped,
            "image_embedded": self.image_embedded,
            "image_vectors_reused": self.image_vectors_reused,
            "image_embedding_failed": self.image_embedding_failed,
            "errors": dict(self.errors),
        }


@dataclass(frozen=True)
class ChunkResult:
    outcomes: list[ItemOutcome]
    stats: RunStats
