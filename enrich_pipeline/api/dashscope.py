"""The DashScope client and its policy: retries, rate limits, error classes, token usage.

Every call to the model provider goes through ``DashScopeProvider``; this module is the one place
that decides what is retried, what is permanent and what stops a run. The ``openai`` SDK's own
retries are switched off so that the policy here is the only one.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai
import tenacity

from enrich_pipeline.api.ratelimit import RateLimiter
from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.settings import DashScopeSettings

MAX_EMBEDDING_BATCH = 10  # DashScope rejects more inputs per embeddings request


class ProviderError(Exception):
    """One call failed. ``permanent`` errors are recorded and never retried."""

    def __init__(self, code: str, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.code = code
        self.permanent = permanent


class FatalProviderError(ProviderError):
    """The whole run must stop: a bad key or a missing model fails every item the same way."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, permanent=True)


@dataclass
class Usage:
    """Token and call counts, safe to update from worker threads."""

    vision_calls: int = 0
    embedding_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    image_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens + self.embedding_tokens

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "vision_calls": self.vision_calls,
                "embedding_calls": self.embedding_calls,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "embedding_tokens": self.embedding_tokens,
                "image_tokens": self.image_tokens,
                "total_tokens": self.total_tokens,
            }


class Provider(Protocol):
    """What the pipeline needs from a model provider; DashScope and the offline one fit."""

    model_label: str
    offline: bool
    usage: Usage

    def caption(self, image: VisionImage) -> str: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = error.get("code") if isinstance(error, dict) else None
    return str(code or getattr(exc, "code", None) or "").lower()


def classify(exc: BaseException) -> ProviderError:
    """Map an SDK exception to the pipeline's error classes (the retry policy in one table)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return FatalProviderError(
            "invalid_api_key",
            f"DashScope rejected the API key (HTTP {exc.status_code}): check DASHSCOPE_API_KEY",
        )
    if isinstance(exc, openai.NotFoundError):
        return FatalProviderError("not_found", f"DashScope answered 404: {exc.message}")
    if isinstance(exc, openai.BadRequestError):
        code = _error_code(exc)
        if "inspection" in code:
            return ProviderError(
                "moderation", f"rejected by content moderation: {exc.message}", permanent=True
            )
        if "invalid_parameter" in code or "invalidparameter" in code:
            return ProviderError(
                "bad_image", f"the model could not use the image: {exc.message}", permanent=True
            )
        return ProviderError(
            "bad_request", f"DashScope answered 400: {exc.message}", permanent=True
        )
    if isinstance(exc, openai.RateLimitError):
        return ProviderError("rate_limited", "DashScope rate limit (429)", permanent=False)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("timeout", "DashScope call timed out", permanent=False)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(
            "connection", f"connection to DashScope failed: {exc}", permanent=False
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return ProviderError(
            "server_error" if status >= 500 else f"http_{status}",
            f"DashScope answered HTTP {status}",
            permanent=status < 500 and status not in (408, 409),
        )
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        # A 200 whose body is not the JSON promised: a proxy or overloaded gateway, try again.
        return ProviderError(
            "malformed_response", f"unreadable DashScope answer: {exc}", permanent=False
        )
    return ProviderError("unexpected", f"{type(exc).__name__}: {exc}", permanent=False)


def _retry_after(exc: BaseException) -> float | None:
    cause = exc.__cause__ if isinstance(exc, ProviderError) else exc
    response = getattr(cause, "response", None)
    raw = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


class Backoff:
    """Exponential backoff with full jitter, overridden by a Retry-After the server sends."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum

    def __call__(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = _retry_after(exc) if exc else None
        if hinted is not None:
            return min(hinted, self.maximum)
        ceiling = min(self.maximum, self.initial * 2 ** (state.attempt_number - 1))
        return random.uniform(ceiling / 2, ceiling)


def caption_request_body(settings: DashScopeSettings, data_url: str) -> dict[str, Any]:
    """The chat request of one caption, the same online and in a batch line."""
    return {
        "model": settings.vision_model,
        "max_tokens": settings.max_caption_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": settings.prompt},
                ],
            }
        ],
    }


class DashScopeProvider:
    """Qwen-VL captions and text embeddings over the OpenAI-compatible API."""

    offline = False

    def __init__(
        self,
        settings: DashScopeSettings,
        *,
        limiter: RateLimiter | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        settings.require_key()
        self.settings = settings
        self.model_label = settings.vision_model
        self.usage = Usage()
        self._client = openai.OpenAI(
            api_key=settings.api_key,
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_retries=0,
        )
        # DashScope's limits are per model: the vision and the embedding model each get a budget.
        self._limiter = limiter or RateLimiter(
            settings.requests_per_minute, settings.tokens_per_minute
        )
        self._embedding_limiter = RateLimiter(settings.embedding_requests_per_minute)
        self._sleep = sleep or tenacity.nap.sleep

    def _call(self, fn: Callable[[], Any], limiter: RateLimiter, tokens: int = 0) -> Any:
        def attempt() -> Any:
            limiter.acquire(tokens)
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - every SDK failure is classified below
                raise classify(exc) from exc

        def count_retry(state: tenacity.RetryCallState) -> None:
            self.usage.add(retries=1)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, ProviderError) and not e.permanent
            ),
            stop=tenacity.stop_after_attempt(self.settings.max_retries + 1),
            wait=Backoff(self.settings.backoff_initial, self.settings.backoff_max),
            before_sleep=count_retry,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(attempt)

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
            text = (response.choices[0].message.content or "").strip() if response.choices else ""
            if not text:
                # Seen from overloaded gateways; a second try usually answers properly.
                raise ProviderError(
                    "empty_caption", "the model returned an empty caption", permanent=False
                )
            return " ".join(text.split())

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
