"""The answer broker: one paid call per distinct image, whatever the rows and runs."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Protocol

from enrich_pipeline.enrichment.records import WorkItem
from enrich_pipeline.enrichment.structured import Answer, Question
from enrich_pipeline.enrichment.text import clean_caption
from enrich_pipeline.providers.answers import unusable_answer
from enrich_pipeline.providers.base import Provider
from enrich_pipeline.settings.dashscope import DEFAULT_PROMPT


class CaptionCache(Protocol):
    """Where paid answers are remembered (the store's ``enrich_answer_cache``), keyed by image
    content, model, prompt version, answer format and languages."""

    def cached_answers(
        self,
        shas: Iterable[str],
        *,
        model: str,
        prompt_version: str,
        answer_format: str,
        languages: Sequence[str],
    ) -> dict[str, Answer]: ...

    def cache_answer(
        self, sha: str, answer: Answer, *, model: str, prompt_version: str, languages: Sequence[str]
    ) -> None: ...


class CaptionBroker:
    """One paid call per distinct image: known answers first, then the cache, then at most
    one call in flight per image, whose result its twins share (errors included).

    Every paid answer goes to the cache at once, before any chunk is written, so a run that
    dies after paying does not pay again. The cache is keyed by the format the answer was given
    in: when the run steps down mid-run, lookups and inserts follow the format in use. The
    offline provider's answers are never cached (they are not a model's), nor looked up.
    """

    def __init__(
        self,
        provider: Provider,
        cache: CaptionCache | None = None,
        prompt_version: str = "",
        question: Question | None = None,
    ) -> None:
        self.provider = provider
        self.cache = None if provider.offline else cache
        self.prompt_version = prompt_version
        self.question = question or Question(DEFAULT_PROMPT)
        self._known: dict[tuple[str, str], Answer] = {}  # (sha, format) -> answer
        self._looked_up: set[tuple[str, str]] = set()  # cache already asked (and had nothing)
        self._inflight: dict[str, Future[Answer]] = {}
        self._lock = threading.Lock()

    @property
    def _format(self) -> str:
        return self.provider.answer_format

    def _lookup(self, shas: list[str], answer_format: str) -> dict[str, Answer]:
        assert self.cache is not None
        return self.cache.cached_answers(
            shas,
            model=self.provider.model_label,
            prompt_version=self.prompt_version,
            answer_format=answer_format,
            languages=self.question.languages,
        )

    def prefetch(self, shas: Iterable[str]) -> None:
        """One cache query for many images (a chunk), instead of one per image."""
        if self.cache is None:
            return
        fmt = self._format
        wanted = [s for s in shas if (s, fmt) not in self._known]
        found = self._lookup(wanted, fmt)
        with self._lock:
            self._known.update({(s, fmt): a for s, a in found.items()})
            self._looked_up.update((s, fmt) for s in wanted)

    def answer(self, work: WorkItem) -> tuple[Answer, bool]:
        """The answer for the item's image and whether it was had without a call."""
        sha = work.content_sha256
        if sha is None:
            assert work.vision is not None
            return self.provider.answer(work.vision, self.question), False
        with self._lock:
            known = self._known.get((sha, self._format))
            if known is not None:
                return known, True
            leader = self._inflight.get(sha)
            if leader is None:
                mine: Future[Answer] = Future()
                self._inflight[sha] = mine
        if leader is not None:
            return leader.result(), True
        try:
            answer = self._cached_or_paid(sha, work)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(sha, None)
        mine.set_result(answer[0])
        return answer

    def _cached_or_paid(self, sha: str, work: WorkItem) -> tuple[Answer, bool]:
        fmt = self._format
        if self.cache is not None and (sha, fmt) not in self._looked_up:
            hit = self._lookup([sha], fmt)
            if sha in hit:
                with self._lock:
                    self._known[(sha, fmt)] = hit[sha]
                return hit[sha], True
        assert work.vision is not None
        answer = self.provider.answer(work.vision, self.question)
        # Cleaned before it is cached: whatever the provider, no NUL or lone surrogate reaches
        # the cache insert, and a caption of invisible characters is no caption.
        captions = {code: clean_caption(text) for code, text in answer.captions.items()}
        if not all(captions.values()) or not captions:
            raise unusable_answer("")
        answer = replace(answer, captions=captions)
        if self.cache is not None:
            # Keyed by the format the answer was actually given in (the run may have stepped
            # down while it was asked).
            self.cache.cache_answer(
                sha,
                answer,
                model=self.provider.model_label,
                prompt_version=self.prompt_version,
                languages=self.question.languages,
            )
        with self._lock:
            self._known[(sha, answer.answer_format)] = answer
        return answer, False
