"""Polling DashScope's batches: ``poll_batches`` retrieves each open batch's status and stores
it, renews the claims of the batches still running, and returns those that have ended
(completed, expired, failed, cancelled)."""

from __future__ import annotations

from collections.abc import Callable

from enrich_pipeline.db.batches import ABANDONED, OPEN, SUBMITTING, BatchRecord
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.batch.state import (
    SUBMIT_GRACE_SECONDS,
    TERMINAL,
    BatchClients,
    batch_fields,
    give_back,
    now,
)
from enrich_pipeline.providers.base import FatalProviderError, ProviderError
from enrich_pipeline.providers.batch_api import BatchApi, BatchError
from enrich_pipeline.settings import BatchSettings, DashScopeSettings


def poll_batches(
    store: Store,
    settings: DashScopeSettings,
    *,
    user_id: str | None = None,
    lease_seconds: int = BatchSettings().lease_seconds,
    submit_grace_seconds: float = SUBMIT_GRACE_SECONDS,
    on_error: Callable[[BatchRecord, Exception], None] | None = None,
    api: BatchApi | None = None,
) -> list[BatchRecord]:
    """Refresh every open batch's status; return those that have ended and wait to be
    collected. Parts left "submitting" by a dead submitter are resolved on the way.

    ``api``: the Batch API for every batch (as ``submit_batch`` and ``collect_batch`` take
    one); by default each batch is polled at the base URL it was submitted to."""
    clients = BatchClients(settings)

    def api_for(record: BatchRecord) -> BatchApi:
        return api or clients.get(record.base_url)

    for record in store.batches.list(
        states=[SUBMITTING], user_id=user_id, idle_seconds=submit_grace_seconds
    ):
        try:
            _recover(store, api_for(record), record)
        except (BatchError, ProviderError) as exc:
            if isinstance(exc, FatalProviderError):
                raise
            if on_error:
                on_error(record, exc)
    ready: list[BatchRecord] = []
    for record in store.batches.list(states=[OPEN], user_id=user_id):
        if record.batch_id is None:  # cannot happen: open means created
            continue
        try:
            batch = api_for(record).retrieve(record.batch_id)
        except FatalProviderError:
            raise
        except (BatchError, ProviderError) as exc:
            store.batches.update(record.local_id, error=f"poll: {exc}"[:2000], polled_at=now())
            if on_error:
                on_error(record, exc)
            continue
        updated = store.batches.update(
            record.local_id, expect_state=OPEN, polled_at=now(), **batch_fields(batch)
        )
        if updated is None:  # collected meanwhile
            continue
        record = updated
        if record.status in TERMINAL:
            ready.append(record)
        else:
            store.batches.renew_claims(record.user_id, record.worker, lease_seconds)
    return ready


def _recover(store: Store, api: BatchApi, record: BatchRecord) -> None:
    found = api.find(record.local_id, since=record.created_at)
    if found is None:
        give_back(
            store,
            record.local_id,
            ABANDONED,
            "the submitter stopped before a batch was created; rows released",
        )
        return
    store.batches.update(
        record.local_id,
        expect_state=SUBMITTING,
        state=OPEN,
        batch_id=found.id,
        input_file_id=found.input_file_id,
        **batch_fields(found),
    )


def open_batches(store: Store, user_id: str | None = None) -> list[BatchRecord]:
    return store.batches.list(states=[SUBMITTING, OPEN], user_id=user_id)


def cancel_batch(store: Store, settings: DashScopeSettings, ref: str) -> BatchRecord:
    """Ask the provider to cancel; the poll then sees ``cancelled`` and collect releases the
    rows it did not answer."""
    record = store.batches.find(ref)
    if record is None:
        raise BatchError(f"no batch {ref!r} in {store.source_table}")
    if record.state != OPEN or record.batch_id is None:
        raise BatchError(f"batch {record.ref} is {record.state}, not open")
    batch = BatchClients(settings).get(record.base_url).cancel(record.batch_id)
    updated = store.batches.update(record.local_id, expect_state=OPEN, **batch_fields(batch))
    return updated or record
