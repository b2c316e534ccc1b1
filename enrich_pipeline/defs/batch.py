"""Batch mode in Dagster: a job that submits a user's backfill to DashScope's Batch API, a sensor
that polls the open batches, and a job that collects each batch that has ended.

The state lives in the database (``db/batches.py``), not in Dagster: a run or a daemon
that dies loses nothing, and the command line (``enrich-batch``) sees and
acts on the same batches.

- ``batch_submit_job``: one op, partitioned by the ``users`` partitions (launch it for a
  partition, or give ``user_id`` in config); claims the user's pending rows and submits them.
- ``batch_poll_sensor`` (on by default, every ``ENRICH_BATCH_POLL_INTERVAL`` seconds, 60):
  refreshes every open batch's status (renewing the claims of those still running) and requests
  one ``batch_collect_job`` run per batch that has ended, with the provider's batch id as the
  run key. A collect run that failed is requested again on a later tick (``<batch id>|retry-N``,
  since Dagster remembers run keys forever); one queued or running is left alone.
- ``batch_collect_job``: downloads the batch's results and writes them back; collecting is
  idempotent, so a retried or duplicated run writes nothing twice.
"""

import psycopg
from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    Failure,
    MetadataValue,
    OpExecutionContext,
    Output,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    in_process_executor,
    job,
    op,
    sensor,
)

from enrich_pipeline.db.batches import BatchRecord
from enrich_pipeline.defs.config import AUTOMATION, BatchCollectConfig, BatchSubmitConfig
from enrich_pipeline.defs.heartbeat import HeartbeatResource
from enrich_pipeline.defs.partitions import key_to_user, users_partitions
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.defs.runs import IN_FLIGHT, retry_later
from enrich_pipeline.pipeline.batch.collect import collect_batch
from enrich_pipeline.pipeline.batch.poll import open_batches, poll_batches
from enrich_pipeline.pipeline.batch.submit import submit_batch
from enrich_pipeline.providers.base import FatalProviderError, ProviderError
from enrich_pipeline.providers.batch_api import BatchError
from enrich_pipeline.settings import ConfigError, DashScopeSettings

BATCH_TAG = "enrich/batch"


@op(pool="adbpg")
def batch_submit(
    context: OpExecutionContext,
    config: BatchSubmitConfig,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    heartbeat: HeartbeatResource,  # beats while the run's process lives (no progress signal)
) -> Output[dict]:
    """Claim the user's pending rows and submit their captions to the Batch API."""
    if config.user_id is not None:
        user = config.user_id
    elif context.has_partition_key:
        user = key_to_user(context.partition_key)
    else:
        raise Failure("batch_submit needs a user: launch it for a partition or set user_id")
    store = adbpg.store
    try:
        result = submit_batch(
            store,
            dashscope.settings,
            user,
            provider=dashscope.provider,
            vocabulary=dashscope.vocabulary,
            policy=dashscope.image_policy,
            batch=config.batch_settings(),
            run=config.run_settings(),
            run_id=context.run_id,
        )
    except (ConfigError, BatchError, FatalProviderError) as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc
    parts = [{"batch": p.ref, "lines": p.lines, "status": p.status} for p in result.parts]
    if result.format_note:
        context.log.warning(result.format_note)
    context.log.info(
        f"user {user!r}: {result.queued} item(s) submitted in {len(parts)} batch(es), "
        f"{result.stale} of them stale (image changed since captioned); "
        f"{result.direct.succeeded} written from the caption cache, "
        f"{result.direct.failed} failed before submission"
    )
    summary = {
        "user_id": user,
        "submission_id": result.submission_id,
        "queued": result.queued,
        "stale": result.stale,
        "lines": result.lines,
        "answer_format": result.answer_format,
        "batches": parts,
        "written_from_cache": result.direct.succeeded,
        "failed_before_submission": result.direct.failed,
        "skipped": len(result.skipped),
    }
    return Output(
        summary,
        metadata={
            "user_id": user,
            "submission_id": result.submission_id,
            "queued": result.queued,
            "stale": result.stale,
            "answer_format": result.answer_format,
            "batches": MetadataValue.json(parts),
            "written_from_cache": result.direct.succeeded,
            "failed_before_submission": result.direct.failed,
        },
    )


@job(
    partitions_def=users_partitions,
    executor_def=in_process_executor,
    description="Submit a user's caption backfill to DashScope's Batch API (half price, 24 h).",
)
def batch_submit_job():
    batch_submit()


@op(pool="adbpg")
def batch_collect(
    context: OpExecutionContext,
    config: BatchCollectConfig,
    adbpg: AdbpgResource,
    dashscope: DashScopeResource,
    heartbeat: HeartbeatResource,  # beats while the run's process lives (no progress signal)
) -> Output[dict]:
    """Download an ended batch's answers and write them back (idempotent)."""
    try:
        result = collect_batch(
            adbpg.store,
            dashscope.settings,
            config.batch,
            provider=dashscope.provider,
            vocabulary=dashscope.vocabulary,
            run_id=context.run_id,
        )
    except (ConfigError, BatchError, FatalProviderError) as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc
    record, s = result.batch, result.stats
    if result.already:
        context.log.info(f"batch {record.ref} is already {record.state}: nothing to do")
    elif result.busy:
        context.log.info(f"batch {record.ref}: another collector is at work on it")
    if result.format_step:
        context.log.warning(result.format_step)
    summary = {
        "batch": record.ref,
        "user_id": record.user_id,
        "status": record.status,
        "state": record.state,
        **s.summary(),
        "released": result.released,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "unknown_token_lines": result.unknown_token_lines,
        "answer_format": record.answer_format,
        "next_format": record.next_format,
    }
    metadata = {k: v for k, v in summary.items() if k != "errors"}
    metadata["success_rate"] = MetadataValue.float(summary["success_rate"])
    metadata["errors"] = MetadataValue.json(s.errors)
    metadata["sample_captions"] = MetadataValue.md("\n".join(f"- {c}" for c in s.samples) or "-")
    return Output(summary, metadata={k: v for k, v in metadata.items() if v is not None})


@job(
    executor_def=in_process_executor,
    description="Write back the answers of one DashScope batch that has ended.",
)
def batch_collect_job():
    batch_collect()


def _collect_request(context: SensorEvaluationContext, record: BatchRecord) -> RunRequest | None:
    """A collect run for the batch, unless one is queued, running or succeeded already."""
    runs = context.instance.get_runs(
        filters=RunsFilter(job_name=batch_collect_job.name, tags={BATCH_TAG: record.local_id})
    )
    if any(r.status in IN_FLIGHT or r.status == DagsterRunStatus.SUCCESS for r in runs):
        return None
    retry = len(runs)  # every earlier run failed or was cancelled
    return RunRequest(
        run_key=record.ref if retry == 0 else f"{record.ref}|retry-{retry}",
        run_config={"ops": {"batch_collect": {"config": {"batch": record.local_id}}}},
        tags={BATCH_TAG: record.local_id, "enrich/user": record.user_id},
    )


@sensor(
    job=batch_collect_job,
    minimum_interval_seconds=AUTOMATION.batch_poll_interval,
    default_status=DefaultSensorStatus.RUNNING,
    description="Polls open DashScope batches and requests a collect run for each that ended.",
)
def batch_poll_sensor(context: SensorEvaluationContext, adbpg: AdbpgResource):
    # DashScope settings come from the environment, as the resources' do by default, so that
    # a tick never builds (or needs) a provider when no batch is open.
    try:
        store = adbpg.store
        if not open_batches(store):
            return SkipReason("no open batch")
        ready = poll_batches(
            store,
            DashScopeSettings.from_env(),
            on_error=lambda rec, exc: context.log.warning(f"batch {rec.ref}: {exc}"),
        )
        still_open = open_batches(store)
    except (psycopg.Error, ConfigError) as exc:
        return retry_later("cannot poll", exc)
    except ProviderError as exc:  # a bad key, or DashScope away after retries
        return SkipReason(f"DashScope did not answer the poll, will retry: {exc}")
    requests = [r for r in (_collect_request(context, rec) for rec in ready) if r is not None]
    if requests:
        return SensorResult(run_requests=requests)
    waiting = sorted({rec.status or rec.state for rec in still_open})
    return SkipReason(
        f"{len(still_open)} batch(es) open ({', '.join(waiting)}); "
        f"{len(ready)} ended with a collect run already requested"
        if ready
        else f"{len(still_open)} batch(es) open ({', '.join(waiting) or '-'}), none ended yet"
    )


BATCH_JOBS = [batch_submit_job, batch_collect_job]
BATCH_SENSORS = [batch_poll_sensor]
