"""What every model provider shares: the ``Provider`` protocol, usage counts, the error classes
and the one retry loop that online calls and Batch API calls both go through."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import tenacity

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.structured import Answer, Question
from enrich_pipeline.redaction import scrub_secrets

T = TypeVar("T")


# What a failed call says about whose problem it is (``ProviderError.scope``):
#   "row"      the request of this one row (moderation, an image the model cannot use, a paid
#              answer without a caption: see answers.py);
#   "throttle" the account's quota (429): never the row's;
#   "service"  the provider itself (5xx, timeout, connection, unreadable answer): the row's only
#              if the provider is otherwise answering (most other calls succeed).
SCOPE_ROW = "row"
SCOPE_THROTTLE = "throttle"
SCOPE_SERVICE = "service"


class ProviderError(Exception):
    """One call failed. ``permanent`` errors are recorded and never retried; ``scope`` says
    whether the row, the quota or the service is at fault; ``kind`` which model was called
    ("vision" or "embedding"). The message is scrubbed of every known secret: it may quote the
    provider, and it goes to reports, the failure ledger, logs and Dagster's events."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        permanent: bool,
        scope: str = SCOPE_ROW,
        kind: str = "vision",
        status: int | None = None,
    ) -> None:
        super().__init__(scrub_secrets(message))
        self.code = code
        self.permanent = permanent
        self.scope = scope
        self.kind = kind
        self.status = status  # the HTTP status of the provider's answer, when there was one


class FatalProviderError(ProviderError):
    """The whole run must stop: a problem of the account, the key, the model or the request
    itself fails every row alike. No row is charged; the claims are released.

    ``stats`` is filled by the engine with what the run did before it stopped (the report
    prints it)."""

    def __init__(self, code: str, message: str, *, kind: str = "vision") -> None:
        super().__init__(code, message, permanent=True, kind=kind)
        self.stats: Any = None
        # The error of the row whose call met the stop, when that row is charged all the same
        # (its paid answers were unusable): see ``row_stop``.
        self.row_error: ProviderError | None = None


def row_stop(stop: FatalProviderError, error: ProviderError) -> FatalProviderError:
    """The run's stop, as raised by one row's call that is that row's ``error`` too."""
    again = type(stop)(stop.code, str(stop), kind=stop.kind)
    again.row_error = error
    return again


class ProviderUnavailable(FatalProviderError):
    """The run gave up on the provider: throttled, unreachable or failing on call after call
    past the retries. Not any row's fault: no row is charged, the claims are released, and a
    later run simply tries again (the command line exits 4, not 3)."""


@dataclass
class Usage:
    """Token and call counts, safe to update from worker threads."""

    # Calls answered; failed calls (errors, timeouts, refused connections) are counted apart,
    # so that calls made = answered + failed.
    vision_calls: int = 0
    embedding_calls: int = 0
    failed_vision_calls: int = 0
    failed_embedding_calls: int = 0
    # Image vectors (ENRICH_IMAGE_EMBEDDING_MODEL, ``multimodal.py``): calls answered and failed,
    # and the input tokens they billed, images and texts apart (priced apart).
    image_embedding_calls: int = 0
    failed_image_embedding_calls: int = 0
    image_embedding_tokens: int = 0
    image_embedding_text_tokens: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    image_tokens: int = 0
    # Calls whose answer gave no believable token count (``answers.read_usage``): their tokens
    # are unknown, so the token totals (and any cost) are a floor.
    unknown_token_calls: int = 0
    # Times the run's answer format stepped down (refused, or malformed answers in a row).
    format_step_downs: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def total_tokens(self) -> int:
        return (
            self.prompt_tokens
            + self.completion_tokens
            + self.embedding_tokens
            + self.image_embedding_tokens
            + self.image_embedding_text_tokens
        )

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "vision_calls": self.vision_calls,
                "embedding_calls": self.embedding_calls,
                "failed_vision_calls": self.failed_vision_calls,
                "failed_embedding_calls": self.failed_embedding_calls,
                "image_embedding_calls": self.image_embedding_calls,
                "failed_image_embedding_calls": self.failed_image_embedding_calls,
                "image_embedding_tokens": self.image_embedding_tokens,
                "image_embedding_text_tokens": self.image_embedding_text_tokens,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "embedding_tokens": self.embedding_tokens,
                "image_tokens": self.image_tokens,
                "total_tokens": self.total_tokens,
                "unknown_token_calls": self.unknown_token_calls,
                "format_step_downs": self.format_step_downs,
            }


class Provider(Protocol):
    """What the pipeline needs from a model provider; DashScope and the offline one fit."""

    model_label: str
    # The model that makes this provider's vectors, stored with each one: search compares only
    # vectors of one model (and length), so offline vectors never meet a real model's.
    embedding_model: str
    offline: bool
    usage: Usage
    # The format the next answer is asked in ("json_schema", "json_object" or "text"): the
    # answer cache's key follows it when a run steps down.
    answer_format: str

    def answer(self, image: VisionImage, question: Question) -> Answer: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    # Image vectors (ENRICH_IMAGE_EMBEDDING_MODEL): the model and length stored with each one,
    # both None when images are not embedded. Texts embedded by ``embed_image_texts`` are in
    # the same space as the images (the query side of search by picture or by words).
    image_embedding_model: str | None
    image_embedding_dimensions: int | None

    def embed_images(self, images: Sequence[VisionImage]) -> list[list[float]]:
        """One vector per image, ``[]`` for one the model refused (that row gets no vector);
        a stop (``FatalProviderError``) or a service error past its retries is raised."""
        ...

    def embed_image_texts(self, texts: Sequence[str]) -> list[list[float]]: ...

    def close(self) -> None: ...


def usable_vector(vector: Sequence[float] | None, dimensions: int | None = None) -> bool:
    """A vector worth storing: not empty (a refusal), every component a finite number, and of
    ``dimensions`` components when given."""
    if not vector or (dimensions is not None and len(vector) != dimensions):
        return False
    return all(isinstance(v, int | float) and math.isfinite(v) for v in vector)


def row_at_fault(provider: object, kind: str = "vision", *, likely_row: bool = False) -> bool:
    """Whether a service error of one row (a 5xx or timeout that persisted through its retries)
    is that row's own, judged by the provider's other ``kind`` calls (``Governor.row_at_fault``).
    Providers that keep no such record (the offline one) say yes."""
    judge = getattr(provider, "row_at_fault", None)
    return True if judge is None else bool(judge(kind, likely_row=likely_row))


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After hint, in seconds, if it sent one."""
    cause = exc.__cause__ if isinstance(exc, ProviderError) else exc
    response = getattr(cause, "response", None)
    raw = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


class Backoff:
    """Exponential backoff with full jitter (AWS, "Exponential Backoff And Jitter"): the n-th
    retry sleeps ``uniform(0, min(maximum, initial * 2 ** (n - 1)))``. A Retry-After the server
    sends is not jittered: it is waited in full (up to ``maximum``).

    Full rather than equal jitter: retries of many calls refused together spread over the whole
    ceiling instead of its upper half, and no minimum is needed here, because a throttled or
    failing model is already paused for every call by the governor (``providers/health.py``)."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._uniform = uniform

    def ceiling(self, attempt: int) -> float:
        """The longest sleep after the ``attempt``-th failed try (1 for the first)."""
        return min(self.maximum, self.initial * 2 ** (attempt - 1))

    def __call__(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = retry_after(exc) if exc else None
        if hinted is not None:
            return min(hinted, self.maximum)
        return self._uniform(0.0, self.ceiling(state.attempt_number))


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and not exc.permanent


def with_retries(
    attempt: Callable[[], T],
    *,
    retries: int,
    backoff: Backoff,
    sleep: Callable[[float], None] = tenacity.nap.sleep,
    on_retry: Callable[[], None] | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or ``retries`` retries are spent.

    ``attempt`` raises classified errors (``ProviderError``); only transient ones are retried.
    The last error is raised as it is.
    """

    def count(_state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry()

    retrying: Any = tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=backoff,
        before_sleep=count,
        sleep=sleep,
        reraise=True,
    )
    return retrying(attempt)
