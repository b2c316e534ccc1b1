"""The DashScope client: Qwen-VL captions and text embeddings over the OpenAI-compatible API.

Every online call to the model provider goes through ``DashScopeProvider``: paced by the rate
limiter, classified by ``errors.classify``, retried by ``base.with_retries``. The ``openai``
SDK's own retries are switched off so that the policy here is the only one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import openai
import tenacity

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.text import clean_caption
from enrich_pipeline.providers.base import Backoff, ProviderError, Usage, with_retries
from enrich_pipeline.providers.errors import classify
from enrich_pipeline.providers.quota import RateBudget, SharedRateLimiter, pacer
from enrich_pipeline.providers.ratelimit import RateLimiter
from enrich_pipeline.providers.wire import caption_request_body, empty_caption
from enrich_pipeline.settings import DashScopeSettings

MAX_EMBEDDING_BATCH = 10  # DashScope rejects more inputs per embeddings request


def openai_client(settings: DashScopeSettings, **options: Any) -> openai.OpenAI:
    """The SDK client for these settings, without the SDK's own retries."""
    return openai.OpenAI(
        api_key=settings.api_key,
        base_url=settings.base_url,
        timeout=settings.timeout,
        max_retries=0,
        **options,
    )


class DashScopeProvider:
    """Qwen-VL captions and text embeddings over the OpenAI-compatible API."""

    offline = False

    def __init__(
        self,
        settings: DashScopeSettings,
        *,
        limiter: RateLimiter | SharedRateLimiter | None = None,
        sleep: Callable[[float], None] | None = None,
        budget: RateBudget | None = None,
    ) -> None:
        settings.require_key()
        self.settings = settings
        self.model_label = settings.vision_model
        self.usage = Usage()
        self._client = openai_client(settings)
        # DashScope's limits are per account and per model, per minute and per second: the
        # vision and the embedding model each get a budget, shared with every process on the
        # same database when `budget` is given (see providers/quota.py).
        self._budget = budget
        self._limiter = limiter or pacer(
            settings,
            settings.vision_model,
            settings.requests_per_minute,
            settings.tokens_per_minute,
            budget,
        )
        self._embedding_limiter = pacer(
            settings, settings.embedding_model, settings.embedding_requests_per_minute, 0, budget
        )
        self._sleep = sleep or tenacity.nap.sleep

    @property
    def limiters(self) -> tuple[RateLimiter | SharedRateLimiter, RateLimiter | SharedRateLimiter]:
        """The vision and the embedding model's limiters."""
        return self._limiter, self._embedding_limiter

    def close(self) -> None:
        self._client.close()
        if self._budget is not None:
            self._budget.close()

    def _call(
        self, fn: Callable[[], Any], limiter: RateLimiter | SharedRateLimiter, tokens: int = 0
    ) -> Any:
        def attempt() -> Any:
            limiter.acquire(tokens)
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - every SDK failure is classified below
                raise classify(exc) from exc

        return with_retries(
            attempt,
            retries=self.settings.max_retries,
            backoff=Backoff(self.settings.backoff_initial, self.settings.backoff_max),
            sleep=self._sleep,
            on_retry=lambda: self.usage.add(retries=1),
        )

    def caption(self, image: VisionImage) -> str:
        def request() -> str:
            response = self._client.chat.completions.create(
                **caption_request_body(self.settings, image.data_url)
            )
            if not isinstance(getattr(response, "choices", None), list):
                raise ValueError("the response has no choices")
            usage = response.usage
            self.usage.add(
                vision_calls=1,
                image_tokens=image.tokens,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            )
            text = clean_caption(response.choices[0].message.content if response.choices else "")
            if not text:
                raise empty_caption()
            return text

        return self._call(
            request, self._limiter, tokens=image.tokens + self.settings.max_caption_tokens
        )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), MAX_EMBEDDING_BATCH):
            batch = list(texts[start : start + MAX_EMBEDDING_BATCH])
            vectors.extend(
                self._call(lambda b=batch: self._embed_batch(b), self._embedding_limiter)
            )
        return vectors

    def _embed_batch(self, batch: list[str]) -> list[list[float]]:
        response = self._client.embeddings.create(
            model=self.settings.embedding_model,
            input=batch,
            dimensions=self.settings.embedding_dimensions,
            encoding_format="float",
        )
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(batch):
            raise ValueError(f"asked for {len(batch)} embeddings, got {len(data)}")
        vectors = [list(d.embedding) for d in data]
        dims = self.settings.embedding_dimensions
        if any(len(v) != dims for v in vectors):
            raise ProviderError(
                "bad_dimensions",
                f"the embedding model did not return {dims}-dim vectors",
                permanent=True,
            )
        self.usage.add(
            embedding_calls=1,
            embedding_tokens=response.usage.total_tokens if response.usage else 0,
        )
        return vectors
