"""A chunk on its way through the enrichment graph, and what every chunk step shares.

``ChunkSpec`` says which rows a chunk is, ``ChunkState`` carries them from step to step with
their ``ChunkClaims`` (pipeline/claims.py): every way a chunk can end without being written (a
failed step, a stopped provider, an aborted lookahead, a failed claim) gives its claims back
through that one ``release``. ``progressing`` tells the run's heartbeat of each step's start
and end and watches the provider's call counts; ``loader`` and ``caption_calls`` are the
lookahead's work (pipeline/lookahead.py), and a step's own when it runs without one.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dagster import Failure, OpExecutionContext

from enrich_pipeline.defs.heartbeat import HeartbeatResource
from enrich_pipeline.defs.metadata import UserRun
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.defs.run_state import RunStateResource
from enrich_pipeline.enrichment.records import WorkItem
from enrich_pipeline.pipeline import image_vectors, stages
from enrich_pipeline.pipeline.broker import CaptionBroker
from enrich_pipeline.pipeline.claims import ChunkClaims
from enrich_pipeline.pipeline.lookahead import Overlap
from enrich_pipeline.pipeline.stats import ChunkResult
from enrich_pipeline.providers.base import FatalProviderError, ProviderUnavailable
from enrich_pipeline.providers.errors import IMAGE_EMBEDDING
from enrich_pipeline.settings import RunSettings


@dataclass
class ChunkState:
    """A chunk on its way through the graph, with the run knobs and the usage it caused.

    ``chunk`` holds all its items (user_id: its first user's); ``parts`` the same items by user,
    as claimed and as written; ``claims`` what of them is still held. A chunk of one user has
    ``parts == [chunk]``.
    """

    chunk: stages.Chunk
    run: RunSettings
    claims: ChunkClaims
    usage: dict[str, int] = field(default_factory=dict)
    result: ChunkResult | None = None
    parts: list[stages.Chunk] = field(default_factory=list)
    index: int = 0
    by_user: dict[str, UserRun] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkSpec:
    """Which rows a chunk is: ``(user, ids)`` parts in order."""

    index: int
    parts: tuple[tuple[str, tuple[str, ...]], ...]
    run: RunSettings
    overlap: Overlap = Overlap.captions

    @property
    def user_id(self) -> str:
        return self.parts[0][0]

    @property
    def ids(self) -> list[str]:
        return [i for _, ids in self.parts for i in ids]


def recaption_of(run: RunSettings, dashscope: DashScopeResource) -> tuple[str, str] | None:
    if not run.recaption:
        return None
    return dashscope.provider.model_label, dashscope.settings.prompt_version


_CALL_COUNTS = ("vision_calls", "embedding_calls", "failed_vision_calls", "failed_embedding_calls")


def calls_made(dashscope: DashScopeResource) -> int:
    """Calls the provider has ended, answered or failed: it moves while calls come back."""
    usage = dashscope.provider.usage.as_dict()
    return sum(usage.get(k, 0) for k in _CALL_COUNTS)


@contextmanager
def progressing(
    context: OpExecutionContext,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    heartbeat: HeartbeatResource,
) -> Iterator[None]:
    """A step of the run, as the heartbeat sees it: progress when it starts and ends, and in
    between whenever the provider ends a call; the run's claims are renewed only while the run
    progresses, so that a stuck run's rows come back (heartbeat.py)."""
    heartbeat.watch("provider calls", lambda: calls_made(dashscope))
    adbpg.store.items.leases.gate(context.run_id, heartbeat.progressing)
    heartbeat.progress()
    try:
        yield
    finally:
        heartbeat.progress()


@contextmanager
def provider_step(
    context: OpExecutionContext,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    state: ChunkState,
    *,
    embedding_step: bool = False,
) -> Iterator[None]:
    """Count the step's token usage into the chunk, and end the run cleanly when the provider
    stops it (an account, key, model or request problem, or the provider given up on after
    throttling or an outage): no row is charged and the run fails without retries (``releasing``
    gives the chunk's claims back). When an embedding model (captions' or images') stopped it,
    the chunk's captions are paid for and written first, without the vectors they lack (counted
    as embedding failures)."""
    provider = dashscope.provider
    before = provider.usage.as_dict()
    try:
        yield
    except FatalProviderError as exc:
        chunk = state.chunk
        written = 0
        image_vectors.drop_images(chunk.items)
        embedding_stop = exc.kind in ("embedding", IMAGE_EMBEDDING)
        if embedding_step and embedding_stop and any(w.caption for w in chunk.items):
            result = stages.write_chunk(
                adbpg.store,
                chunk,
                provenance=dashscope.provenance(),
                embedding_model=provider.embedding_model if state.run.caption_embedding else None,
                run_id=context.run_id,
                image_embedding_model=image_vectors.image_model_name(provider),
            )
            written = result.stats.succeeded
            context.log.warning(
                f"{written} paid caption(s) of the chunk written without embeddings before the stop"
            )
        if not embedding_step:
            # Rows whose paid answers were unusable are charged before the chunk is given back.
            charged = sum(
                len(stages.record_unusable(adbpg.store, part, run_id=context.run_id))
                for part in state.parts or [chunk]
            )
            if charged:
                context.log.warning(
                    f"{charged} row(s) of the chunk charged an attempt: their paid answers had "
                    "no usable caption"
                )
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
    finally:
        for k, v in provider.usage.as_dict().items():
            state.usage[k] = state.usage.get(k, 0) + v - before.get(k, 0)


def release_chunk(state: ChunkState) -> None:
    """The lookahead's way of giving back a chunk it loaded ahead and will not hand on."""
    state.claims.release()


@contextmanager
def releasing(run_state: RunStateResource, state: ChunkState) -> Iterator[None]:
    """A step that fails gives the chunk's claims back, and a provider that stopped the run
    stops the lookahead too."""
    try:
        yield
    except BaseException as exc:
        state.claims.release()
        lookahead = run_state.lookahead
        if lookahead is not None and isinstance(exc, Failure | FatalProviderError):
            lookahead.abort(exc)
        raise


def merged(parts: list[stages.Chunk], worker: str) -> stages.Chunk:
    if len(parts) == 1:
        return parts[0]
    return stages.Chunk(
        user_id=parts[0].user_id if parts else "",
        worker=worker,
        items=[w for p in parts for w in p.items],
        skipped=[i for p in parts for i in p.skipped],
    )


def loader(
    adbpg: AdbpgResource, dashscope: DashScopeResource, heartbeat: HeartbeatResource, worker: str
) -> Callable[[ChunkSpec], ChunkState]:
    """Claim a chunk's rows (user by user) and load each image once."""

    def load(spec: ChunkSpec) -> ChunkState:
        run = spec.run
        recaption = recaption_of(run, dashscope)
        parts: list[stages.Chunk] = []
        claims = ChunkClaims(adbpg.store, worker)
        try:
            for user, ids in spec.parts:
                part = stages.claim_chunk(
                    adbpg.store,
                    user,
                    ids,
                    worker=worker,
                    lease_seconds=run.lease_seconds,
                    max_attempts=run.max_attempts,
                    recaption=recaption,
                    stale=run.on_image_change,
                )
                claims.hold(part)
                parts.append(part)
            chunk = merged(parts, worker)
            stages.visual_attributes(
                chunk,
                policy=dashscope.image_policy,
                max_image_side=dashscope.settings.max_image_side,
                color_count=run.color_count,
                concurrent=run.concurrent,
                vision_model=dashscope.settings.vision_model,
                progress=heartbeat.progress,
                embed_image=image_vectors.image_model_name(dashscope.provider) is not None,
            )
        except BaseException:
            claims.release()
            raise
        heartbeat.progress()
        return ChunkState(chunk, run, claims, parts=parts, index=spec.index)

    return load


def caption_calls(
    adbpg: AdbpgResource, dashscope: DashScopeResource, heartbeat: HeartbeatResource
) -> Callable[[ChunkState], list[Callable[[], None]]]:
    """One call per live item of the chunk, through a broker of its own (cache first, one
    call per distinct image), as ``stages.caption_chunk`` does."""

    def calls(state: ChunkState) -> list[Callable[[], None]]:
        live = state.chunk.live()
        broker = CaptionBroker(
            dashscope.provider,
            adbpg.store.cache,
            dashscope.settings.prompt_version,
            dashscope.question,
        )
        broker.prefetch(w.content_sha256 for w in live if w.content_sha256)
        vocabulary = dashscope.vocabulary

        def one(work: WorkItem) -> bool:
            stages.caption_item(work, broker, vocabulary)
            heartbeat.progress()
            return not work.from_cache  # it reached the provider (or failed trying)

        return [(lambda w=w: one(w)) for w in live]  # type: ignore[misc]

    return calls
