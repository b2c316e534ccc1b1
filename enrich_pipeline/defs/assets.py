"""The partitioned asset: one user's caption enrichment, as a graph of ops with chunk fan-out."""

from __future__ import annotations

from dagster import BackfillPolicy, graph_asset

from enrich_pipeline.defs.ops import (
    caption_embeddings,
    captions,
    pending_rows,
    summarize,
    visual_attributes,
    write_results,
)
from enrich_pipeline.defs.partitions import users_partitions


@graph_asset(
    partitions_def=users_partitions,
    group_name="enrichment",
    # One run per user partition: every query of a run is scoped to one user, the run queue
    # limits runs per partition, and one user's failure never fails another's backfill.
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=1),
    description=(
        "Captions, dominant colors, style/object tags and caption embeddings for one user's "
        "pending items, merged into items.metadata chunk by chunk."
    ),
)
def enriched_items():
    chunks = pending_rows()
    written = chunks.map(visual_attributes).map(captions).map(caption_embeddings).map(write_results)
    return summarize(written.collect())
