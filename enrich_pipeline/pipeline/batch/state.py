"""Batch mode's shared state handling: the provider's statuses, what an unanswered item is
recorded with, and ending a batch that will produce nothing.

Batch mode captions large backfills through DashScope's OpenAI-compatible Batch API: half the
price of online calls, results within DashScope's 24 h window. Three steps, each of which can
run in a different process, on a different day, because their state is in the database
(``db/batches.py``): ``submit.submit_batch``, ``poll.poll_batches``, ``collect.collect_batch``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from enrich_pipeline.db.store import Store
from enrich_pipeline.providers.batch_api import BatchApi
from enrich_pipeline.providers.dashscope import openai_client
from enrich_pipeline.redaction import redact_source
from enrich_pipeline.settings import DashScopeSettings

# A part still "submitting" after this long lost its submitter; the poll resolves it.
SUBMIT_GRACE_SECONDS = 3600
COLLECT_LEASE_SECONDS = 1800

ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

# What an item that got no answer line is recorded with, by the batch's final status.
NO_ANSWER = {
    "completed": ("batch_missing_result", "the batch completed without an answer for this item"),
    "expired": ("batch_expired", "the batch expired (24 h window) before this item was done"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this item was done"),
    "failed": ("batch_failed", "the batch failed"),
}


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def give_back(store: Store, local_id: str, state: str, why: BaseException | str) -> int:
    """End a batch that will produce nothing: its rows' claims released, no ledger entry."""
    record = store.batches.get(local_id)
    if record is None:
        return 0
    ids = store.batches.held_ids(local_id)
    if ids:
        store.items.release(record.user_id, ids, worker=record.worker)
    store.batches.update(
        local_id,
        state=state,
        error=str(why)[:2000],
        finished_at=now(),
        collector=None,
        collector_expires_at=None,
    )
    return len(ids)


def batch_fields(batch: Any) -> dict[str, Any]:
    """The columns a provider batch object fills in."""
    counts = getattr(batch, "request_counts", None)
    errors = getattr(batch, "errors", None)
    messages = [
        f"{e.code or 'error'}: {e.message or ''}".strip()
        for e in (getattr(errors, "data", None) or [])
    ]
    return {
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "request_counts": counts.model_dump() if counts is not None else None,
        # The provider's errors (validation); a successful poll clears an earlier poll error.
        "error": "; ".join(messages)[:2000] or None,
    }


# ---------------------------------------------------------------------------------------------
# Base URLs: stored without credentials, polled with the configured ones


def batch_api(settings: DashScopeSettings, base_url: str | None = None) -> BatchApi:
    """The Batch API at ``base_url`` (default: the configured one) with these settings' key.

    A base URL may carry credentials (``https://user:password@gateway/v1``, ``?api-key=``).
    The client gets the URL as it is; the API object's messages, which end up on the terminal,
    in ``enrich_batches.error`` and in Dagster's event log, name it redacted
    (``base_url_shown``); and the credentials are known secrets from the moment the client is
    made (``openai_client``), so no log line or message shows them.
    """
    real = settings if base_url in (None, settings.url) else settings.with_(base_url=base_url)
    return BatchApi(real, client=openai_client(real))


class BatchClients:
    """One Batch API client per base URL: a batch is polled where it was submitted.

    ``enrich_batches.base_url`` holds the URL without its credentials (a table is no place
    for them). A batch whose stored URL is the configured one, redacted, is reached with the
    configured URL and its credentials, the way the API key too comes from the environment of
    the process that polls; a batch submitted elsewhere is reached at its stored URL.
    """

    def __init__(self, settings: DashScopeSettings) -> None:
        self.settings = settings
        self._apis: dict[str, BatchApi] = {}

    def url_for(self, stored: str | None) -> str:
        configured = self.settings.url
        if stored is None or stored in (configured, redact_source(configured)):
            return configured
        return stored

    def get(self, stored: str | None = None) -> BatchApi:
        url = self.url_for(stored)
        if url not in self._apis:
            self._apis[url] = batch_api(self.settings, url)
        return self._apis[url]


def stored_base_url(settings: DashScopeSettings) -> str:
    """What ``enrich_batches.base_url`` records: the base URL without credentials."""
    return settings.base_url_shown
