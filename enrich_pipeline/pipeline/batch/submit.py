"""Submitting a user's pending rows (and stale ones) to DashScope's Batch API.

``submit_batch`` claims the rows for the worker ``batch:<submission>`` with a long lease, loads
each image once (dominant colors and the downscaled copy, exactly as online), and writes one
JSONL chat request per distinct image (``custom_id`` = item id; the online path's body: model,
messages, ``max_tokens``, response_format and thinking switch, in the answer format the model's
documentation lists or ``ENRICH_ANSWER_FORMAT`` names). A file holds at most ``max_lines`` lines
(50,000) and ``max_bytes`` (500 MB); past that the submission is split into parts, one provider
batch each. A part is recorded (state ``submitting``, with what collecting needs per item)
*before* its file is uploaded and its batch created, so a crash in between is resolved later by
the poll (it looks the batch up by the local id sent as batch metadata). Images already in the
caption cache, and images that cannot be read, are written at once, as online.

Stale rows (captioned by the pipeline, image changed since) are taken with the pending ones
under ``ENRICH_ON_IMAGE_CHANGE=recaption``, as online: each item records the caption it replaces
and that caption's image digest, and collecting writes only if both are still there. With
``flag`` they are flagged (no call) and with ``ignore`` left alone; either way only pending rows
are submitted. The answer format is the model's documented best, or lower where the model's
collected batches showed it does not take it (``formats.batch_format``), or
``ENRICH_ANSWER_FORMAT``'s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from enrich_pipeline.db.batches import (
    ABANDONED,
    OPEN,
    REJECTED,
    SUBMITTING,
    BatchItem,
    BatchRecord,
)
from enrich_pipeline.db.pending import FLAG
from enrich_pipeline.db.store import Store
from enrich_pipeline.db.writes import replacing
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import ItemError, Provenance, WorkItem
from enrich_pipeline.enrichment.structured import Question
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.batch.state import batch_api, give_back, new_id, stored_base_url
from enrich_pipeline.pipeline.stats import RunStats
from enrich_pipeline.providers.base import FatalProviderError, Provider, ProviderError
from enrich_pipeline.providers.batch_api import (
    TEST_MAX_BYTES,
    TEST_MAX_LINES,
    TEST_MODEL,
    BatchApi,
    BatchError,
    BatchUnsupported,
    batch_endpoint,
    batch_refusal,
)
from enrich_pipeline.providers.formats import batch_format
from enrich_pipeline.providers.wire import batch_line, caption_request_body, question_of
from enrich_pipeline.settings import BatchSettings, DashScopeSettings, RunSettings


@dataclass
class SubmitResult:
    submission_id: str
    user_id: str
    worker: str
    parts: list[BatchRecord] = field(default_factory=list)
    queued: int = 0  # items waiting for a batch answer
    lines: int = 0  # distinct images sent
    direct: RunStats = field(default_factory=RunStats)  # written at submit time
    skipped: list[str] = field(default_factory=list)  # claimed by someone else meanwhile
    stale: int = 0  # of ``queued``: stale rows (image changed since captioned)
    stale_direct: int = 0  # of the rows written at once: stale ones (their new image cached)
    flagged: int = 0  # ENRICH_ON_IMAGE_CHANGE=flag: stale rows flagged, not submitted
    answer_format: str = ""
    # Why the format is not the documented one: the model's earlier batches (one line).
    format_note: str | None = None


class _Part:
    """One JSONL file in the making."""

    def __init__(self, folder: Path, number: int) -> None:
        self.number = number
        self.path = folder / f"part-{number}.jsonl"
        self._fh = self.path.open("wb")
        self.lines = 0
        self.bytes = 0
        self.items: list[BatchItem] = []
        self.stale = 0
        self.line_of: dict[str, str] = {}  # content sha256 -> custom_id of its line

    def write(self, line: bytes) -> None:
        self._fh.write(line)
        self.lines += 1
        self.bytes += len(line)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def submit_batch(
    store: Store,
    settings: DashScopeSettings,
    user_id: str,
    *,
    provider: Provider,
    policy: ImagePolicy,
    batch: BatchSettings | None = None,
    run: RunSettings | None = None,
    vocabulary: TagVocabulary = DEFAULT_VOCABULARY,
    api: BatchApi | None = None,
    run_id: str | None = None,
) -> SubmitResult:
    """Claim the user's pending rows (and stale ones, as ``run.on_image_change`` says) and
    submit their captions as one or more batches.

    ``batch`` sizes the files and the claims; of ``run``, the attempts, the embedding switch,
    the images loaded at once, the colors per image count and what stale rows get.
    ``provider`` is the run's (its limiter and usage counts): it embeds the captions that need
    no batch line (found in the cache).
    """
    # The region/model matrix first: a model the region's Batch API does not take is refused
    # before a row is claimed or a byte uploaded.
    refusal = batch_refusal(settings)
    if refusal is not None:
        raise BatchUnsupported(refusal)
    batch = batch or BatchSettings()
    if settings.vision_model == TEST_MODEL:
        # The free test model takes at most 100 lines and 1 MB per file.
        batch = batch.with_(
            max_lines=min(batch.max_lines, TEST_MAX_LINES),
            max_bytes=min(batch.max_bytes, TEST_MAX_BYTES),
        )
    run = run or RunSettings()
    caption_embedding = run.caption_embedding
    api = api or batch_api(settings)
    submission = new_id()
    worker = f"batch:{submission}"
    result = SubmitResult(submission, user_id, worker)
    stale = run.on_image_change
    if stale == FLAG:
        # As an online run does: flagged in one statement, no call, nothing submitted for them.
        result.flagged, _ = store.items.flag_stale(user_id)
    ids = store.items.pending_ids(
        user_id, limit=batch.max_items, max_attempts=run.max_attempts, stale=stale
    )
    if not ids:
        return result
    provenance = Provenance(
        settings.vision_model, settings.prompt_version, languages=settings.languages
    )
    # One format for the whole batch: its lines are answered long after they are sent, so
    # there is no step-down within it. A refused format gives its rows back uncharged, and
    # collect records it, so that this model's next submission starts one format lower.
    question = question_of(settings, vocabulary)
    answer_format, result.format_note = batch_format(
        settings.answer_format,
        settings.vision_model,
        settings.url,
        store.batches.format_verdicts(settings.vision_model),
    )
    result.answer_format = answer_format
    held: set[str] = set()  # claimed here, neither written nor recorded in a part yet
    claimed: set[str] = set()

    def write_direct(works: list[WorkItem]) -> None:
        """Rows that need no batch line: cached captions, unreadable images."""
        if not works:
            return
        chunk = stages.Chunk(user_id, worker, works)
        stages.embed_chunk(chunk, provider, enabled=caption_embedding)
        written = stages.write_chunk(
            store,
            chunk,
            provenance=provenance,
            embedding_model=provider.embedding_model if caption_embedding else None,
            run_id=run_id,
        )
        result.direct.merge(written.stats)
        done = {o.item_id for o in written.outcomes if o.status == "succeeded"}
        result.stale_direct += sum(
            1 for w in works if w.item.id in done and replacing(w.item.metadata)["replaces"]
        )
        held.difference_update(w.item.id for w in works)

    def flush(part: _Part) -> None:
        part.close()
        if not part.items:
            return
        held.difference_update(i.item_id for i in part.items)
        record = _submit_part(store, api, settings, result, part, caption_embedding, answer_format)
        result.parts.append(record)
        result.queued += len(part.items)
        result.stale += part.stale
        result.lines += part.lines

    with tempfile.TemporaryDirectory(prefix="enrich-batch-") as tmp:
        folder = Path(tmp)
        part = _Part(folder, 0)
        try:
            for start in range(0, len(ids), batch.chunk_size):
                chunk = stages.claim_chunk(
                    store,
                    user_id,
                    ids[start : start + batch.chunk_size],
                    worker=worker,
                    lease_seconds=batch.lease_seconds,
                    max_attempts=run.max_attempts,
                    stale=stale,
                )
                mine = [w.item.id for w in chunk.items]
                held.update(mine)
                claimed.update(mine)
                result.skipped.extend(chunk.skipped)
                stages.visual_attributes(
                    chunk,
                    policy=policy,
                    max_image_side=settings.max_image_side,
                    color_count=run.color_count,
                    concurrent=run.concurrent,
                    vision_model=settings.vision_model,
                )
                cached = store.cache.cached_answers(
                    [w.content_sha256 for w in chunk.live() if w.content_sha256],
                    model=settings.vision_model,
                    prompt_version=settings.prompt_version,
                    answer_format=answer_format,
                    languages=question.languages,
                )
                direct: list[WorkItem] = []
                for work in chunk.items:
                    sha = work.content_sha256
                    if not work.ok or sha is None:
                        work.fail(ItemError("image_error", "no image content", True, "image"))
                        direct.append(work)
                    elif sha in cached:
                        stages.accept_caption(work, cached[sha], vocabulary, cached=True)
                        direct.append(work)
                    else:
                        part = _queue(
                            work, part, folder, settings, batch, flush, question, answer_format
                        )
                        if not work.ok:
                            direct.append(work)
                write_direct(direct)
            flush(part)
        except BaseException:
            part.close()
            if held:
                store.items.release(user_id, held, worker=worker)
            raise
        finally:
            # Polls renew the batch's claims from now on, not this process.
            store.items.forget_leases(worker, claimed)
    return result


def _queue(
    work: WorkItem,
    part: _Part,
    folder: Path,
    settings: DashScopeSettings,
    batch: BatchSettings,
    flush: Callable[[_Part], None],
    question: Question,
    answer_format: str,
) -> _Part:
    """Add the item to the current part (a new line, or the line of its image's twin); start
    a new part when the line would not fit. Returns the part in use."""
    sha = work.content_sha256
    assert sha is not None and work.vision is not None
    custom_id = part.line_of.get(sha)
    if custom_id is None:
        line = batch_line(
            work.item.id,
            caption_request_body(settings, work.vision.data_url, question, answer_format),
            batch_endpoint(settings.vision_model),
        )
        if len(line) > batch.max_bytes:
            work.fail(
                ItemError(
                    "request_too_large",
                    f"the request for this image is {len(line)} bytes, more than a batch file "
                    f"may hold ({batch.max_bytes})",
                    True,
                    "batch",
                )
            )
            return part
        if part.lines and (
            part.lines + 1 > batch.max_lines or part.bytes + len(line) > batch.max_bytes
        ):
            flush(part)
            part = _Part(folder, part.number + 1)
        part.write(line)
        custom_id = work.item.id
        part.line_of[sha] = custom_id
    # A stale row's caption is replaced at collect time only if it is still there.
    replaced = replacing(work.item.metadata)
    part.items.append(
        BatchItem(
            work.item.id,
            custom_id,
            work.item.image,
            sha,
            tuple(work.dominant_colors),
            replaced["replaces"],
            replaced["replaces_digest"],
        )
    )
    part.stale += replaced["replaces"] is not None
    work.vision = None  # the data URL is in the file now; keep memory flat
    return part


def _submit_part(
    store: Store,
    api: BatchApi,
    settings: DashScopeSettings,
    result: SubmitResult,
    part: _Part,
    caption_embedding: bool,
    answer_format: str,
) -> BatchRecord:
    local_id = f"{result.submission_id}-{part.number}"
    store.batches.record(
        {
            "local_id": local_id,
            "user_id": result.user_id,
            "submission_id": result.submission_id,
            "part": part.number,
            "worker": result.worker,
            "endpoint": batch_endpoint(settings.vision_model),
            "model": settings.vision_model,
            "prompt_version": settings.prompt_version,
            # Without credentials: polls take them from their own configuration.
            "base_url": stored_base_url(settings),
            "caption_embedding": caption_embedding,
            "lines": part.lines,
            "bytes": part.bytes,
            "answer_format": answer_format,
            "languages": settings.caption_languages,
        },
        part.items,
    )
    try:
        uploaded = api.upload(part.path, f"enrich-{local_id}.jsonl")
    except (BatchError, ProviderError) as exc:
        # Nothing exists at the provider: the rows go back to the pending set as they were.
        give_back(
            store, local_id, REJECTED if isinstance(exc, BatchUnsupported) else ABANDONED, exc
        )
        raise
    store.batches.update(local_id, input_file_id=uploaded.id)
    try:
        batch = api.create(uploaded.id, metadata={"enrich_local_id": local_id})
    except (BatchError, FatalProviderError) as exc:
        # A definite refusal: no batch was created.
        give_back(store, local_id, REJECTED, exc)
        raise
    # Any other failure (timeout, 5xx after retries) leaves the part "submitting": whether the
    # batch was created is unknown, and the poll finds out (by the metadata) after a grace time.
    record = store.batches.update(
        local_id,
        expect_state=SUBMITTING,
        state=OPEN,
        batch_id=batch.id,
        status=batch.status,
    )
    if record is None:
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
    return record
