"""Thin Dagster ops around the stages: pending rows, visual attributes, captions, caption
embeddings, DB writes, and the summary that becomes the materialization's metadata.

Run knobs are given once, to ``pending_rows``, and travel with each chunk, so a user configures
one op in the launchpad, not five.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from dagster import (
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    op,
)

from enrich_pipeline.defs.config import EnrichConfig
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.partitions import key_to_user
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.stats import ChunkResult, RunStats
from enrich_pipeline.providers.base import FatalProviderError, ProviderUnavailable
from enrich_pipeline.providers.pricing import estimate_cost, load_prices
from enrich_pipeline.settings import ConfigError, RunSettings


@dataclass
class ChunkState:
    """A chunk on its way through the graph, with the run knobs and the usage it caused."""

    chunk: stages.Chunk
    run: RunSettings
    usage: dict[str, int] = field(default_factory=dict)
    result: ChunkResult | None = None


@dataclass(frozen=True)
class ChunkSpec:
    user_id: str
    ids: list[str]
    run: RunSettings


def _depth_first(stage: int) -> dict[str, str]:
    """Step priority rising along the chunk's path, so the executor finishes (and writes) one
    chunk before it starts the next. Without it Dagster runs the mapped steps breadth-first:
    every chunk's images loaded before any caption, and nothing written until all are paid.
    """
    return {"dagster/priority": str(stage)}


def _recaption(run: RunSettings, dashscope: DashScopeResource) -> tuple[str, str] | None:
    if not run.recaption:
        return None
    return dashscope.provider.model_label, dashscope.settings.prompt_version


def _user(context: OpExecutionContext) -> str:
    return key_to_user(context.partition_key)


def _release(adbpg: AdbpgResource, chunk: stages.Chunk) -> None:
    adbpg.store.items.release(chunk.user_id, [w.item.id for w in chunk.items], worker=chunk.worker)


@contextmanager
def _provider_step(
    context: OpExecutionContext,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    state: ChunkState,
) -> Iterator[None]:
    """Count the step's token usage into the chunk, and end the run cleanly when the provider
    stops it (an account, key, model or request problem, or the provider given up on after
    throttling or an outage): no row is charged, the chunk's claims are released and the run
    fails without retries. When the embedding model stopped it, the chunk's captions are paid
    for and written first, without the vectors they lack (counted as embedding failures).
    Anything else that escapes the stage releases the chunk's claims before the step fails."""
    provider = dashscope.provider
    before = provider.usage.as_dict()
    try:
        yield
    except FatalProviderError as exc:
        chunk = state.chunk
        written = 0
        embedding_step = context.op_def.name == caption_embeddings.name
        if embedding_step and exc.kind == "embedding" and any(w.caption for w in chunk.items):
            settings = dashscope.settings
            result = stages.write_chunk(
                adbpg.store,
                chunk,
                provenance=Provenance(
                    provider.model_label, settings.prompt_version, provider.offline
                ),
                embedding_model=settings.embedding_model if state.run.caption_embedding else None,
                run_id=context.run_id,
            )
            written = result.stats.succeeded
            context.log.warning(
                f"{written} paid caption(s) of the chunk written without embeddings before "
                "the stop"
            )
        else:
            _release(adbpg, chunk)
        context.log.error(f"stopping the run: {exc}")
        raise Failure(
            description=str(exc),
            allow_retries=False,
            metadata={
                "stopped_because": exc.code,
                "provider_unavailable": isinstance(exc, ProviderUnavailable),
                "captions_written_before_the_stop": written,
            },
        ) from exc
    except Exception:
        _release(adbpg, state.chunk)
        raise
    finally:
        for k, v in provider.usage.as_dict().items():
            state.usage[k] = state.usage.get(k, 0) + v - before.get(k, 0)


@op(out=DynamicOut(ChunkSpec, io_manager_key=CHUNK_IO))
def pending_rows(
    context: OpExecutionContext,
    config: EnrichConfig,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
):
    """The user's pending rows (active, image, no caption, not given up), in chunks."""
    try:
        run = config.run_settings()
    except ConfigError as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc
    user = _user(context)
    if config.retry_failed:
        cleared = adbpg.store.items.reset_failures(user)
        context.log.info(f"retry_failed: {cleared} recorded failure(s) of {user!r} cleared")
    ids = adbpg.store.items.pending_ids(
        user,
        limit=run.max_items,
        max_attempts=run.max_attempts,
        recaption=_recaption(run, dashscope),
    )
    context.log.info(f"{len(ids)} pending row(s) for user {user!r}")
    for n, chunk_ids in enumerate(stages.chunked(ids, run.batch_size)):
        yield DynamicOutput(ChunkSpec(user, chunk_ids, run), mapping_key=f"chunk_{n}")


@op(
    ins={"spec": In(ChunkSpec)},
    out=Out(ChunkState, io_manager_key=CHUNK_IO),
    pool="adbpg",
    tags=_depth_first(1),
)
def visual_attributes(
    context: OpExecutionContext, spec: ChunkSpec, adbpg: AdbpgResource, dashscope: DashScopeResource
) -> ChunkState:
    """Claim the chunk's rows, load each image once: dominant colors and a downscaled copy."""
    run = spec.run
    chunk = stages.claim_chunk(
        adbpg.store,
        spec.user_id,
        spec.ids,
        worker=context.run_id,
        lease_seconds=run.lease_seconds,
        max_attempts=run.max_attempts,
        recaption=_recaption(run, dashscope),
    )
    try:
        stages.visual_attributes(
            chunk,
            policy=dashscope.image_policy,
            max_image_side=dashscope.settings.max_image_side,
            color_count=run.color_count,
            concurrent=run.concurrent,
            vision_model=dashscope.settings.vision_model,
        )
    except Exception:  # per-row trouble is the row's (stages); anything else frees the rows
        _release(adbpg, chunk)
        raise
    return ChunkState(chunk, run)


@op(out=Out(ChunkState, io_manager_key=CHUNK_IO), pool="dashscope", tags=_depth_first(2))
def captions(
    context: OpExecutionContext,
    state: ChunkState,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
) -> ChunkState:
    """Caption the chunk with Qwen-VL, ``concurrent`` calls at a time, and derive its tags."""
    with _provider_step(context, adbpg, dashscope, state):
        stages.caption_chunk(
            state.chunk,
            dashscope.provider,
            concurrent=state.run.concurrent,
            vocabulary=dashscope.vocabulary,
            cache=adbpg.store.cache,
            prompt_version=dashscope.settings.prompt_version,
        )
    return state


@op(out=Out(ChunkState, io_manager_key=CHUNK_IO), pool="dashscope", tags=_depth_first(3))
def caption_embeddings(
    context: OpExecutionContext,
    state: ChunkState,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
) -> ChunkState:
    """Embed the captions (ten per request), unless the run turned embeddings off."""
    with _provider_step(context, adbpg, dashscope, state):
        stages.embed_chunk(
            state.chunk,
            dashscope.provider,
            enabled=state.run.caption_embedding,
            concurrent=state.run.concurrent,
        )
    return state


@op(out=Out(ChunkState, io_manager_key=CHUNK_IO), pool="adbpg", tags=_depth_first(4))
def write_results(
    context: OpExecutionContext,
    state: ChunkState,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
) -> ChunkState:
    """Write the chunk back in one transaction; what it finished survives a later crash."""
    settings = dashscope.settings
    provider = dashscope.provider
    result = stages.write_chunk(
        adbpg.store,
        state.chunk,
        provenance=Provenance(provider.model_label, settings.prompt_version, provider.offline),
        embedding_model=settings.embedding_model if state.run.caption_embedding else None,
        run_id=context.run_id,
    )
    s = result.stats
    context.log.info(
        f"chunk written: {s.succeeded} succeeded, {s.failed} failed, {s.skipped} skipped"
    )
    # Only the small result goes on: images and vectors are done with.
    return replace(state, chunk=replace(state.chunk, items=[]), result=result)


@op
def summarize(
    context: OpExecutionContext,
    states: list[ChunkState],
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
) -> Output[dict]:
    """Totals for the partition, shown as the asset materialization's metadata."""
    stats = RunStats()
    usage: dict[str, int] = {}
    for state in states:
        if state.result is not None:
            stats.merge(state.result.stats)
        for k, v in state.usage.items():
            usage[k] = usage.get(k, 0) + v
    user = _user(context)
    ledger = adbpg.store.items.failures(user)
    provider = dashscope.provider
    prices = load_prices(base_url=dashscope.settings.base_url)
    cost = estimate_cost(
        usage,
        vision_model=provider.model_label,
        embedding_model=dashscope.settings.embedding_model,
        prices=prices,
    )
    figures = stats.summary()
    summary = {
        "user_id": user,
        **figures,
        "estimated_cost_usd": cost,
        "cost_currency": prices.currency,
        "usage": usage,
        "provider": "offline (synthetic captions)" if provider.offline else "dashscope",
        "model": provider.model_label,
    }
    samples = "\n".join(f"- {c}" for c in stats.samples) or "(none)"
    failures = "\n".join(
        f"| {e.item_id} | {e.attempts} | {'yes' if e.permanent else 'no'} | {e.error_code} |"
        f" {e.last_error[:120].replace('|', '/')} |"
        for e in ledger[:20]
    )
    metadata = {
        "user_id": user,
        **{k: figures[k] for k in ("total", "succeeded", "failed", "skipped")},
        "success_rate": MetadataValue.float(figures["success_rate"]),
        "tokens_used": usage.get("total_tokens", 0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "embedding_tokens": usage.get("embedding_tokens", 0),
        "api_retries": usage.get("retries", 0),
        "image_tokens": usage.get("image_tokens", 0),
        # A number, so the UI plots spend per partition across runs; -1 when a model is unpriced.
        "estimated_cost_usd": MetadataValue.float(round(cost, 6) if cost is not None else -1.0),
        # The list prices' currency: CNY for Beijing, USD for Singapore and US.
        "cost_currency": prices.currency,
        "embedded": figures["embedded"],
        "cache_hits": figures["cache_hits"],
        "cache_hit_rate": MetadataValue.float(figures["cache_hit_rate"]),
        "provider": summary["provider"],
        "model": provider.model_label,
        "sample_captions": MetadataValue.md(samples),
        "failure_ledger": MetadataValue.md(
            "| item | attempts | permanent | code | last error |\n|---|---|---|---|---|\n"
            + failures
            if ledger
            else "(no recorded failures)"
        ),
        "failures_recorded": len(ledger),
    }
    return Output(summary, metadata=metadata)
