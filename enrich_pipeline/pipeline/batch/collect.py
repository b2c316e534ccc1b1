"""Collecting an ended batch: ``collect_batch`` downloads the output and error files, reads the
lines by ``custom_id`` (in the answer format and languages the batch asked for, with the
online reading: a malformed answer is the row's error), caches every paid answer, accepts the
answers as online ones,
embeds them with the run's provider, and writes back with ``stages.write_chunk``: the same
conditional merge, scoped to the batch's user, failure ledger (per-line errors classified as
online: moderation and bad images permanent) and release of the claims. Items without an answer
(expired, cancelled or failed batches) are recorded as transient failures and released.
A stale row's answer replaces its caption only if that caption, and the image digest recorded
with it, are what the row held when it was submitted (someone else's newer caption wins).

Lines refused for their response_format give their rows back uncharged; that refusal, or mostly
malformed answers, is recorded with the batch (``next_format``, ``formats.batch_verdict``) so
that the model's next submission starts one format lower, and said in one line (``format_step``).

Collecting is idempotent: an item's claim is released in the transaction that writes it, so
"still claimed by the batch's worker" is exactly "not written yet"; a second collect (or one
after a crash midway) writes only what the first did not, and a collected batch is left alone.
One collector at a time holds a lease on the batch row.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from enrich_pipeline.db.batches import COLLECTED, OPEN, REJECTED, BatchRecord
from enrich_pipeline.db.spend import BATCH, SpendRow, paid_row
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.records import ItemError, PendingItem, Provenance, WorkItem
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.batch.state import (
    COLLECT_LEASE_SECONDS,
    NO_ANSWER,
    TERMINAL,
    BatchClients,
    give_back,
    now,
)
from enrich_pipeline.pipeline.stats import ItemOutcome, RunStats
from enrich_pipeline.providers.answers import MALFORMED
from enrich_pipeline.providers.base import FatalProviderError, Provider, Usage
from enrich_pipeline.providers.batch_api import (
    BatchApi,
    BatchError,
    BatchNotReady,
    unsupported_message,
)
from enrich_pipeline.providers.errors import FORMAT_REFUSED
from enrich_pipeline.providers.formats import batch_verdict
from enrich_pipeline.providers.pricing import estimate_cost, price_table
from enrich_pipeline.providers.wire import LineResult, parse_results
from enrich_pipeline.redaction import redact_source
from enrich_pipeline.settings import DashScopeSettings


@dataclass
class CollectResult:
    batch: BatchRecord
    stats: RunStats = field(default_factory=RunStats)
    outcomes: list[ItemOutcome] = field(default_factory=list)
    released: int = 0  # given back without a ledger entry (model not supported, bad key)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unknown_token_lines: int = 0  # answers whose usage gave no believable count
    already: bool = False  # nothing to do: collected (or ended) before
    # The model's next submissions use a lower answer format, and why (one line).
    format_step: str | None = None
    busy: bool = False  # another collector holds the batch


def _unsupported_failure(record: BatchRecord) -> str | None:
    """A batch that failed validation because the model is not offered in batch mode."""
    if record.status != "failed" or not record.error:
        return None
    text = record.error.lower()
    if "model_not_found" in text or "not supported" in text or "unsupported" in text:
        return unsupported_message(record.model, redact_source(record.base_url), record.error)
    return None


def new_collector_id() -> str:
    return f"collect-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def collect_batch(
    store: Store,
    settings: DashScopeSettings,
    batch: BatchRecord | str,
    *,
    provider: Provider,
    vocabulary: TagVocabulary = DEFAULT_VOCABULARY,
    chunk_size: int = 200,
    run_id: str | None = None,
    collector: str | None = None,
    collector_lease_seconds: int = COLLECT_LEASE_SECONDS,
    api: BatchApi | None = None,
) -> CollectResult:
    """Write an ended batch's answers back; see the module docstring for the guarantees."""
    ref = batch if isinstance(batch, str) else batch.local_id
    record = store.batches.get(ref) or store.batches.find(ref)
    if record is None:
        raise BatchError(f"no batch {ref!r} in {store.source_table}")
    if record.state != OPEN:
        return CollectResult(record, already=True)
    if record.status not in TERMINAL:
        raise BatchNotReady(
            f"batch {record.ref} is {record.status or 'not polled yet'}: poll until it has ended"
        )
    collector = collector or new_collector_id()
    if not store.batches.take_collector(record.local_id, collector, collector_lease_seconds):
        record = store.batches.get(record.local_id) or record
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
        store.batches.take_collector(record.local_id, collector, 0)
        raise


def _collect(
    store: Store,
    settings: DashScopeSettings,
    record: BatchRecord,
    provider: Provider,
    vocabulary: TagVocabulary,
    chunk_size: int,
    run_id: str | None,
    collector: str,
    collector_lease_seconds: int,
    api: BatchApi | None,
) -> CollectResult:
    unsupported = _unsupported_failure(record)
    if unsupported:
        released = give_back(store, record.local_id, REJECTED, unsupported)
        return CollectResult(store.batches.get(record.local_id) or record, released=released)

    api = api or BatchClients(settings).get(record.base_url)
    batch_items = store.batches.items(record.local_id)
    # A legitimate result file has a line per request at most: nothing past that is read.
    texts = [
        api.content(f, max_lines=len(batch_items))
        for f in (record.output_file_id, record.error_file_id)
        if f
    ]
    shown = redact_source(record.base_url)  # rows stored before credentials were kept out
    languages = tuple(record.languages.split(","))
    results = parse_results(
        texts, f"{shown.rstrip('/')}/chat/completions", record.answer_format, languages
    )
    embedding_before = provider.usage.embedding_tokens
    held = set(store.batches.held_ids(record.local_id))
    todo = [i for i in batch_items if i.item_id in held]
    out = CollectResult(record)
    for line in results.values():
        out.prompt_tokens += line.prompt_tokens
        out.completion_tokens += line.completion_tokens
        out.unknown_token_lines += not line.tokens_known
    next_format, out.format_step = _format_verdict(record, results.values())

    # Paid answers go to the cache first: whatever happens next, they are not paid again.
    store.cache.cache_answers(
        [
            (i.content_sha256, results[i.custom_id].answer)  # type: ignore[misc]
            for i in todo
            if i.custom_id in results and results[i.custom_id].answer is not None
        ],
        model=record.model,
        prompt_version=record.prompt_version,
        languages=languages,
    )
    provenance = Provenance(record.model, record.prompt_version, languages=languages)
    missing_code, missing_message = NO_ANSWER.get(record.status or "", NO_ANSWER["failed"])
    for start in range(0, len(todo), chunk_size):
        if not store.batches.take_collector(record.local_id, collector, collector_lease_seconds):
            # Stalled past the lease, and another collector took over: it finishes the job.
            raise BatchError(f"batch {record.ref}: another collector took over")
        works: list[WorkItem] = []
        given_back: list[str] = []
        for item in todo[start : start + chunk_size]:
            # What the claim read of a stale row: the caption to replace and its image digest.
            read = (
                None
                if item.replaces is None
                else {"caption": item.replaces, "caption_image_digest": item.replaces_digest}
            )
            work = WorkItem(
                PendingItem(item.item_id, record.user_id, item.image, read),
                content_sha256=item.content_sha256,
                dominant_colors=list(item.dominant_colors),
            )
            line = results.get(item.custom_id)
            if line is None:
                work.fail(ItemError(missing_code, missing_message, False, "batch"))
            elif line.error is not None:
                if isinstance(line.error, FatalProviderError) or line.error.code == FORMAT_REFUSED:
                    # A bad key, an unknown model or a response_format the model does not take
                    # fails every line alike: not the row's fault.
                    given_back.append(item.item_id)
                    continue
                work.fail(
                    ItemError(line.error.code, str(line.error), line.error.permanent, "caption")
                )
            else:
                stages.accept_caption(work, line.answer or "", vocabulary)
            works.append(work)
        if given_back:
            store.items.release(record.user_id, given_back, worker=record.worker)
            out.released += len(given_back)
        chunk = stages.Chunk(record.user_id, record.worker, works)
        stages.embed_chunk(chunk, provider, enabled=record.caption_embedding)
        written = stages.write_chunk(
            store,
            chunk,
            provenance=provenance,
            embedding_model=provider.embedding_model if record.caption_embedding else None,
            run_id=run_id,
        )
        out.stats.merge(written.stats)
        out.outcomes.extend(written.outcomes)

    stats = {
        **out.stats.summary(),
        "released": out.released,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "unknown_token_lines": out.unknown_token_lines,
    }
    final = store.batches.update(
        record.local_id,
        expect_state=OPEN,
        state=COLLECTED,
        stats=stats,
        finished_at=now(),
        collector=None,
        collector_expires_at=None,
        next_format=next_format,
    )
    if final is not None:
        out.batch = final
        # Once, by the collect that closed the batch: every line's tokens (billed whatever was
        # written) and the embeddings this collect made (those of a collect that died midway
        # are not counted).
        spend = batch_spend(record, out, provider, settings, embedding_before, provider.usage)
        if spend is not None:
            store.spend.record([spend])
    return out


def batch_spend(
    record: BatchRecord,
    out: CollectResult,
    provider: Provider,
    settings: DashScopeSettings,
    embedding_before: int,
    usage: Usage,
) -> SpendRow | None:
    """The spend-ledger row of a collected batch: its lines at the batch price (half), its
    captions' embeddings at the online one; no cost where a model used has no price. None
    when the batch paid no token."""
    prices = price_table(record.base_url, settings.prices)
    embedding_tokens = max(0, usage.embedding_tokens - embedding_before)
    lines = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
    cost = estimate_cost(
        lines, vision_model=record.model, embedding_model="", prices=prices, batch=True
    )
    embedding_model = provider.embedding_model
    if embedding_tokens and cost is not None:
        price = prices.get(embedding_model)
        cost = None if price is None else cost + embedding_tokens * price[0] / 1_000_000
    return paid_row(
        f"batch:{record.local_id}",
        record.user_id,
        BATCH,
        {**lines, "embedding_tokens": embedding_tokens},
        vision_model=record.model,
        embedding_model=embedding_model,
        cost=cost,
        currency=prices.currency,
    )


def _format_verdict(
    record: BatchRecord, lines: Iterable[LineResult]
) -> tuple[str | None, str | None]:
    """What the batch's lines showed of its answer format (``formats.batch_verdict``), and the
    line saying so when the model's next submissions are to use a lower one."""
    refused = malformed = wellformed = 0
    for line in lines:
        if line.answer is not None:
            wellformed += 1
        elif line.error is not None and line.error.code == FORMAT_REFUSED:
            refused += 1
        elif line.error is not None and line.error.code == MALFORMED:
            malformed += 1
    asked = record.answer_format
    verdict = batch_verdict(asked, refused=refused, malformed=malformed, wellformed=wellformed)
    if verdict is None or verdict == asked:
        return verdict, None
    why = (
        f"{refused} line(s) refused it (their rows given back, not charged)"
        if refused
        else f"{malformed} of {malformed + wellformed} answers were malformed"
    )
    return verdict, (
        f"batch {record.ref}: model {record.model!r} does not take the {asked} answer format "
        f"({why}); its next batch submissions use {verdict} unless ENRICH_ANSWER_FORMAT says "
        "otherwise"
    )
