"""DashScope's Batch API (files and batches) under the project's API policy.

The same error classes, backoff and retry loop as the online calls (``base.with_retries``); what
a final 4xx means here (model or region without batch support, a refused batch) is decided per
call.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import openai

from enrich_pipeline.providers.base import Backoff, ProviderError, with_retries
from enrich_pipeline.providers.dashscope import openai_client
from enrich_pipeline.providers.errors import classify
from enrich_pipeline.providers.regions import BEIJING, SINGAPORE, region_of
from enrich_pipeline.providers.transport import bounded_lines
from enrich_pipeline.providers.wire import CHAT_ENDPOINT
from enrich_pipeline.redaction import scrub_exception, scrub_secrets
from enrich_pipeline.settings import ConfigError, DashScopeSettings

COMPLETION_WINDOW = "24h"
UPLOAD_TIMEOUT = 600.0

# Which models the Batch API takes, by region (Model Studio, "Batch interfaces compatible with
# OpenAI", https://www.alibabacloud.com/help/en/model-studio/batch-interfaces-compatible-with-
# openai, Jan 2026): "Mainland China ... Multimodal models: Stable and some latest versions of
# Qwen-VL-Max, Qwen-VL-Plus, and Qwen-VL-Flash. Also Qwen-OCR. Text embedding models:
# text-embedding-v4"; "International ... Singapore region ... Supported models: qwen-max,
# qwen-plus, qwen-flash, and qwen-turbo". The newer zh page adds qwen3-vl-plus and
# qwen3-vl-flash (https://help.aliyun.com/zh/model-studio/batch-interfaces-compatible-with-openai).
# Captions need a vision model, so Singapore has no caption batches at all. Other regions (US,
# Hong Kong, ...) are not documented for batch. Any other server (a local one, the stand-in)
# decides for itself. Dated snapshots of a listed family are left to the service to judge.
TEST_MODEL = "batch-test-model"
"""DashScope's free end-to-end test model: no inference, no charge; at most 100 lines and 1 MB
per file, 2 batches at once; its lines go to ``/v1/chat/ds-test``
(https://help.aliyun.com/document_detail/2975721.html)."""
TEST_ENDPOINT = "/v1/chat/ds-test"
TEST_MAX_LINES = 100
TEST_MAX_BYTES = 1024 * 1024
_TEXT_MODELS = ("qwen-max", "qwen-plus", "qwen-flash", "qwen-turbo")
BATCH_MODELS: dict[str, tuple[str, ...]] = {
    BEIJING: (
        "qwen3-vl-plus",
        "qwen3-vl-flash",
        "qwen-vl-max",
        "qwen-vl-plus",
        "qwen-vl-flash",
        "qwen-vl-ocr",
        "text-embedding-v4",
        "text-embedding-v3",
        *_TEXT_MODELS,
        TEST_MODEL,
    ),
    SINGAPORE: (*_TEXT_MODELS, TEST_MODEL),
}
_MATRIX = "Beijing: Qwen-VL-Max/Plus/Flash, qwen3-vl-plus/flash, text-embedding-v4; Singapore: "
_MATRIX += "text models only (qwen-max, qwen-plus, qwen-flash, qwen-turbo)"


def _listed(model: str, families: tuple[str, ...]) -> bool:
    name = model.strip().lower()
    return any(name == f or name.startswith(f + "-") for f in families)


def batch_refusal(settings: DashScopeSettings) -> str | None:
    """Why the Batch API will not take ``settings``' vision model in its region, in one line;
    None when it does, or when the base URL is no known Model Studio region."""
    region = region_of(settings.url)
    if region is None:
        return None
    model = settings.vision_model
    families = BATCH_MODELS.get(region)
    if families is None:
        return (
            f"DashScope's Batch API is not offered in the {region} region "
            f"({settings.base_url_shown}): {_MATRIX}. Use the online path (enrich-captions) or a "
            "Beijing base URL"
        )
    if _listed(model, families):
        return None
    return (
        f"DashScope's Batch API in {region.capitalize()} does not take model {model!r} "
        f"({_MATRIX}): choose another DASHSCOPE_VISION_MODEL or DASHSCOPE_BASE_URL, or use the "
        "online path (enrich-captions)"
    )


def batch_endpoint(model: str) -> str:
    """The endpoint a batch of ``model``'s caption lines is sent to."""
    return TEST_ENDPOINT if model == TEST_MODEL else CHAT_ENDPOINT


class BatchError(Exception):
    """A batch could not be submitted, polled or collected; the message says why, scrubbed of
    every known secret (it may quote the provider)."""

    def __init__(self, message: str) -> None:
        super().__init__(scrub_secrets(message))


class BatchUnsupported(BatchError):
    """The Batch API is not offered for this model, or not at this base URL (region/server)."""


class BatchRejected(BatchError):
    """The Batch API refused a batch for another reason (its message is kept)."""


class BatchNotReady(BatchError):
    """Collect was asked for a batch the provider is still working on."""


def unsupported_message(model: str, base_url: str, detail: str) -> str:
    return (
        f"DashScope's Batch API does not take model {model!r} at {base_url} ({detail}). "
        "Batch inference is offered only for some models and regions (Singapore: qwen-max, "
        "qwen-plus, qwen-flash, qwen-turbo; Beijing: also Qwen-VL-Max/Plus/Flash and "
        "text-embedding-v4), and not by every OpenAI-compatible server: choose a supported "
        "model (DASHSCOPE_VISION_MODEL) or region (DASHSCOPE_BASE_URL), or use the online "
        "path (enrich-captions)"
    )


class BatchApi:
    """Files and batches over the OpenAI-compatible API, with the provider's retry policy:
    transient failures (429, 5xx, timeouts, resets; ``classify`` decides) are retried with the
    same backoff as online calls; what a final 4xx means is decided per call."""

    def __init__(self, settings: DashScopeSettings, *, client: openai.OpenAI | None = None) -> None:
        if settings.offline:
            raise ConfigError(
                "batch mode needs DashScope: the offline provider has no Batch API "
                "(unset ENRICH_OFFLINE / drop --offline and set DASHSCOPE_API_KEY)"
            )
        settings.require_key()
        self.settings = settings
        self.base_url = settings.base_url_shown  # for messages
        self._client = client or openai_client(settings)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with retries. A final HTTP error status is raised as the SDK exception
        (the caller maps it); every other failure as ``classify`` maps it."""

        def attempt() -> Any:
            try:
                return fn()
            except openai.APIStatusError as exc:
                scrub_exception(exc)  # the caller quotes it, and keeps it as a cause
                raise
            except Exception as exc:  # noqa: BLE001 - every other SDK failure is classified
                raise classify(exc) from exc

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, openai.APIStatusError):
                return not classify(exc).permanent
            return isinstance(exc, ProviderError) and not exc.permanent

        return with_retries(
            attempt,
            retries=self.settings.max_retries,
            backoff=Backoff(self.settings.backoff_initial, self.settings.backoff_max),
            transient=transient,
        )

    def _unsupported(self, exc: openai.APIStatusError, where: str) -> BatchUnsupported:
        code = str(getattr(exc, "code", None) or "")
        detail = f"HTTP {exc.status_code}{' ' + code if code else ''} on {where}: {exc.message}"
        return BatchUnsupported(
            unsupported_message(self.settings.vision_model, self.base_url, detail)
        )

    def upload(self, path: Path, filename: str) -> Any:
        def send() -> Any:
            with path.open("rb") as fh:
                return self._client.files.create(
                    file=(filename, fh, "application/jsonl"),
                    purpose="batch",
                    timeout=max(self.settings.timeout, UPLOAD_TIMEOUT),
                )

        try:
            return self._call(send)
        except openai.APIStatusError as exc:
            if exc.status_code in (404, 405, 501):  # no Files API at this base URL
                raise self._unsupported(exc, "/files") from exc
            raise classify(exc) from exc

    def create(self, input_file_id: str, *, metadata: dict[str, str]) -> Any:
        def send() -> Any:
            return self._client.batches.create(
                input_file_id=input_file_id,
                endpoint=batch_endpoint(self.settings.vision_model),
                completion_window=COMPLETION_WINDOW,
                metadata=metadata,
            )

        try:
            return self._call(send)
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403) or exc.status_code >= 500:
                raise classify(exc) from exc
            code = str(getattr(exc, "code", None) or "").lower()
            if (
                exc.status_code in (404, 405, 501)
                or "model" in code
                or "not supported" in str(exc.message).lower()
            ):
                raise self._unsupported(exc, "/batches") from exc
            raise BatchRejected(
                f"DashScope refused the batch for model {self.settings.vision_model!r} at "
                f"{self.base_url} (HTTP {exc.status_code} {code}: {exc.message})"
            ) from exc

    def retrieve(self, batch_id: str) -> Any:
        try:
            return self._call(lambda: self._client.batches.retrieve(batch_id))
        except openai.NotFoundError as exc:
            raise BatchError(f"batch {batch_id} is not known at {self.base_url}") from exc
        except openai.APIStatusError as exc:
            raise classify(exc) from exc

    def cancel(self, batch_id: str) -> Any:
        try:
            return self._call(lambda: self._client.batches.cancel(batch_id))
        except openai.APIStatusError as exc:
            raise classify(exc) from exc

    def content(self, file_id: str, *, max_lines: int) -> str:
        """A result file's text: streamed, at most ``max_lines`` lines (one per request of the
        batch), each line at most ``DASHSCOPE_MAX_ANSWER_BYTES`` (a longer one is skipped: its
        row is left without an answer, as if the provider had not sent one)."""

        def fetch() -> str:
            with self._client.files.with_streaming_response.content(
                file_id, timeout=max(self.settings.timeout, UPLOAD_TIMEOUT)
            ) as response:
                lines = bounded_lines(
                    response.iter_bytes(),
                    max_line_bytes=self.settings.max_answer_bytes,
                    max_lines=max_lines,
                )
            return "\n".join(lines)

        try:
            return self._call(fetch)
        except openai.APIStatusError as exc:
            raise classify(exc) from exc

    def find(self, local_id: str, *, since: datetime | None) -> Any | None:
        """The provider's batch created for ``local_id`` (sent as its metadata), if any."""
        oldest = (since.timestamp() - 3600) if since else 0

        def search() -> Any | None:
            for batch in self._client.batches.list(limit=100):  # newest first, paginated
                if (batch.metadata or {}).get("enrich_local_id") == local_id:
                    return batch
                if batch.created_at < oldest:
                    return None
            return None

        try:
            return self._call(search)
        except openai.APIStatusError as exc:
            raise classify(exc) from exc


class BatchApis:
    """One API client per base URL: a batch is polled where it was submitted."""

    def __init__(self, settings: DashScopeSettings) -> None:
        self.settings = settings
        self._apis: dict[str, BatchApi] = {}

    def get(self, base_url: str) -> BatchApi:
        if base_url not in self._apis:
            self._apis[base_url] = BatchApi(self.settings.with_(base_url=base_url))
        return self._apis[base_url]
