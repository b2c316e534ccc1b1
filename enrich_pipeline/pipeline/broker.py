"""The caption broker: one paid call per distinct image, whatever the rows and runs."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Protocol

from enrich_pipeline.enrichment.records import WorkItem
from enrich_pipeline.enrichment.text import clean_caption
from enrich_pipeline.providers.answers import unusable_answer
from enrich_pipeline.providers.base import Provider


class CaptionCache(Protocol):
    """Where paid captions are remembered (the store's ``enrich_answer_cache``)."""

    def cached_captions(
        self, shas: Iterable[str], *, model: str, prompt_version: str
    ) -> dict[str, str]: ...

    def cache_caption(self, sha: str, *, model: str, prompt_version: str, caption: str) -> None: ...


class CaptionBroker:
    """One paid call per distinct image: known captions first, then the cache, then at most
    one call in flight per image, whose result its twins share (errors included).

    Every paid caption goes to the cache at once, before any chunk is written, so a run that
    dies after paying does not pay again.
    """

    def __init__(
        self, provider: Provider, cache: CaptionCache | None = None, prompt_version: str = ""
    ) -> None:
        self.provider = provider
        self.cache = cache
        self.prompt_version = prompt_version
        self._known: dict[str, str] = {}
        self._looked_up: set[str] = set()  # cache already asked (and had nothing)
        self._inflight: dict[str, Future[str]] = {}
        self._lock = threading.Lock()

    def prefetch(self, shas: Iterable[str]) -> None:
        """One cache query for many images (a chunk), instead of one per image."""
        if self.cache is not None:
            wanted = [s for s in shas if s not in self._known]
            found = self.cache.cached_captions(
                wanted, model=self.provider.model_label, prompt_version=self.prompt_version
            )
            with self._lock:
                self._known.update(found)
                self._looked_up.update(wanted)

    def caption(self, work: WorkItem) -> tuple[str, bool]:
        """The caption of the item's image and whether it was had without a call."""
        sha = work.content_sha256
        if sha is None:
            assert work.vision is not None
            return clean_caption(self.provider.caption(work.vision)), False
        with self._lock:
            if sha in self._known:
                return self._known[sha], True
            leader = self._inflight.get(sha)
            if leader is None:
                mine: Future[str] = Future()
                self._inflight[sha] = mine
        if leader is not None:
            return leader.result(), True
        try:
            caption = self._cached_or_paid(sha, work)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(sha, None)
        mine.set_result(caption[0])
        return caption

    def _cached_or_paid(self, sha: str, work: WorkItem) -> tuple[str, bool]:
        model = self.provider.model_label
        if self.cache is not None and sha not in self._looked_up:
            hit = self.cache.cached_captions([sha], model=model, prompt_version=self.prompt_version)
            if sha in hit:
                with self._lock:
                    self._known[sha] = hit[sha]
                return hit[sha], True
        assert work.vision is not None
        # Cleaned before it is cached: whatever the provider, no NUL or lone surrogate reaches
        # the cache insert, and a caption of invisible characters is no caption.
        caption = clean_caption(self.provider.caption(work.vision))
        if not caption:
            raise unusable_answer("")
        if self.cache is not None:
            self.cache.cache_caption(
                sha, model=model, prompt_version=self.prompt_version, caption=caption
            )
        with self._lock:
            self._known[sha] = caption
        return caption, False
