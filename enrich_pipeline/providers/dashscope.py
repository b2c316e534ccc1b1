"""The DashScope client: Qwen-VL answers (captions and tags, ``enrichment/structured.py``) and
text embeddings over the OpenAI-compatible API; image vectors over the native multimodal
embedding API (``multimodal.py``).

Every online call to the model provider goes through ``DashScopeProvider``: admitted by the
model's ``health.Governor`` (fewer calls in flight and a shared pause when the provider
struggles, the run's stop once it gives up), paced by the rate limiter, bounded by a total
deadline, classified by ``errors.classify``, retried by ``base.with_retries``. The ``openai``
SDK's own retries are switched off so that the policy here is the only one.

The total deadline: the SDK's ``timeout`` bounds each read, so a server that answers one byte a
second keeps a call open forever. Each call runs under a watchdog that gives up after
``DASHSCOPE_TIMEOUT`` seconds in all (a transient ``timeout``), and the HTTP client ends the
abandoned response at the first piece past that deadline, dropping its connection; answers are
also read within ``DASHSCOPE_MAX_ANSWER_BYTES`` (``transport``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import openai

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.structured import Answer, MalformedAnswer, Question, read_answer
from enrich_pipeline.enrichment.text import clean_caption
from enrich_pipeline.providers import multimodal
from enrich_pipeline.providers.answers import (
    UNUSABLE_STOP,
    UnusableStreak,
    answer_text,
    is_malformed,
    is_unusable,
    malformed_answer,
    read_usage,
    unusable_answer,
)
from enrich_pipeline.providers.base import (
    SCOPE_SERVICE,
    Backoff,
    FatalProviderError,
    ProviderError,
    Usage,
    retry_after,
    row_stop,
    usable_vector,
    with_retries,
)
from enrich_pipeline.providers.errors import (
    FORMAT_REFUSED,
    IMAGE_EMBEDDING,
    CallContext,
    classify,
)
from enrich_pipeline.providers.formats import FormatLadder, first_format
from enrich_pipeline.providers.health import Governor, StopLatch
from enrich_pipeline.providers.quota import RateBudget, SharedRateLimiter, pacer
from enrich_pipeline.providers.ratelimit import RateLimiter
from enrich_pipeline.providers.transport import ForeignAnswer, http_client
from enrich_pipeline.providers.wire import (
    answer_max_tokens,
    caption_request_body,
    question_of,
    sdk_arguments,
)
from enrich_pipeline.redaction import HTTP_LOGGERS, hide_in_logs
from enrich_pipeline.settings import DashScopeSettings
from enrich_pipeline.settings.image_models import image_model

MAX_EMBEDDING_BATCH = 10  # DashScope rejects more inputs per embeddings request


def openai_client(settings: DashScopeSettings, **options: Any) -> openai.OpenAI:
    """The SDK client for these settings, without the SDK's own retries.

    Every client is made here, so the key and the base URL's credentials are hidden in the
    HTTP client's log lines (which show request URLs) before its first request."""
    hide_in_logs(settings.secrets(), HTTP_LOGGERS)
    options.setdefault("http_client", http_client(settings.timeout, settings.max_answer_bytes))
    return openai.OpenAI(
        api_key=settings.api_key.get_secret_value(),
        base_url=settings.url,
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
        self.embedding_model = settings.embedding_model
        self._image_model = image_model(settings.image_embedding_model)
        self.image_embedding_model = self._image_model.name if self._image_model else None
        self.image_embedding_dimensions = (
            settings.image_embedding_dimensions if self._image_model else None
        )
        self._native_url = multimodal.native_url(settings.url)
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
        self._image_limiter = pacer(
            settings,
            settings.image_embedding_model or "-",
            settings.image_embedding_requests_per_minute if self._image_model else 0,
            0,
            budget,
        )
        self._stop = StopLatch()
        self._unusable = UnusableStreak(settings.unusable_stop)
        # The run's answer format (ENRICH_ANSWER_FORMAT, else what the model's documentation
        # lists), stepped down when the model refuses it or keeps answering it malformed.
        self.formats = FormatLadder(
            first_format(settings.answer_format, settings.vision_model, settings.url),
            settings.vision_model,
            on_step=lambda: self.usage.add(format_step_downs=1),
        )
        kinds = ("vision", "embedding", IMAGE_EMBEDDING)
        self._contexts = {k: CallContext.of(settings, k) for k in kinds}
        self.governors = {
            kind: Governor(
                ctx,
                backoff_initial=settings.backoff_initial,
                backoff_max=settings.backoff_max,
                stop=self._stop,
            )
            for kind, ctx in self._contexts.items()
        }
        # A sleep given by a caller (tests record the backoffs) is used as is; the default one
        # ends early when the run stops, so that a stop does not wait out a 30 s backoff.
        self._sleep = sleep or self._stop.wait

    @property
    def limiters(self) -> tuple[RateLimiter | SharedRateLimiter, RateLimiter | SharedRateLimiter]:
        """The vision and the embedding model's limiters."""
        return self._limiter, self._embedding_limiter

    def close(self) -> None:
        self._client.close()
        if self._budget is not None:
            self._budget.close()

    @property
    def stopped(self) -> FatalProviderError | None:
        """The error the provider stopped the run with, if it did."""
        return self._stop.error

    def row_at_fault(self, kind: str = "vision", *, likely_row: bool = False) -> bool:
        """Whether one row's persistent service error is the row's (``Governor.row_at_fault``)."""
        return self.governors[kind].row_at_fault(likely_row=likely_row)

    def begin_run(self) -> None:
        """A new run on this provider: the last run's stop and give-up count are forgotten."""
        self._stop.reset()
        self._unusable.reset()
        self.formats.reset()
        for governor in self.governors.values():
            governor.begin_run()

    def _within_deadline(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` under a watchdog: a transient timeout after ``DASHSCOPE_TIMEOUT`` seconds in
        all, however the server dribbles its answer. The abandoned call ends by itself at the
        first piece past its deadline (``transport``) and its result is dropped."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="dashscope-call", daemon=True).start()
        if not done.wait(self.settings.timeout):
            raise ProviderError(
                "timeout",
                f"DashScope did not answer in time (DASHSCOPE_TIMEOUT={self.settings.timeout:g}"
                " s in total)",
                permanent=False,
                scope=SCOPE_SERVICE,
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _call(
        self,
        fn: Callable[[], Any],
        kind: str,
        limiter: RateLimiter | SharedRateLimiter,
        tokens: int = 0,
    ) -> Any:
        governor, ctx = self.governors[kind], self._contexts[kind]
        tries = 0

        def attempt() -> Any:
            nonlocal tries
            with governor.slot():
                limiter.acquire(tokens)
                self._stop.check()
                tries += 1
                try:
                    result = self._within_deadline(fn)
                except Exception as exc:  # noqa: BLE001 - every SDK failure is classified here
                    error = classify(exc, ctx, endpoint_proven=governor.answered)
                    error.kind = kind
                    self.usage.add(**{f"failed_{kind}_calls": 1})
                    if isinstance(error, FatalProviderError):
                        raise self._stop.set(error) from exc
                    governor.attempt_failed(error, retry_after(error), tries)
                    raise error from exc
                governor.attempt_ok()
                return result

        try:
            result = with_retries(
                attempt,
                retries=self.settings.max_retries,
                backoff=Backoff(self.settings.backoff_initial, self.settings.backoff_max),
                sleep=self._sleep,
                on_retry=lambda: self.usage.add(retries=1),
            )
        except ProviderError as error:
            final = governor.call_failed(error, tries)
            if final is error:
                raise
            raise final from error
        governor.call_ok()
        return result

    @property
    def answer_format(self) -> str:
        """The format the next answer is asked in (the answer cache's key follows it)."""
        return self.formats.current

    def caption(self, image: VisionImage) -> str:
        """The image's caption alone, asked as the settings' question (default vocabulary)."""
        return self.answer(image, question_of(self.settings)).caption

    def answer(self, image: VisionImage, question: Question) -> Answer:
        """The image's answer in the run's format. A refusal of the format (the model does not
        take that response_format) steps the run down one format and asks again in the same
        call: no row is charged for it (``formats.FormatLadder``)."""
        while True:
            answer_format = self.formats.current
            try:
                return self._answer_in(image, question, answer_format)
            except ProviderError as exc:
                if exc.code == FORMAT_REFUSED and self.formats.refused(answer_format, str(exc)):
                    continue
                raise

    def _answer_in(self, image: VisionImage, question: Question, first: str) -> Answer:
        """The answer, asked in ``first`` and, once the run steps down (a streak of malformed
        answers), in the format below. A paid answer without a caption (blank, no readable
        message) or not of the asked shape (malformed) is retried within the call like a
        transient error, then raised as the row's error; its tokens are counted either way.
        Answers without a caption for several images in a row stop the run
        (``answers.UnusableStreak``)."""
        paid_unusable = 0
        asked = {"format": first}

        def request() -> str | None:
            body = caption_request_body(self.settings, image.data_url, question, asked["format"])
            response = self._client.chat.completions.create(**sdk_arguments(body))
            text = answer_text(response)  # ForeignAnswer: not a completion (the service's failure)
            # Billed whatever the answer: counted before it is judged, however odd the counts.
            self._count_tokens(
                getattr(response, "usage", None), ("prompt_tokens", "completion_tokens")
            )
            self.usage.add(image_tokens=image.tokens)
            return text

        def attempt() -> Answer:
            nonlocal paid_unusable
            # A retry after a step-down asks in the lower format; a refusal is the caller's.
            answer_format = asked["format"] = self.formats.current
            tokens = answer_max_tokens(self.settings, answer_format, len(question.languages))
            text = self._call(request, "vision", self._limiter, tokens=image.tokens + tokens)
            if text and clean_caption(text):
                try:
                    answer = read_answer(text, answer_format, question.languages)
                except MalformedAnswer as exc:
                    self.usage.add(failed_vision_calls=1)
                    self.formats.malformed(answer_format, image.data_url)
                    raise malformed_answer(exc) from None
                self._unusable.usable()
                self.formats.wellformed()
                self.usage.add(vision_calls=1)
                return answer
            paid_unusable += 1
            self.usage.add(failed_vision_calls=1)
            error = unusable_answer(None if text is None else "")
            streak = self._unusable.note(image.data_url)
            if streak is not None:
                self._stop.set(self._unusable_stop(*streak, error))
            raise error

        try:
            return with_retries(
                attempt,
                retries=self.settings.max_retries,
                backoff=Backoff(self.settings.backoff_initial, self.settings.backoff_max),
                sleep=self._sleep,
                on_retry=lambda: self.usage.add(retries=1),
                transient=lambda exc: (
                    (is_unusable(exc) or is_malformed(exc)) and self._stop.error is None
                ),
            )
        except ProviderError as exc:
            stop = self._stop.error
            if paid_unusable and stop is not None and stop.code == UNUSABLE_STOP:
                # This row's answers were paid and unusable: its own error travels with the
                # stop, so that the row is charged when the stopped chunk is given back.
                raise row_stop(stop, unusable_answer("")) from exc
            raise

    def _unusable_stop(self, answers: int, images: int, last: ProviderError) -> FatalProviderError:
        ctx = self._contexts["vision"]
        return FatalProviderError(
            UNUSABLE_STOP,
            f"{ctx.the_model} at {ctx.where} answered {answers} paid calls in a row, for "
            f"{images} images, without a usable caption (the last: {last}): the model or the "
            "prompt is the problem, not the images; the rows that got such answers are charged "
            "an attempt, the others are left pending (DASHSCOPE_UNUSABLE_STOP="
            f"{self.settings.unusable_stop})",
        )

    def _count_tokens(self, usage: object, names: tuple[str, ...]) -> None:
        """Count what ``usage`` says, once checked; a call whose counts cannot be believed is
        counted as one with unknown tokens (``answers.read_usage``)."""
        counts, known = read_usage(usage, names)
        self.usage.add(**counts, unknown_token_calls=0 if known else 1)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text; a vector that is not finite or not of the configured length is
        refused on its own and returned as ``[]`` (that row is written without a vector)."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), MAX_EMBEDDING_BATCH):
            batch = list(texts[start : start + MAX_EMBEDDING_BATCH])
            limiter = self._embedding_limiter
            vectors.extend(self._call(lambda b=batch: self._embed_batch(b), "embedding", limiter))
        return vectors

    def _embed_batch(self, batch: list[str]) -> list[list[float]]:
        response = self._client.embeddings.create(
            model=self.settings.embedding_model,
            input=batch,
            dimensions=self.settings.embedding_dimensions,
            encoding_format="float",
        )
        if not isinstance(getattr(response, "data", None), list):
            raise ForeignAnswer("HTTP 200: the answer has no data, not an embeddings list")
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(batch):
            raise ValueError(f"asked for {len(batch)} embeddings, got {len(data)}")
        usage = getattr(response, "usage", None)
        counts, known = read_usage(usage, ("total_tokens",))
        self.usage.add(
            embedding_calls=1,
            embedding_tokens=counts.get("total_tokens", 0),
            unknown_token_calls=0 if known else 1,
        )
        dims = self.settings.embedding_dimensions
        return [list(d.embedding) if usable_vector(d.embedding, dims) else [] for d in data]

    def embed_images(self, images: Sequence[VisionImage]) -> list[list[float]]:
        """One vector per image by the image model, ``[]`` for an image refused as its own
        (``multimodal.embed_images``); nothing is called when no image model is set."""
        if self._image_model is None:
            return [[] for _ in images]
        return multimodal.embed_images(images, self._image_model, self._multimodal_call)

    def embed_image_texts(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text by the image model, in the images' space."""
        if self._image_model is None:
            raise ValueError("no image embedding model is set (ENRICH_IMAGE_EMBEDDING_MODEL)")
        return multimodal.embed_texts(texts, self._image_model, self._multimodal_call)

    def _multimodal_call(self, contents: list[dict[str, str]]) -> list[list[float]]:
        model = self._image_model
        assert model is not None and self.image_embedding_dimensions is not None
        dims = self.image_embedding_dimensions
        body = multimodal.request_body(model, dims, contents)

        def request() -> list[list[float]]:
            # The SDK's own request path: its HTTP client (size cap, total deadline) and its
            # status errors, which ``errors.classify`` reads (the native body's ``code`` and
            # ``message`` sit where compatible mode's ``error`` object would).
            answer = self._client.post(self._native_url, body=body, cast_to=object)
            return multimodal.read_answer(answer, len(contents), dims, self.usage)

        return self._call(request, IMAGE_EMBEDDING, self._image_limiter)
