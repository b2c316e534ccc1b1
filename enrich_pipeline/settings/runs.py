"""How one run works through its rows: online (chunks of model calls) or in batch mode
(DashScope's Batch API files)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from enrich_pipeline.settings.framework import SettingsModel

# The Dagster job's chunk size. The legacy CLI writes every 10 rows; a Dagster chunk is a
# step per op, so chunks of 10 would cost five steps per 10 rows in event-log writes and step
# start-up. 100 keeps a chunk's loss on a crash small and the step overhead under 1%.
DAGSTER_BATCH_SIZE = 100


class RunSettings(SettingsModel):
    """Knobs of one enrichment run; defaults are the legacy script's."""

    batch_size: int = Field(
        10,
        description="items per chunk (each chunk is written as soon as it is done)",
        ge=1,
        le=10_000,
    )
    max_items: int | None = Field(
        100, description="items to process at most in this run (None: no limit)", ge=1, le=10**9
    )
    concurrent: int = Field(5, description="model calls in flight at once", ge=1, le=256)
    caption_embedding: bool = Field(True, description="embed the captions")
    max_attempts: int = Field(
        3,
        description="attempts before a transiently failing row is left out",
        validation_alias="ENRICH_MAX_ATTEMPTS",
        ge=1,
        le=100,
    )
    lease_seconds: int = Field(
        120,
        description="claim lease in s: rows of a run that died come back after it (live runs "
        "renew theirs)",
        validation_alias="ENRICH_LEASE_SECONDS",
        ge=1,
        le=7 * 86_400,
    )
    color_count: int = Field(5, description="dominant colors per image at most", ge=1, le=12)
    recaption: bool = Field(
        False, description="re-caption rows captioned with another model or prompt version"
    )
    on_image_change: Literal["recaption", "flag", "ignore"] = Field(
        "recaption",
        description="a row whose image changed since the pipeline captioned it (stale): "
        "recaption it like a pending row, flag it (caption_stale, counted, no call), or ignore it",
        validation_alias="ENRICH_ON_IMAGE_CHANGE",
    )


# DashScope's Batch API: requests and bytes in one batch file.
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 500 * 1024 * 1024


class BatchSettings(SettingsModel):
    """Batch mode (DashScope's Batch API) submissions."""

    max_items: int | None = Field(
        None, description="rows to submit at most (None: every pending row)", ge=1, le=10**9
    )
    max_lines: int = Field(
        BATCH_MAX_LINES, description="lines per batch file", ge=1, le=BATCH_MAX_LINES
    )
    max_bytes: int = Field(
        BATCH_MAX_BYTES, description="bytes per batch file", ge=1, le=BATCH_MAX_BYTES
    )
    # The rows stay claimed a little longer than the provider's window; every poll renews
    # them, so they come back to the online path on their own only if nobody polls any more.
    lease_seconds: int = Field(
        25 * 3600, description="claim lease of submitted rows, in s", ge=3600, le=15 * 86_400
    )
    chunk_size: int = Field(100, description="rows claimed and loaded at once", ge=1, le=10_000)
