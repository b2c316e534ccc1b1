"""One enrichment run outside Dagster: the command line's engine, built on the same stages."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from enrich_pipeline import stages
from enrich_pipeline.api.dashscope import FatalProviderError, Provider, Usage
from enrich_pipeline.db.store import ItemStore
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.settings import DashScopeSettings, RunSettings

OutcomeCallback = Callable[[str, stages.ItemOutcome], None]


def new_worker_id(prefix: str = "cli") -> str:
    """A claim owner unique to this process, readable in the claims table."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def chunked(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


@dataclass
class Engine:
    """What a run needs, built once: the store, the provider and the policies."""

    store: ItemStore
    provider: Provider
    dashscope: DashScopeSettings
    run: RunSettings
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    vocabulary: TagVocabulary = field(default_factory=lambda: DEFAULT_VOCABULARY)

    @property
    def provenance(self) -> Provenance:
        return Provenance(
            self.provider.model_label, self.dashscope.prompt_version, self.provider.offline
        )

    @property
    def usage(self) -> Usage:
        return self.provider.usage

    def process_chunk(
        self, user_id: str, ids: Sequence[str], *, worker: str, run_id: str | None = None
    ) -> stages.ChunkResult:
        """Claim, enrich and write one chunk; claims are released if the provider is fatal."""
        run = self.run
        chunk = stages.claim_chunk(
            self.store,
            user_id,
            ids,
            worker=worker,
            lease_seconds=run.lease_seconds,
            max_attempts=run.max_attempts,
        )
        try:
            stages.visual_attributes(
                chunk,
                policy=self.image_policy,
                max_image_side=self.dashscope.max_image_side,
                color_count=run.color_count,
                concurrent=run.concurrent,
            )
            stages.caption_chunk(
                chunk,
                self.provider,
                concurrent=run.concurrent,
                vocabulary=self.vocabulary,
                cache=self.store,
                prompt_version=self.dashscope.prompt_version,
            )
            stages.embed_chunk(chunk, self.provider, enabled=run.caption_embedding)
        except FatalProviderError:
            self.store.release(user_id, [w.item.id for w in chunk.items], worker=worker)
            raise
        return stages.write_chunk(
            self.store,
            chunk,
            provenance=self.provenance,
            embedding_model=self.dashscope.embedding_model if run.caption_embedding else None,
            run_id=run_id,
            embedding_wanted=run.caption_embedding,
        )

    def enrich_user(
        self,
        user_id: str,
        *,
        limit: int | None,
        worker: str,
        on_outcome: OutcomeCallback | None = None,
        run_id: str | None = None,
    ) -> stages.RunStats:
        stats = stages.RunStats()
        ids = self.store.pending_ids(user_id, limit=limit, max_attempts=self.run.max_attempts)
        for chunk_ids in chunked(ids, self.run.batch_size):
            result = self.process_chunk(user_id, chunk_ids, worker=worker, run_id=run_id)
            if on_outcome:
                for outcome in result.outcomes:
                    on_outcome(user_id, outcome)
            stats.merge(result.stats)
        return stats

    def enrich(
        self,
        user_id: str | None = None,
        *,
        on_outcome: OutcomeCallback | None = None,
        worker: str | None = None,
    ) -> stages.RunStats:
        """One user, or every user with pending rows, within ``max_items`` in total."""
        worker = worker or new_worker_id()
        users = (
            [user_id]
            if user_id is not None
            else [u for u, _ in self.store.users_with_pending(self.run.max_attempts)]
        )
        stats = stages.RunStats()
        budget = self.run.max_items
        for user in users:
            if budget is not None and budget <= 0:
                break
            got = self.enrich_user(user, limit=budget, worker=worker, on_outcome=on_outcome)
            stats.merge(got)
            if budget is not None:
                budget -= got.total
        return stats
