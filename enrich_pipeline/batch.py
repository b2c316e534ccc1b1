"""Batch mode for large backfills: captions through DashScope's OpenAI-compatible Batch API.

Half the price of online calls, results within DashScope's 24 h window. Three steps, each of
which can run in a different process, on a different day, because their state is in the
database (``enrich_batches``, ``enrich_batch_items``; SQL in ``db/store.py``):

``submit_batch``
    claims a user's pending rows for the worker ``batch:<submission>`` with a long lease, loads
    each image once (dominant colors and the downscaled copy, exactly as online), and writes one
    JSONL chat request per distinct image (``custom_id`` = item id; the online path's prompt,
    model and ``max_tokens``). A file holds at most ``max_lines`` lines (50,000) and
    ``max_bytes`` (500 MB); past that the submission is split into parts, one provider batch
    each. A part is recorded (state ``submitting``, with what collecting needs per item: id,
    image, content sha256, colors) *before* its file is uploaded and its batch created, so a
    crash in between is resolved later by the poll (it looks the batch up by the local id sent
    as batch metadata). Images already in the caption cache, and images that cannot be read,
    are written at once, as online.
``poll_batches``
    retrieves each open batch's status and stores it, renews the claims of the batches still
    running, and returns the batches that have ended (completed, expired, failed, cancelled).
``collect_batch``
    downloads the output and error files, reads the lines by ``custom_id``, caches every paid
    caption, derives tags, embeds the captions online, and writes back with
    ``stages.write_chunk``: the same conditional merge, scoped to the batch's user, failure
    ledger (per-line errors classified by ``api.dashscope.classify``, as online: moderation and
    bad images permanent) and release of the claims. Items without an answer (expired,
    cancelled or failed batches) are recorded as transient failures and released.

Collecting is idempotent: an item's claim is released in the transaction that writes it, so
"still claimed by the batch's worker" is exactly "not written yet"; a second collect (or one
after a crash midway) writes only what the first did not, and a collected batch is left alone.
One collector at a time holds a lease on the batch row.

The command line: ``python -m enrich_pipeline.batch submit --user-id U [--max-items N]``,
``poll``, ``collect [--batch ID]``, ``cancel --batch ID``, ``status``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from enrich_pipeline import stages
from enrich_pipeline.api.batch_api import (
    CHAT_ENDPOINT,
    BatchApi,
    BatchApis,
    BatchError,
    BatchNotReady,
    BatchUnsupported,
    status_error,
    unsupported_message,
)
from enrich_pipeline.api.dashscope import (
    DashScopeProvider,
    FatalProviderError,
    Provider,
    ProviderError,
    caption_request_body,
    classify,
)
from enrich_pipeline.db.store import ItemStore
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import ItemError, PendingItem, Provenance, WorkItem
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary, derive_tags
from enrich_pipeline.settings import ConfigError, DashScopeSettings

MAX_LINES = 50_000  # DashScope: requests in one batch file
MAX_BYTES = 500 * 1024 * 1024  # DashScope: size of one batch file
# The rows stay claimed a little longer than the provider's window; every poll renews them,
# so they come back to the online path on their own only if nobody polls any more.
BATCH_LEASE_SECONDS = 25 * 3600
# A part still "submitting" after this long lost its submitter; the poll resolves it.
SUBMIT_GRACE_SECONDS = 3600
COLLECT_LEASE_SECONDS = 1800

ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Our own states (``enrich_batches.state``).
SUBMITTING, OPEN, COLLECTED, ABANDONED, REJECTED = (
    "submitting",
    "open",
    "collected",
    "abandoned",
    "rejected",
)

# What an item that got no answer line is recorded with, by the batch's final status.
_NO_ANSWER = {
    "completed": ("batch_missing_result", "the batch completed without an answer for this item"),
    "expired": ("batch_expired", "the batch expired (24 h window) before this item was done"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this item was done"),
    "failed": ("batch_failed", "the batch failed"),
}


def _now() -> datetime:
    return datetime.now(UTC)


def new_submission_id() -> str:
    return uuid.uuid4().hex[:12]


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRecord:
    """One provider batch as the database knows it."""

    local_id: str
    user_id: str
    submission_id: str
    part: int
    worker: str
    model: str
    prompt_version: str
    base_url: str
    caption_embedding: bool
    lines: int
    bytes: int
    state: str
    batch_id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    status: str | None = None
    request_counts: dict[str, Any] | None = None
    error: str | None = None
    stats: dict[str, Any] | None = None
    created_at: datetime | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BatchRecord:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in row.items() if k in names})

    @property
    def ref(self) -> str:
        """The provider's batch id once known (what people see in the console), else ours."""
        return self.batch_id or self.local_id


@dataclass
class SubmitResult:
    submission_id: str
    user_id: str
    worker: str
    parts: list[BatchRecord] = field(default_factory=list)
    queued: int = 0  # items waiting for a batch answer
    lines: int = 0  # distinct images sent
    direct: stages.RunStats = field(default_factory=stages.RunStats)  # written at submit time
    skipped: list[str] = field(default_factory=list)  # claimed by someone else meanwhile


@dataclass
class CollectResult:
    batch: BatchRecord
    stats: stages.RunStats = field(default_factory=stages.RunStats)
    outcomes: list[stages.ItemOutcome] = field(default_factory=list)
    released: int = 0  # given back without a ledger entry (model not supported, bad key)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    already: bool = False  # nothing to do: collected (or ended) before
    busy: bool = False  # another collector holds the batch


# --- submit ----------------------------------------------------------------------------------


class _Part:
    """One JSONL file in the making."""

    def __init__(self, folder: Path, number: int) -> None:
        self.number = number
        self.path = folder / f"part-{number}.jsonl"
        self._fh = self.path.open("wb")
        self.lines = 0
        self.bytes = 0
        self.items: list[dict[str, Any]] = []
        self.line_of: dict[str, str] = {}  # content sha256 -> custom_id of its line

    def write(self, line: bytes) -> None:
        self._fh.write(line)
        self.lines += 1
        self.bytes += len(line)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _encode_line(custom_id: str, body: dict[str, Any]) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
    return (json.dumps(line, separators=(",", ":")) + "\n").encode()


def submit_batch(
    store: ItemStore,
    provider_settings: DashScopeSettings,
    user_id: str,
    *,
    limit: int | None,
    policy: ImagePolicy,
    max_attempts: int = 3,
    caption_embedding: bool = True,
    max_lines: int = MAX_LINES,
    max_bytes: int = MAX_BYTES,
    lease_seconds: int = BATCH_LEASE_SECONDS,
    chunk_size: int = 100,
    concurrent: int = 5,
    color_count: int = 5,
    vocabulary: TagVocabulary = DEFAULT_VOCABULARY,
    provider: Provider | None = None,
    api: BatchApi | None = None,
    run_id: str | None = None,
) -> SubmitResult:
    """Claim the user's pending rows and submit their captions as one or more batches."""
    if not 1 <= max_lines <= MAX_LINES:
        raise ConfigError(f"max_lines must be between 1 and {MAX_LINES}, got {max_lines}")
    if not 1 <= max_bytes <= MAX_BYTES:
        raise ConfigError(f"max_bytes must be between 1 and {MAX_BYTES}, got {max_bytes}")
    settings = provider_settings
    api = api or BatchApi(settings)
    submission = new_submission_id()
    worker = f"batch:{submission}"
    result = SubmitResult(submission, user_id, worker)
    ids = store.pending_ids(user_id, limit=limit, max_attempts=max_attempts)
    if not ids:
        return result
    provenance = Provenance(settings.vision_model, settings.prompt_version)
    embedder: list[Provider] = [provider] if provider is not None else []
    held: set[str] = set()  # claimed here, neither written nor recorded in a part yet
    claimed: set[str] = set()

    def write_direct(works: list[WorkItem]) -> None:
        """Rows that need no batch line: cached captions, unreadable images."""
        if not works:
            return
        chunk = stages.Chunk(user_id, worker, works)
        if caption_embedding and any(w.ok and w.caption for w in works):
            if not embedder:
                embedder.append(DashScopeProvider(settings))
            stages.embed_chunk(chunk, embedder[0], enabled=True)
        written = stages.write_chunk(
            store,
            chunk,
            provenance=provenance,
            embedding_model=settings.embedding_model if caption_embedding else None,
            run_id=run_id,
            embedding_wanted=caption_embedding,
        )
        result.direct.merge(written.stats)
        held.difference_update(w.item.id for w in works)

    def flush(part: _Part) -> None:
        part.close()
        if not part.items:
            return
        held.difference_update(i["item_id"] for i in part.items)
        record = _submit_part(store, api, settings, result, part, caption_embedding)
        result.parts.append(record)
        result.queued += len(part.items)
        result.lines += part.lines

    with tempfile.TemporaryDirectory(prefix="enrich-batch-") as tmp:
        folder = Path(tmp)
        part = _Part(folder, 0)
        try:
            for start in range(0, len(ids), chunk_size):
                chunk = stages.claim_chunk(
                    store,
                    user_id,
                    ids[start : start + chunk_size],
                    worker=worker,
                    lease_seconds=lease_seconds,
                    max_attempts=max_attempts,
                )
                mine = [w.item.id for w in chunk.items]
                held.update(mine)
                claimed.update(mine)
                result.skipped.extend(chunk.skipped)
                stages.visual_attributes(
                    chunk,
                    policy=policy,
                    max_image_side=settings.max_image_side,
                    color_count=color_count,
                    concurrent=concurrent,
                )
                cached = store.cached_captions(
                    [w.content_sha256 for w in chunk.live() if w.content_sha256],
                    model=settings.vision_model,
                    prompt_version=settings.prompt_version,
                )
                direct: list[WorkItem] = []
                for work in chunk.items:
                    sha = work.content_sha256
                    if not work.ok or sha is None:
                        work.fail(ItemError("image_error", "no image content", True, "image"))
                        direct.append(work)
                    elif sha in cached:
                        work.caption, work.from_cache = cached[sha], True
                        work.style_tags, work.object_tags = derive_tags(work.caption, vocabulary)
                        work.vision = None
                        direct.append(work)
                    else:
                        part = _queue(work, part, folder, settings, max_lines, max_bytes, flush)
                        if not work.ok:
                            direct.append(work)
                write_direct(direct)
            flush(part)
        except BaseException:
            part.close()
            if held:
                store.release(user_id, held, worker=worker)
            raise
        finally:
            # Polls renew the batch's claims from now on, not this process.
            store.batch_forget_leases(worker, claimed)
    return result


def _queue(
    work: WorkItem,
    part: _Part,
    folder: Path,
    settings: DashScopeSettings,
    max_lines: int,
    max_bytes: int,
    flush: Callable[[_Part], None],
) -> _Part:
    """Add the item to the current part (a new line, or the line of its image's twin); start
    a new part when the line would not fit. Returns the part in use."""
    sha = work.content_sha256
    assert sha is not None and work.vision is not None
    custom_id = part.line_of.get(sha)
    if custom_id is None:
        line = _encode_line(work.item.id, caption_request_body(settings, work.vision.data_url))
        if len(line) > max_bytes:
            work.fail(
                ItemError(
                    "request_too_large",
                    f"the request for this image is {len(line)} bytes, more than a batch file "
                    f"may hold ({max_bytes})",
                    True,
                    "batch",
                )
            )
            return part
        if part.lines and (part.lines + 1 > max_lines or part.bytes + len(line) > max_bytes):
            flush(part)
            part = _Part(folder, part.number + 1)
        part.write(line)
        custom_id = work.item.id
        part.line_of[sha] = custom_id
    part.items.append(
        {
            "item_id": work.item.id,
            "custom_id": custom_id,
            "image": work.item.image,
            "content_sha256": sha,
            "dominant_colors": list(work.dominant_colors),
        }
    )
    work.vision = None  # the data URL is in the file now; keep memory flat
    return part


def _submit_part(
    store: ItemStore,
    api: BatchApi,
    settings: DashScopeSettings,
    result: SubmitResult,
    part: _Part,
    caption_embedding: bool,
) -> BatchRecord:
    local_id = f"{result.submission_id}-{part.number}"
    store.batch_record(
        {
            "local_id": local_id,
            "user_id": result.user_id,
            "submission_id": result.submission_id,
            "part": part.number,
            "worker": result.worker,
            "endpoint": CHAT_ENDPOINT,
            "model": settings.vision_model,
            "prompt_version": settings.prompt_version,
            "base_url": settings.base_url,
            "caption_embedding": caption_embedding,
            "lines": part.lines,
            "bytes": part.bytes,
        },
        part.items,
    )
    try:
        uploaded = api.upload(part.path, f"enrich-{local_id}.jsonl")
    except (BatchError, ProviderError) as exc:
        # Nothing exists at the provider: the rows go back to the pending set as they were.
        _give_back(
            store, local_id, REJECTED if isinstance(exc, BatchUnsupported) else ABANDONED, exc
        )
        raise
    store.batch_update(local_id, input_file_id=uploaded.id)
    try:
        batch = api.create(uploaded.id, metadata={"enrich_local_id": local_id})
    except (BatchError, FatalProviderError) as exc:
        # A definite refusal: no batch was created.
        _give_back(store, local_id, REJECTED, exc)
        raise
    # Any other failure (timeout, 5xx after retries) leaves the part "submitting": whether the
    # batch was created is unknown, and the poll finds out (by the metadata) after a grace time.
    row = store.batch_update(
        local_id,
        expect_state=SUBMITTING,
        state=OPEN,
        batch_id=batch.id,
        status=batch.status,
    )
    if row is None:
        # A poll gave this part up meanwhile (it looked dead for SUBMIT_GRACE_SECONDS) and
        # released its rows: the batch must not run for rows that are no longer held.
        try:
            api.cancel(batch.id)
        except (BatchError, ProviderError):
            pass
        raise BatchError(
            f"batch part {local_id} was given up by a poll while it was being submitted; "
            f"batch {batch.id} was cancelled and its rows are pending again"
        )
    return BatchRecord.from_row(row)


def _give_back(store: ItemStore, local_id: str, state: str, why: BaseException | str) -> int:
    """End a batch that will produce nothing: its rows' claims released, no ledger entry."""
    row = store.batch_get(local_id)
    if row is None:
        return 0
    ids = store.batch_held_ids(local_id)
    if ids:
        store.release(row["user_id"], ids, worker=row["worker"])
    store.batch_update(
        local_id,
        state=state,
        error=str(why)[:2000],
        finished_at=_now(),
        collector=None,
        collector_expires_at=None,
    )
    return len(ids)


# --- poll ------------------------------------------------------------------------------------


def _batch_fields(batch: Any) -> dict[str, Any]:
    counts = getattr(batch, "request_counts", None)
    errors = getattr(batch, "errors", None)
    messages = [
        f"{e.code or 'error'}: {e.message or ''}".strip()
        for e in (getattr(errors, "data", None) or [])
    ]
    fields: dict[str, Any] = {
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "request_counts": counts.model_dump() if counts is not None else None,
        # The provider's errors (validation); a successful poll clears an earlier poll error.
        "error": "; ".join(messages)[:2000] or None,
    }
    return fields


def poll_batches(
    store: ItemStore,
    settings: DashScopeSettings,
    *,
    user_id: str | None = None,
    lease_seconds: int = BATCH_LEASE_SECONDS,
    submit_grace_seconds: float = SUBMIT_GRACE_SECONDS,
    on_error: Callable[[BatchRecord, Exception], None] | None = None,
) -> list[BatchRecord]:
    """Refresh every open batch's status; return those that have ended and wait to be
    collected. Parts left "submitting" by a dead submitter are resolved on the way."""
    apis = BatchApis(settings)
    for row in store.batch_list(
        states=[SUBMITTING], user_id=user_id, idle_seconds=submit_grace_seconds
    ):
        record = BatchRecord.from_row(row)
        try:
            _recover(store, apis.get(record.base_url), record)
        except (BatchError, ProviderError) as exc:
            if isinstance(exc, FatalProviderError):
                raise
            if on_error:
                on_error(record, exc)
    ready: list[BatchRecord] = []
    for row in store.batch_list(states=[OPEN], user_id=user_id):
        record = BatchRecord.from_row(row)
        if record.batch_id is None:  # cannot happen: open means created
            continue
        try:
            batch = apis.get(record.base_url).retrieve(record.batch_id)
        except FatalProviderError:
            raise
        except (BatchError, ProviderError) as exc:
            store.batch_update(record.local_id, error=f"poll: {exc}"[:2000], polled_at=_now())
            if on_error:
                on_error(record, exc)
            continue
        updated = store.batch_update(
            record.local_id, expect_state=OPEN, polled_at=_now(), **_batch_fields(batch)
        )
        if updated is None:  # collected meanwhile
            continue
        record = BatchRecord.from_row(updated)
        if record.status in TERMINAL:
            ready.append(record)
        else:
            store.batch_renew_claims(record.user_id, record.worker, lease_seconds)
    return ready


def _recover(store: ItemStore, api: BatchApi, record: BatchRecord) -> None:
    found = api.find(record.local_id, since=record.created_at)
    if found is None:
        _give_back(
            store,
            record.local_id,
            ABANDONED,
            "the submitter stopped before a batch was created; rows released",
        )
        return
    store.batch_update(
        record.local_id,
        expect_state=SUBMITTING,
        state=OPEN,
        batch_id=found.id,
        input_file_id=found.input_file_id,
        **_batch_fields(found),
    )


def open_batches(store: ItemStore, user_id: str | None = None) -> list[BatchRecord]:
    return [
        BatchRecord.from_row(r)
        for r in store.batch_list(states=[SUBMITTING, OPEN], user_id=user_id)
    ]


def cancel_batch(store: ItemStore, settings: DashScopeSettings, ref: str) -> BatchRecord:
    """Ask the provider to cancel; the poll then sees ``cancelled`` and collect releases the
    rows it did not answer."""
    row = store.batch_find(ref)
    if row is None:
        raise BatchError(f"no batch {ref!r} in {store.source_table}")
    record = BatchRecord.from_row(row)
    if record.state != OPEN or record.batch_id is None:
        raise BatchError(f"batch {record.ref} is {record.state}, not open")
    batch = BatchApis(settings).get(record.base_url).cancel(record.batch_id)
    updated = store.batch_update(record.local_id, expect_state=OPEN, **_batch_fields(batch))
    return BatchRecord.from_row(updated or row)


# --- collect ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineResult:
    caption: str | None = None
    error: ProviderError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _guess_status(code: str) -> int:
    """A status for an error line that carries only a code."""
    code = code.lower()
    if "inspection" in code or "invalid" in code:
        return 400
    if "limit" in code or "throttl" in code:
        return 429
    return 500


def parse_line(obj: dict[str, Any], url: str) -> LineResult:
    """One output or error line, with the online path's meaning: a caption, or an error
    classified by ``classify`` (moderation and bad images permanent, 429/5xx transient)."""
    response = obj.get("response") if isinstance(obj.get("response"), dict) else {}
    status = response.get("status_code")
    body = response.get("body")
    error = obj.get("error") if isinstance(obj.get("error"), dict) else None
    if status == 200 and isinstance(body, dict):
        choices = body.get("choices")
        if not isinstance(choices, list):
            return LineResult(
                error=ProviderError(
                    "malformed_response", "the batch answer has no choices", permanent=False
                )
            )
        message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
        text = (message.get("content") or "") if isinstance(message, dict) else ""
        text = " ".join(str(text).split())
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens = {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
        }
        if not text:
            return LineResult(
                error=ProviderError(
                    "empty_caption", "the model returned an empty caption", permanent=False
                ),
                **tokens,
            )
        return LineResult(caption=text, **tokens)
    if isinstance(status, int) and status >= 400:
        if not isinstance(body, dict) or "error" not in body:
            body = {"error": error or {"message": str(body)}}
        return LineResult(error=classify(status_error(status, body, url)))
    if error is not None:
        code = str(error.get("code") or "batch_line_error")
        if code.lower().startswith("batch_"):  # batch_expired, batch_cancelled, ...
            return LineResult(
                error=ProviderError(
                    code.lower(), str(error.get("message") or code), permanent=False
                )
            )
        return LineResult(error=classify(status_error(_guess_status(code), {"error": error}, url)))
    return LineResult(
        error=ProviderError("malformed_response", "unreadable batch answer line", permanent=False)
    )


def parse_results(texts: Sequence[str], url: str) -> dict[str, LineResult]:
    """Output and error files, by ``custom_id``; an answer beats an error for the same id."""
    results: dict[str, LineResult] = {}
    for text in texts:
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                continue
            line = parse_line(obj, url)
            known = results.get(obj["custom_id"])
            if known is None or (known.caption is None and line.caption is not None):
                results[obj["custom_id"]] = line
    return results


def _unsupported_failure(record: BatchRecord) -> str | None:
    """A batch that failed validation because the model is not offered in batch mode."""
    if record.status != "failed" or not record.error:
        return None
    text = record.error.lower()
    if "model_not_found" in text or "not supported" in text or "unsupported" in text:
        return unsupported_message(record.model, record.base_url, record.error)
    return None


def new_collector_id() -> str:
    return f"collect-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def collect_batch(
    store: ItemStore,
    settings: DashScopeSettings,
    batch: BatchRecord | str,
    *,
    provider: Provider | None = None,
    vocabulary: TagVocabulary = DEFAULT_VOCABULARY,
    chunk_size: int = 200,
    run_id: str | None = None,
    collector: str | None = None,
    collector_lease_seconds: int = COLLECT_LEASE_SECONDS,
    api: BatchApi | None = None,
) -> CollectResult:
    """Write an ended batch's answers back; see the module docstring for the guarantees."""
    ref = batch if isinstance(batch, str) else batch.local_id
    row = store.batch_get(ref) or store.batch_find(ref)
    if row is None:
        raise BatchError(f"no batch {ref!r} in {store.source_table}")
    record = BatchRecord.from_row(row)
    if record.state != OPEN:
        return CollectResult(record, already=True)
    if record.status not in TERMINAL:
        raise BatchNotReady(
            f"batch {record.ref} is {record.status or 'not polled yet'}: poll until it has ended"
        )
    collector = collector or new_collector_id()
    if not store.batch_take_collector(record.local_id, collector, collector_lease_seconds):
        fresh = store.batch_get(record.local_id)
        record = BatchRecord.from_row(fresh) if fresh else record
        return CollectResult(record, already=record.state != OPEN, busy=record.state == OPEN)

    try:
        return _collect(
            store,
            settings,
            record,
            provider,
            vocabulary,
            chunk_size,
            run_id,
            collector,
            collector_lease_seconds,
            api,
        )
    except BaseException:
        # Give the batch back to the next collector at once (a killed process's lease simply
        # runs out); what was written stays written and is not written again.
        store.batch_take_collector(record.local_id, collector, 0)
        raise


def _collect(
    store: ItemStore,
    settings: DashScopeSettings,
    record: BatchRecord,
    provider: Provider | None,
    vocabulary: TagVocabulary,
    chunk_size: int,
    run_id: str | None,
    collector: str,
    collector_lease_seconds: int,
    api: BatchApi | None,
) -> CollectResult:
    unsupported = _unsupported_failure(record)
    if unsupported:
        released = _give_back(store, record.local_id, REJECTED, unsupported)
        fresh = store.batch_get(record.local_id)
        return CollectResult(BatchRecord.from_row(fresh) if fresh else record, released=released)

    api = api or BatchApis(settings).get(record.base_url)
    texts = [api.content(f) for f in (record.output_file_id, record.error_file_id) if f]
    results = parse_results(texts, f"{record.base_url.rstrip('/')}/chat/completions")
    held = set(store.batch_held_ids(record.local_id))
    todo = [i for i in store.batch_items(record.local_id) if i["item_id"] in held]
    out = CollectResult(record)
    for line in results.values():
        out.prompt_tokens += line.prompt_tokens
        out.completion_tokens += line.completion_tokens

    # Paid captions go to the cache first: whatever happens next, they are not paid again.
    store.batch_cache_captions(
        [
            (i["content_sha256"], results[i["custom_id"]].caption)  # type: ignore[misc]
            for i in todo
            if i["custom_id"] in results and results[i["custom_id"]].caption
        ],
        model=record.model,
        prompt_version=record.prompt_version,
    )
    provenance = Provenance(record.model, record.prompt_version)
    embedder: list[Provider] = [provider] if provider is not None else []
    missing_code, missing_message = _NO_ANSWER.get(record.status or "", _NO_ANSWER["failed"])
    for start in range(0, len(todo), chunk_size):
        if not store.batch_take_collector(record.local_id, collector, collector_lease_seconds):
            # Stalled past the lease, and another collector took over: it finishes the job.
            raise BatchError(f"batch {record.ref}: another collector took over")
        works: list[WorkItem] = []
        given_back: list[str] = []
        for item in todo[start : start + chunk_size]:
            work = WorkItem(
                PendingItem(item["item_id"], record.user_id, item["image"], None),
                content_sha256=item["content_sha256"],
                dominant_colors=list(item["dominant_colors"]),
            )
            line = results.get(item["custom_id"])
            if line is None:
                work.fail(ItemError(missing_code, missing_message, False, "batch"))
            elif line.error is not None:
                if isinstance(line.error, FatalProviderError):
                    # A bad key or unknown model fails every line alike: not the row's fault.
                    given_back.append(item["item_id"])
                    continue
                work.fail(
                    ItemError(line.error.code, str(line.error), line.error.permanent, "caption")
                )
            else:
                work.caption = line.caption
                work.style_tags, work.object_tags = derive_tags(work.caption or "", vocabulary)
            works.append(work)
        if given_back:
            store.release(record.user_id, given_back, worker=record.worker)
            out.released += len(given_back)
        chunk = stages.Chunk(record.user_id, record.worker, works)
        if record.caption_embedding and any(w.ok and w.caption for w in works):
            if not embedder:
                embedder.append(DashScopeProvider(settings))
            stages.embed_chunk(chunk, embedder[0], enabled=True)
        written = stages.write_chunk(
            store,
            chunk,
            provenance=provenance,
            embedding_model=settings.embedding_model if record.caption_embedding else None,
            run_id=run_id,
            embedding_wanted=record.caption_embedding,
        )
        out.stats.merge(written.stats)
        out.outcomes.extend(written.outcomes)

    stats = {
        "total": out.stats.total,
        "succeeded": out.stats.succeeded,
        "failed": out.stats.failed,
        "skipped": out.stats.skipped,
        "embedded": out.stats.embedded,
        "embedding_failed": out.stats.embedding_failed,
        "released": out.released,
        "errors": out.stats.errors,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
    }
    final = store.batch_update(
        record.local_id,
        expect_state=OPEN,
        state=COLLECTED,
        stats=stats,
        finished_at=_now(),
        collector=None,
        collector_expires_at=None,
    )
    if final is not None:
        out.batch = BatchRecord.from_row(final)
    return out


# --- command line ----------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m enrich_pipeline.batch",
        description=(
            "Caption large backfills through DashScope's Batch API (half price, results "
            "within 24 h). submit, then poll/collect later (or let the Dagster sensor do it)."
        ),
    )
    parser.add_argument("--namespace", default=None, help="items namespace (ADBPG_NAMESPACE)")
    parser.add_argument("--table", default=None, help="items table (ADBPG_TABLE)")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="claim a user's pending rows and submit batches")
    submit.add_argument("--user-id", required=True)
    submit.add_argument(
        "--max-items", type=int, default=0, help="rows to submit at most (0: all, the default)"
    )
    submit.add_argument("--max-attempts", type=int, default=3)
    submit.add_argument("--concurrent", type=int, default=5, help="images loaded at once")
    submit.add_argument("--no-caption-embedding", action="store_true")
    submit.add_argument("--max-lines", type=int, default=MAX_LINES, help="lines per batch file")
    submit.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="bytes per batch file")
    poll = sub.add_parser("poll", help="refresh the status of open batches")
    poll.add_argument("--user-id", default=None)
    collect = sub.add_parser("collect", help="write back every ended batch (or one)")
    collect.add_argument("--user-id", default=None)
    collect.add_argument("--batch", default=None, help="batch id (DashScope's or ours)")
    cancel = sub.add_parser("cancel", help="cancel an open batch")
    cancel.add_argument("--batch", required=True)
    status = sub.add_parser("status", help="list batches not yet collected")
    status.add_argument("--user-id", default=None)
    return parser.parse_args(argv)


def _describe(record: BatchRecord) -> str:
    counts = record.request_counts or {}
    done = (
        f" {counts.get('completed', 0)}/{counts.get('total', 0)} done"
        f"{', ' + str(counts.get('failed')) + ' failed' if counts.get('failed') else ''}"
        if counts
        else ""
    )
    return (
        f"{record.ref}  user={record.user_id}  lines={record.lines}  "
        f"state={record.state}  status={record.status or '-'}{done}"
        + (f"  error: {record.error}" if record.error else "")
    )


def _print_collected(out: TextIO, result: CollectResult) -> None:
    if result.already:
        out.write(f"{result.batch.ref}: already {result.batch.state}, nothing to do\n")
        return
    if result.busy:
        out.write(f"{result.batch.ref}: another collector is at work on it\n")
        return
    s = result.stats
    out.write(
        f"{result.batch.ref} ({result.batch.status}, user {result.batch.user_id}): "
        f"total {s.total}, succeeded {s.succeeded}, failed {s.failed}, skipped {s.skipped}, "
        f"success rate {s.success_rate:.1%}; embedded {s.embedded}; "
        f"batch tokens {result.prompt_tokens} prompt + {result.completion_tokens} completion"
        + (f"; {result.released} released ({result.batch.error})" if result.released else "")
        + "\n"
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m enrich_pipeline.batch submit|poll|collect|cancel|status``.

    Exit codes as ``enrich-captions``: 0 done, 2 configuration error (batch mode not offered
    for the model or region included), 3 the provider stopped the run (bad key, or DashScope
    still failing after the retries).
    """
    from enrich_pipeline import embedded
    from enrich_pipeline.settings import DbSettings, image_policy_from_env

    out = out or sys.stdout
    args = _parse_args(argv)
    store: ItemStore | None = None
    try:
        db = DbSettings.from_env()
        if args.namespace or args.table:
            db = DbSettings(db.conninfo, args.namespace or db.namespace, args.table or db.table)
        api = DashScopeSettings.from_env()
        if args.command != "status":
            BatchApi(api)  # the key and the offline switch are checked before anything else
        db = embedded.resolve(db)
        store = ItemStore(db)
        store.setup()
        if args.command == "submit":
            result = submit_batch(
                store,
                api,
                args.user_id,
                limit=args.max_items or None,
                policy=image_policy_from_env(local_files=db.embedded),
                max_attempts=args.max_attempts,
                caption_embedding=not args.no_caption_embedding,
                max_lines=args.max_lines,
                max_bytes=args.max_bytes,
                concurrent=args.concurrent,
            )
            d = result.direct
            out.write(
                f"Submission {result.submission_id} for user {args.user_id!r}: "
                f"{result.queued} item(s) in {len(result.parts)} batch(es) "
                f"({result.lines} distinct image(s)); written at once: {d.succeeded} from the "
                f"caption cache, {d.failed} failed; {len(result.skipped)} skipped\n"
            )
            for record in result.parts:
                out.write(f"  {_describe(record)}\n")
        elif args.command == "poll":
            ready = poll_batches(store, api, user_id=args.user_id)
            for record in open_batches(store, args.user_id):
                out.write(f"{_describe(record)}\n")
            out.write(f"{len(ready)} batch(es) ready to collect\n")
        elif args.command == "collect":
            if args.batch:
                _print_collected(out, collect_batch(store, api, args.batch))
            else:
                ready = poll_batches(store, api, user_id=args.user_id)
                for record in ready:
                    _print_collected(out, collect_batch(store, api, record))
                if not ready:
                    out.write("no batch has ended yet: nothing to collect\n")
        elif args.command == "cancel":
            out.write(f"{_describe(cancel_batch(store, api, args.batch))}\n")
        else:
            records = open_batches(store, args.user_id)
            for record in records:
                out.write(f"{_describe(record)}\n")
            if not records:
                out.write("no open batch\n")
        return 0
    except (ConfigError, BatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FatalProviderError as exc:
        print(f"error: run stopped: {exc}", file=sys.stderr)
        return 3
    except ProviderError as exc:  # DashScope away after retries; a half-submitted part is
        # resolved by a later poll, its rows are never lost
        print(f"error: DashScope did not answer: {exc}", file=sys.stderr)
        return 3
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    raise SystemExit(main())
