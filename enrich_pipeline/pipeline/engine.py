"""The streaming engine: one enrichment run outside Dagster, built on the same stages."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

from enrich_pipeline.db.pending import FLAG
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import ItemError, Provenance, WorkItem
from enrich_pipeline.enrichment.structured import Question
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.enrichment.text import clean_message
from enrich_pipeline.pipeline import image_vectors, stages
from enrich_pipeline.pipeline.broker import CaptionBroker
from enrich_pipeline.pipeline.stats import ItemOutcome, RunStats
from enrich_pipeline.providers.base import FatalProviderError, Provider, Usage
from enrich_pipeline.providers.errors import IMAGE_EMBEDDING
from enrich_pipeline.providers.wire import question_of
from enrich_pipeline.settings import DashScopeSettings, RunSettings

OutcomeCallback = Callable[[str, ItemOutcome], None]


def new_worker_id(prefix: str = "cli") -> str:
    """A claim owner unique to this process, readable in the claims table."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Engine:
    """What a run needs, built once: the store, the provider and the policies."""

    store: Store
    provider: Provider
    dashscope: DashScopeSettings
    run: RunSettings
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    vocabulary: TagVocabulary = field(default_factory=lambda: DEFAULT_VOCABULARY)

    @property
    def provenance(self) -> Provenance:
        return Provenance(
            self.provider.model_label,
            self.dashscope.prompt_version,
            self.provider.offline,
            self.dashscope.languages,
        )

    @cached_property
    def question(self) -> Question:
        """What each vision call asks: captions in the configured languages, tags from the
        run's vocabulary."""
        return question_of(self.dashscope, self.vocabulary)

    @property
    def usage(self) -> Usage:
        return self.provider.usage

    @property
    def recaption(self) -> tuple[str, str] | None:
        """(model, prompt version) to re-caption towards, when the run asks for it."""
        if not self.run.recaption:
            return None
        return self.provider.model_label, self.dashscope.prompt_version

    def enrich_user(
        self,
        user_id: str,
        *,
        limit: int | None,
        worker: str,
        on_outcome: OutcomeCallback | None = None,
        run_id: str | None = None,
    ) -> RunStats:
        """Stream the user's pending rows through the stages; see ``_Stream``."""
        if self.run.on_image_change == FLAG and self.recaption is None:
            # Flagged in one statement, no call: what the flag mode does with stale rows.
            self.store.items.flag_stale(user_id)
        ids = self.store.items.pending_ids(
            user_id,
            limit=limit,
            max_attempts=self.run.max_attempts,
            recaption=self.recaption,
            stale=self.run.on_image_change,
        )
        return _Stream(self, user_id, worker, run_id, on_outcome).run(ids)

    def enrich(
        self,
        user_id: str | None = None,
        *,
        on_outcome: OutcomeCallback | None = None,
        worker: str | None = None,
    ) -> RunStats:
        """One user, or every user with pending rows, within ``max_items`` in total."""
        worker = worker or new_worker_id()
        begin_run = getattr(self.provider, "begin_run", None)
        if begin_run is not None:  # a provider used for run after run: this is a new one
            begin_run()
        users = (
            [user_id]
            if user_id is not None
            else [
                u
                for u, _ in self.store.items.users_with_pending(
                    self.run.max_attempts, stale=self.run.on_image_change
                )
            ]
        )
        stats = RunStats()
        budget = self.run.max_items
        for user in users:
            if budget is not None and budget <= 0:
                break
            try:
                got = self.enrich_user(user, limit=budget, worker=worker, on_outcome=on_outcome)
            except (FatalProviderError, KeyboardInterrupt) as stop:
                # What the run did before it stopped travels with the stop (the report); a
                # signal's KeyboardInterrupt carries it the same way.
                done = getattr(stop, "stats", None)
                if isinstance(done, RunStats):
                    stats.merge(done)
                stop.stats = stats  # type: ignore[union-attr]
                raise
            stats.merge(got)
            if budget is not None:
                budget -= got.total
        return stats


class _Stream:
    """Keeps ``concurrent`` model calls in flight across chunk boundaries.

    The legacy script (and a chunk-at-a-time loop) waits for the slowest call of a batch before
    starting the next: with C calls and batches of B, the pool idles while a batch drains. Here
    items flow through one pool of C workers (load, colors, caption: the per-item stages), chunks
    are claimed ahead as workers free up (at most 2C items in flight, so memory stays flat), and
    a chunk is embedded and written by a small second pool as soon as its last item is done.
    Chunks are still the unit of claiming, writing and reporting, so a crash keeps every chunk
    written, exactly as in the Dagster graph.
    """

    def __init__(
        self,
        engine: Engine,
        user_id: str,
        worker: str,
        run_id: str | None,
        on_outcome: OutcomeCallback | None,
    ) -> None:
        self.engine = engine
        self.user_id = user_id
        self.worker = worker
        self.run_id = run_id
        self.on_outcome = on_outcome
        self.stats = RunStats()
        self.fatal: FatalProviderError | None = None
        self.broker = CaptionBroker(
            engine.provider, engine.store.cache, engine.dashscope.prompt_version, engine.question
        )
        self._in_flight = 0
        self._remaining: dict[int, int] = {}
        self._cond = threading.Condition()
        self._report = threading.Lock()
        self._unwritten: dict[int, stages.Chunk] = {}
        self.image_model = image_vectors.image_model_name(engine.provider)

    def run(self, ids: Sequence[str]) -> RunStats:
        run = self.engine.run
        window = 2 * run.concurrent
        items = ThreadPoolExecutor(run.concurrent, thread_name_prefix="enrich-item")
        # Embedding and writing a chunk is mostly waiting too; a few at once keep up with C.
        post = ThreadPoolExecutor(4, thread_name_prefix="enrich-write")
        post_futures: list[Future[None]] = []
        # The ids being claimed: a stop signal between the claim's commit and the chunk's entry
        # in ``_unwritten`` would otherwise leave them claimed for the whole lease.
        claiming: Sequence[str] = ()
        try:
            for n, chunk_ids in enumerate(stages.chunked(ids, run.batch_size)):
                with self._cond:
                    self._cond.wait_for(lambda: self._in_flight < window or self.fatal)
                    if self.fatal:
                        break
                claiming = chunk_ids
                chunk = stages.claim_chunk(
                    self.engine.store,
                    self.user_id,
                    chunk_ids,
                    worker=self.worker,
                    lease_seconds=run.lease_seconds,
                    max_attempts=run.max_attempts,
                    recaption=self.engine.recaption,
                    stale=run.on_image_change,
                )
                with self._cond:
                    self._unwritten[n] = chunk
                    self._remaining[n] = len(chunk.items)
                    self._in_flight += len(chunk.items)
                claiming = ()
                if not chunk.items:
                    post_futures.append(post.submit(self._finish, n))
                for work in chunk.items:
                    items.submit(self._item, n, work, post, post_futures)
            items.shutdown(wait=True)
            for future in list(post_futures):
                future.result()
        except KeyboardInterrupt as stop:
            # Ctrl-C or a stop signal (cli/stopping.py): the calls in flight finish below (their
            # captions are cached), the chunks they complete are written, the rest released.
            stop.stats = self.stats  # type: ignore[attr-defined]
            raise
        finally:
            items.shutdown(wait=True, cancel_futures=True)
            post.shutdown(wait=True)
            every = [w.item.id for c in self._unwritten.values() for w in c.items]
            if every or claiming:
                # Stopped: the rows whose paid answers were unusable are charged, the rest given
                # back (their paid captions are in the cache for the next run).
                self.engine.store.items.release(
                    self.user_id, [*every, *claiming], worker=self.worker
                )
                for chunk in self._unwritten.values():
                    charged = stages.record_unusable(self.engine.store, chunk, run_id=self.run_id)
                    self.stats.add(charged)
                    if self.on_outcome is not None:
                        for outcome in charged:
                            self.on_outcome(self.user_id, outcome)
        if self.fatal:
            self.fatal.stats = self.stats
            raise self.fatal
        return self.stats

    def _item(
        self, n: int, work: WorkItem, post: ThreadPoolExecutor, post_futures: list[Future[None]]
    ) -> None:
        engine = self.engine
        try:
            if self.fatal is None:
                stages.load_visual(
                    work,
                    policy=engine.image_policy,
                    max_image_side=engine.dashscope.max_image_side,
                    color_count=engine.run.color_count,
                    vision_model=engine.dashscope.vision_model,
                    embed_image=self.image_model is not None,
                )
                if work.ok:
                    stages.caption_item(work, self.broker, engine.vocabulary)
        except FatalProviderError as exc:
            with self._cond:
                self.fatal = self.fatal or exc
        except Exception as exc:  # noqa: BLE001 - e.g. the cache's database away: one row fails
            work.fail(
                ItemError(
                    "internal_error",
                    clean_message(f"{type(exc).__name__}: {exc}"),
                    False,
                    "caption",
                )
            )
        finally:
            with self._cond:
                self._in_flight -= 1
                self._remaining[n] -= 1
                done = self._remaining[n] == 0 and self.fatal is None
                self._cond.notify_all()
            if done:
                post_futures.append(post.submit(self._finish, n))

    def _finish(self, n: int) -> None:
        engine, run = self.engine, self.engine.run
        chunk = self._unwritten[n]
        # Every call of the chunk is done: now say whose fault its unclear failures were.
        stages.settle_blame(chunk, engine.provider)
        stop: FatalProviderError | None = None
        try:
            stages.embed_chunk(chunk, engine.provider, enabled=run.caption_embedding)
            image_vectors.embed_images_chunk(chunk, engine.provider, store=engine.store)
        except FatalProviderError as exc:
            stop = exc
            image_vectors.drop_images(chunk.items)
        if stop is not None and stop.kind not in ("embedding", IMAGE_EMBEDDING):
            # The run stopped on the vision side meanwhile: the chunk is given back (its paid
            # captions are in the cache, the next run embeds and writes them for nothing).
            self._stopped(stop)
            return
        # An embedding model stopped the run (a rejected key, access denied, gone): the
        # chunk's captions are paid, so they are written, without the vectors they lack.
        result = stages.write_chunk(
            engine.store,
            chunk,
            provenance=engine.provenance,
            embedding_model=engine.provider.embedding_model if run.caption_embedding else None,
            run_id=self.run_id,
            image_embedding_model=self.image_model,
        )
        with self._cond:
            del self._unwritten[n]
        with self._report:
            self.stats.merge(result.stats)
            if self.on_outcome:
                for outcome in result.outcomes:
                    self.on_outcome(self.user_id, outcome)
        if stop is not None:
            self._stopped(stop)

    def _stopped(self, stop: FatalProviderError) -> None:
        with self._cond:
            self.fatal = self.fatal or stop
            self._cond.notify_all()
