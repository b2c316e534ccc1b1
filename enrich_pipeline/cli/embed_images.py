"""``enrich-captions --embed-images``: image vectors for rows captioned before
``ENRICH_IMAGE_EMBEDDING_MODEL`` was set (or whose vector is missing or stale), without a caption
call (``pipeline.image_vectors.backfill``)."""

from __future__ import annotations

import time

from enrich_pipeline.bootstrap import Runtime
from enrich_pipeline.cli.report import Report
from enrich_pipeline.pipeline.image_vectors import backfill, image_model_of
from enrich_pipeline.settings import ConfigError


def embed_images(runtime: Runtime, user_id: str | None, report: Report) -> int:
    """Fill in the missing image vectors of ``user_id``'s rows (every user's without one)."""
    target = image_model_of(runtime.provider)
    if target is None:
        raise ConfigError(
            "--embed-images needs ENRICH_IMAGE_EMBEDDING_MODEL (e.g. tongyi-embedding-vision-plus)"
        )
    settings = runtime.settings
    started = time.monotonic()
    done = backfill(
        runtime.store,
        runtime.provider,
        user_id=user_id,
        policy=runtime.image_policy,
        max_image_side=settings.dashscope.max_image_side,
        vision_model=settings.dashscope.vision_model,
        batch_size=settings.run.batch_size,
        concurrent=settings.run.concurrent,
        max_items=settings.run.max_items,
    )
    usage = runtime.provider.usage.as_dict()
    model, dims = target
    report.line(f"Image vectors ({model}, {dims} dims), no caption call:")
    report.line(f"  {'Rows without one:':<18}{done.rows}")
    report.line(f"  {'Embedded:':<18}{done.embedded}")
    report.line(f"  {'Copied:':<18}{done.copied} (same image bytes as a row that has one)")
    report.line(f"  {'Without:':<18}{done.failed} (image not loaded, or refused by the model)")
    report.line(
        f"  {'Image calls:':<18}{usage['image_embedding_calls']} call(s), "
        f"{usage['image_embedding_tokens']} image tokens, "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0
