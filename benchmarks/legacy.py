"""The legacy ``batch_enrich_captions.py`` control flow, reimplemented as the baseline.

As documented: the pending rows (at most ``--max-items``) are taken in batches of
``--batch-size``; within a batch ``--concurrent`` items are worked on at a time; when the whole
batch is done its results are written; then the script sleeps 1 s before the next batch.

The per-item work is the project's own stage functions (image loading, colors, caption, tags,
embeddings ten per request, the conditional write), so the comparison measures the control flow
and nothing else. Where the old script's details are unknown the choice favours it: embeddings
are batched, there is no caption-cache round trip, and no pause follows the last batch.
"""

from __future__ import annotations

import time

from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.stats import RunStats
from enrich_pipeline.providers.base import Provider
from enrich_pipeline.settings import DashScopeSettings

PAUSE_SECONDS = 1.0


def run_legacy(
    store: Store,
    provider: Provider,
    api: DashScopeSettings,
    user_id: str,
    *,
    batch_size: int = 10,
    concurrent: int = 5,
    max_items: int | None = 100,
    caption_embedding: bool = True,
    policy: ImagePolicy | None = None,
    pause: float = PAUSE_SECONDS,
) -> RunStats:
    policy = policy or ImagePolicy()
    worker = "legacy-baseline"
    provenance = Provenance(provider.model_label, api.prompt_version, provider.offline)
    stats = RunStats()
    ids = store.items.pending_ids(user_id, limit=max_items, max_attempts=3)
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    for n, batch in enumerate(batches):
        chunk = stages.claim_chunk(
            store, user_id, batch, worker=worker, lease_seconds=600, max_attempts=3
        )
        stages.visual_attributes(
            chunk, policy=policy, max_image_side=api.max_image_side, concurrent=concurrent
        )
        stages.caption_chunk(chunk, provider, concurrent=concurrent, cache=None)
        stages.embed_chunk(chunk, provider, enabled=caption_embedding)
        result = stages.write_chunk(
            store,
            chunk,
            provenance=provenance,
            embedding_model=provider.embedding_model if caption_embedding else None,
        )
        stats.merge(result.stats)
        if n + 1 < len(batches):
            time.sleep(pause)
    return stats
