"""Thin Dagster ops around the stages: pending rows, visual attributes, captions, caption
embeddings, DB writes, and the summary that becomes each partition's materialization metadata.

Run knobs are given once, to ``pending_rows``, and travel with each chunk, so a user configures
one op in the launchpad, not five.

What a chunk carries and what every chunk step shares (its claims and their one release, the
heartbeat's progress, the provider stop) is in ``chunk_steps.py``. What the steps share besides
their inputs is the ``run_state`` resource; the ``heartbeat`` resource beats while they progress.

A run covers one user partition, or (the sensor's shared runs of small users) a range of them.
A chunk may then hold rows of several users: it is claimed, and written, user by user (one
transaction per user, every statement scoped to that user), while its images are loaded and
captioned together so that calls stay in flight. The run's ``Lookahead``
(pipeline/lookahead.py) works one chunk ahead of the steps.
"""

from collections.abc import Iterator
from dataclasses import replace

from dagster import (
    AssetCheckEvaluation,
    AssetMaterialization,
    DagsterInstance,
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    op,
)

from enrich_pipeline.db.pending import FLAG
from enrich_pipeline.db.spend import DAGSTER, SpendRow, paid_row
from enrich_pipeline.defs.chunk_steps import (
    ChunkSpec,
    ChunkState,
    caption_calls,
    loader,
    progressing,
    provider_step,
    recaption_of,
    release_chunk,
    releasing,
)
from enrich_pipeline.defs.config import EnrichConfig
from enrich_pipeline.defs.failed_partitions import Summary, all_failed, fail_partitions
from enrich_pipeline.defs.heartbeat import HeartbeatResource
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.metadata import UserRun, partition_metadata, share_usage
from enrich_pipeline.defs.overview import record_and_observe
from enrich_pipeline.defs.partitions import key_to_user
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.defs.run_state import RunStateResource
from enrich_pipeline.defs.runs import PartitionOrder, users_in_flight
from enrich_pipeline.pipeline import image_vectors, stages
from enrich_pipeline.pipeline.lookahead import Lookahead
from enrich_pipeline.pipeline.stats import ChunkResult, RunStats
from enrich_pipeline.providers.base import FatalProviderError
from enrich_pipeline.providers.pricing import estimate_cost, load_prices
from enrich_pipeline.settings import ConfigError

# Failures shown in the run log per chunk (at warning level); the rest are counted.
LOGGED_FAILURES = 5


def _depth_first(stage: int) -> dict[str, str]:
    """Step priority rising along the chunk's path, so the executor finishes (and writes) one
    chunk before it starts the next. Without it Dagster runs the mapped steps breadth-first:
    every chunk's images loaded before any caption, and nothing written until all are paid.
    """
    return {"dagster/priority": str(stage)}


def _user(context: OpExecutionContext) -> str:
    return key_to_user(context.partition_key)


def partition_keys(context: OpExecutionContext) -> list[str]:
    """The user partitions this run covers: one, or a range of them."""
    if context.has_partition_key_range:
        keys = list(context.partition_keys)
        if keys:
            return keys
    return [context.partition_key]


def _other_runs(instance: DagsterInstance, run_id: str, keys: list[str]) -> dict[str, str]:
    """Other runs (or backfills) queued or in progress on these partitions."""
    try:
        busy = users_in_flight(instance, PartitionOrder.of(instance), exclude_run=run_id)
    except Exception:  # noqa: BLE001 - a report nicety must not fail the run
        return {}
    return {k: busy[k] for k in keys if k in busy}


@op(out=DynamicOut(ChunkSpec, io_manager_key=CHUNK_IO))
def pending_rows(
    context: OpExecutionContext,
    config: EnrichConfig,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
):
    """The pending rows (active, image, no caption, not given up) of the run's users, in
    chunks."""
    with progressing(context, adbpg, dashscope, heartbeat):
        specs = _pending_specs(context, config, adbpg, dashscope, run_state, heartbeat)
    for spec in specs:
        yield DynamicOutput(spec, mapping_key=f"chunk_{spec.index}")


def _pending_specs(
    context: OpExecutionContext,
    config: EnrichConfig,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> list[ChunkSpec]:
    """The run's chunks, and its state started (settings, other runs, lookahead)."""
    try:
        run = config.run_settings()
    except ConfigError as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc
    keys = partition_keys(context)
    users = [key_to_user(k) for k in keys]
    others = _other_runs(context.instance, context.run_id, keys)
    for key, other in others.items():
        context.log.warning(
            f"user {key_to_user(key)!r} is also held by {other}: rows it has claimed are "
            "skipped here, and this run's figures say so"
        )
    pairs: list[tuple[str, str]] = []
    budget = run.max_items
    store = adbpg.store
    for user in users:
        if config.retry_failed:
            cleared = store.items.reset_failures(user)
            context.log.info(f"retry_failed: {cleared} recorded failure(s) of {user!r} cleared")
        if budget is not None and budget <= 0:
            break
        recaption = recaption_of(run, dashscope)
        if run.on_image_change == FLAG and recaption is None:
            flagged, _ = store.items.flag_stale(user)
            if flagged:
                context.log.info(
                    f"{flagged} stale row(s) of {user!r} flagged caption_stale "
                    "(ENRICH_ON_IMAGE_CHANGE=flag: no call)"
                )
        ids = store.items.pending_ids(
            user,
            limit=budget,
            max_attempts=run.max_attempts,
            recaption=recaption,
            stale=run.on_image_change,
        )
        if budget is not None:
            budget -= len(ids)
        pairs.extend((user, i) for i in ids)
        heartbeat.progress()
    pending = {u: 0 for u in users}
    for user, _ in pairs:
        pending[user] += 1
    if len(users) == 1:
        context.log.info(f"{len(pairs)} pending row(s) for user {users[0]!r}")
    else:
        busy = sum(1 for n in pending.values() if n)
        context.log.info(f"{len(pairs)} pending row(s) for {busy} of the run's {len(users)} users")
    specs = []
    for n, start in enumerate(range(0, len(pairs), run.batch_size)):
        chunk_pairs = pairs[start : start + run.batch_size]
        parts: list[tuple[str, tuple[str, ...]]] = []
        for user, item_id in chunk_pairs:
            if parts and parts[-1][0] == user:
                parts[-1] = (user, (*parts[-1][1], item_id))
            else:
                parts.append((user, (item_id,)))
        specs.append(ChunkSpec(n, tuple(parts), run, config.overlap))
    rpm = dashscope.settings.requests_per_minute
    lookahead = Lookahead(
        specs,
        mode=config.overlap,
        concurrent=run.concurrent,
        # No more calls in flight than the run's quota can use (sensor runs share the quota).
        rate=rpm / 60 if rpm and not dashscope.provider.offline else None,
        load=loader(adbpg, dashscope, heartbeat, context.run_id),
        calls=caption_calls(adbpg, dashscope, heartbeat),
        release=release_chunk,
    )
    run_state.begin(run, others, lookahead)
    return specs


@op(
    ins={"spec": In(ChunkSpec)},
    out=Out(ChunkState, io_manager_key=CHUNK_IO),
    pool="adbpg",
    tags=_depth_first(1),
)
def visual_attributes(
    context: OpExecutionContext,
    spec: ChunkSpec,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> ChunkState:
    """Claim the chunk's rows, load each image once: dominant colors and a downscaled copy."""
    lookahead = run_state.lookahead
    with progressing(context, adbpg, dashscope, heartbeat):
        if lookahead is None:  # a step re-executed on its own
            return loader(adbpg, dashscope, heartbeat, context.run_id)(spec)
        try:
            return lookahead.visual(spec.index)
        except FatalProviderError as exc:  # an earlier chunk's call stopped the run
            raise Failure(description=f"the run was stopped: {exc}", allow_retries=False) from exc


@op(out=Out(ChunkState, io_manager_key=CHUNK_IO), pool="dashscope", tags=_depth_first(2))
def captions(
    context: OpExecutionContext,
    state: ChunkState,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> ChunkState:
    """Caption the chunk with Qwen-VL, ``concurrent`` calls at a time, and derive its tags."""
    lookahead = run_state.lookahead
    with (
        progressing(context, adbpg, dashscope, heartbeat),
        releasing(run_state, state),
        provider_step(context, adbpg, dashscope, state),
    ):
        if lookahead is None:
            stages.caption_chunk(
                state.chunk,
                dashscope.provider,
                concurrent=state.run.concurrent,
                vocabulary=dashscope.vocabulary,
                cache=adbpg.store.cache,
                prompt_version=dashscope.settings.prompt_version,
                question=dashscope.question,
            )
        else:
            lookahead.captions(state.index, state)
            # As caption_chunk does: a service error is the row's only while the provider
            # answers most other calls; otherwise the row is given back uncharged.
            stages.settle_blame(state.chunk, dashscope.provider)
    return state


@op(out=Out(ChunkState, io_manager_key=CHUNK_IO), pool="dashscope", tags=_depth_first(3))
def caption_embeddings(
    context: OpExecutionContext,
    state: ChunkState,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> ChunkState:
    """Embed the captions (ten per request), unless the run turned embeddings off, and the
    images with the image model when one is set."""
    with (
        progressing(context, adbpg, dashscope, heartbeat),
        releasing(run_state, state),
        provider_step(context, adbpg, dashscope, state, embedding_step=True),
    ):
        stages.embed_chunk(
            state.chunk,
            dashscope.provider,
            enabled=state.run.caption_embedding,
            concurrent=state.run.concurrent,
        )
        # The images, when ENRICH_IMAGE_EMBEDDING_MODEL is set (else just let go of).
        image_vectors.embed_images_chunk(state.chunk, dashscope.provider, store=adbpg.store)
    return state


def _user_run(result: ChunkResult) -> UserRun:
    """The figures of one user's part of a chunk, without its per-item outcomes."""
    skipped: dict[str, int] = {}
    failures: list[tuple[str, str, str]] = []
    for o in result.outcomes:
        if o.status == "skipped":
            reason = o.error or "skipped"
            skipped[reason] = skipped.get(reason, 0) + 1
        elif o.status == "failed":
            failures.append((o.item_id, o.error_code or "error", o.error or ""))
    return UserRun(result.stats, skipped, failures[:20])


@op(out=Out(ChunkState, io_manager_key=CHUNK_IO), pool="adbpg", tags=_depth_first(4))
def write_results(
    context: OpExecutionContext,
    state: ChunkState,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> ChunkState:
    """Write the chunk back, one transaction per user; what it finished survives a crash."""
    provider = dashscope.provider
    provenance = dashscope.provenance()
    embedding_model = provider.embedding_model if state.run.caption_embedding else None
    image_model = image_vectors.image_model_name(provider)
    total = RunStats()
    by_user: dict[str, UserRun] = {}
    failures: list[tuple[str, str, str, str]] = []
    with progressing(context, adbpg, dashscope, heartbeat), releasing(run_state, state):
        for n, part in enumerate(state.parts or [state.chunk]):
            result = stages.write_chunk(
                adbpg.store,
                part,
                provenance=provenance,
                embedding_model=embedding_model,
                run_id=context.run_id,
                image_embedding_model=image_model,
            )
            # Written: nothing of this part is left to release if a later part fails.
            state.claims.written(n)
            heartbeat.progress()
            total.merge(result.stats)
            user_run = _user_run(result)
            by_user.setdefault(part.user_id, UserRun()).merge(user_run)
            failures.extend((part.user_id, *f) for f in user_run.failures)
    users = f" for {len(by_user)} users" if len(by_user) > 1 else ""
    context.log.info(
        f"chunk {state.index} written{users}: {total.succeeded} succeeded, {total.failed} "
        f"failed, {total.skipped} skipped"
    )
    for user, item_id, code, message in failures[:LOGGED_FAILURES]:
        context.log.warning(
            f"row {item_id} of user {user!r} failed: {code}: {message.splitlines()[0][:300]}"
            if message
            else f"row {item_id} of user {user!r} failed: {code}"
        )
    if total.failed > LOGGED_FAILURES:
        context.log.warning(
            f"... and {total.failed - LOGGED_FAILURES} more failed row(s) in this chunk "
            f"(errors: {', '.join(f'{k} {v}' for k, v in sorted(total.errors.items()))}); "
            "every one is in the failure ledger"
        )
    # Only the small figures go on: images, vectors and per-item outcomes are done with.
    return replace(
        state,
        chunk=replace(state.chunk, items=[]),
        parts=[],
        result=ChunkResult([], total),
        by_user=by_user,
    )


def _database_label(adbpg: AdbpgResource) -> str:
    """The dialect the items live in, as the store probed it at connect."""
    return adbpg.store.dialect.label


@op(out=Out(Nothing))
def summarize(
    context: OpExecutionContext,
    states: list[ChunkState],
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> Iterator[Output[None] | AssetMaterialization | AssetCheckEvaluation]:
    """One materialization per user partition: the user's items as they now are, and what this
    run did for them. Nothing is stored (no IO manager): the metadata is the summary.

    A partition whose rows all failed gets none: the others are materialized one by one, the
    run's planned checks are evaluated here for every partition of the run (their own steps
    are skipped once this step fails), then the step fails naming the users, so Dagster shows
    those partitions as failed."""
    with progressing(context, adbpg, dashscope, heartbeat):
        summary = _summarize(context, states, adbpg, dashscope, run_state, heartbeat)
        if summary.failed:
            yield from fail_partitions(context, summary, adbpg, dashscope)
    run_state.close()
    if summary.failed:
        raise summary.failure()
    yield Output(None)


def _summarize(
    context: OpExecutionContext,
    states: list[ChunkState],
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    run_state: RunStateResource,
    heartbeat: HeartbeatResource,
) -> Summary:
    keys = partition_keys(context)
    runs: dict[str, UserRun] = {key_to_user(k): UserRun() for k in keys}
    for state in states:
        for user, user_run in state.by_user.items():
            runs.setdefault(user, UserRun()).merge(user_run)
    provider = dashscope.provider
    settings = dashscope.settings
    usage = provider.usage.as_dict()
    shares = share_usage(usage, runs)
    run_settings = run_state.settings
    embedding_model = provider.embedding_model if run_settings.caption_embedding else None
    prices = load_prices(base_url=settings.url)
    max_attempts = run_settings.max_attempts
    items = adbpg.store.summary.user_items(runs, max_attempts=max_attempts)
    database = _database_label(adbpg)
    others = run_state.other_runs
    total = RunStats()
    step = context.get_step_execution_context()
    summary = Summary(keys=keys)
    # Each user's share of what the run paid, for the spend ledger (priced once, here).
    spend: list[SpendRow] = []
    any_failed = any(all_failed(items[key_to_user(k)]) for k in keys)
    for key in keys:
        user = key_to_user(key)
        user_run = runs[user]
        total.merge(user_run.stats)
        state = items[user]
        needs_ledger = state.failed_retrying + state.given_up + user_run.stats.failed > 0
        ledger = adbpg.store.items.failures(user) if needs_ledger else None
        share = shares.get(user)
        cost = None
        if not provider.offline and share is not None:
            cost = estimate_cost(
                share,
                vision_model=provider.model_label,
                embedding_model=provider.embedding_model,
                prices=prices,
                image_embedding_model=image_vectors.image_model_name(provider),
            )
            row = paid_row(
                context.run_id,
                user,
                DAGSTER,
                share,
                vision_model=provider.model_label,
                embedding_model=provider.embedding_model,
                cost=cost,
                currency=prices.currency,
            )
            if row is not None:
                spend.append(row)
        metadata = partition_metadata(
            user=user,
            items=state,
            run=user_run,
            usage=None if provider.offline else share,
            cost=cost,
            offline=provider.offline,
            model=provider.model_label,
            embedding_model=embedding_model,
            answer_format=provider.answer_format,
            languages=dashscope.settings.languages,
            database=database,
            ledger=ledger,
            run_users=len(keys),
            other_runs=[others[key]] if key in others else [],
        )
        if all_failed(state):
            summary.failed[key] = (state, ledger or [])
        elif any_failed:
            summary.materialized[key] = metadata
        else:
            step.add_asset_metadata(metadata, partition_key=key)
        heartbeat.progress()
    if len(keys) > 1:
        context.log.info(
            f"{len(keys)} user partitions: {total.succeeded} rows succeeded, {total.failed} "
            f"failed, {total.skipped} skipped"
        )
    # After every write, before a failed partition fails the step: the run's spend per user,
    # then the whole table as it now is.
    record_and_observe(context, adbpg, spend, max_attempts=max_attempts)
    return summary
