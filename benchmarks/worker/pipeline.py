"""The pipeline's three engines as workers: ``enrich-captions``, the legacy algorithm, the job."""

from __future__ import annotations

from typing import Any

from benchmarks.worker.contract import CliSpec, DagsterSpec, LegacySpec, PipelineRun, StepProfile
from benchmarks.worker.measure import (
    TailWriter,
    instrument,
    measure,
    provider_usage,
    stage_breakdown,
)


def run_cli(spec: CliSpec) -> PipelineRun:
    from enrich_pipeline.cli import captions as cli

    instrument()
    out = TailWriter()
    code, resources = measure(lambda: cli.main(spec.argv, out=out))
    return PipelineRun(
        resources=resources,
        exit_code=code,
        report_tail=out.text()[-3000:],
        report_lines=out.count,
        usage=provider_usage(),
        stages=stage_breakdown(),
    )


def run_legacy(spec: LegacySpec) -> PipelineRun:
    from benchmarks.legacy import run_legacy as legacy
    from enrich_pipeline.bootstrap import open_runtime
    from enrich_pipeline.settings import Settings

    instrument()

    def go() -> Any:
        runtime = open_runtime(Settings.from_env())
        try:
            return legacy(
                runtime.store,
                runtime.provider,
                runtime.settings.dashscope,
                spec.user,
                batch_size=spec.batch_size,
                concurrent=spec.concurrent,
                max_items=spec.max_items,
                policy=runtime.image_policy,
            )
        finally:
            runtime.close()

    stats, resources = measure(go)
    return PipelineRun(
        resources=resources,
        exit_code=0,
        succeeded=stats.succeeded,
        failed=stats.failed,
        usage=provider_usage(),
        stages=stage_breakdown(),
    )


def enrich_job_definition() -> Any:
    """For ``reconstructable``: the job as a deployment runs it."""
    from enrich_pipeline.defs.definitions import defs

    return defs.resolve_job_def("enrich_job")


def run_dagster(spec: DagsterSpec) -> PipelineRun:
    # ``execute_job``, not ``materialize``: ``materialize`` keeps every step's output for its
    # result object, which a daemon-launched run does not, and would charge that to memory.
    from dagster import DagsterInstance, execute_job, reconstructable

    from enrich_pipeline.defs.partitions import user_to_key

    instrument()
    instance = DagsterInstance.ephemeral()
    key = user_to_key(spec.user)
    instance.add_dynamic_partitions("users", [key])
    run_config = {"ops": {"enriched_items": {"ops": {"pending_rows": {"config": spec.config}}}}}
    job = reconstructable(enrich_job_definition)

    def go() -> Any:
        with execute_job(
            job,
            instance=instance,
            run_config=run_config,
            tags={"dagster/partition": key},
            raise_on_error=False,
        ) as result:
            events = result.get_asset_materialization_events()
            return result.success, result.run_id, events

    (success, run_id, events), resources = measure(go)
    metadata: dict[str, Any] = {}
    for event in events:
        mat = event.event_specific_data.materialization
        metadata = {
            k: v.value for k, v in mat.metadata.items() if isinstance(v.value, int | float | str)
        }
    return PipelineRun(
        resources=resources,
        exit_code=0 if success else 1,
        materialization={k: v for k, v in metadata.items() if not isinstance(v, str)},
        steps=_step_profile(instance, run_id),
        usage=provider_usage(),
        stages=stage_breakdown(),
    )


def _step_profile(instance: Any, run_id: str) -> StepProfile:
    starts: dict[str, float] = {}
    busy: dict[str, float] = {}
    order: list[str] = []
    first_event = None
    first_write = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        first_event = first_event if first_event is not None else entry.timestamp
        op = event.step_key.split("[")[0].rsplit(".", 1)[-1]
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = entry.timestamp
            order.append(op)
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            if event.step_key in starts:
                busy[op] = busy.get(op, 0.0) + entry.timestamp - starts[event.step_key]
            if op == "write_results" and first_write is None:
                first_write = entry.timestamp
    before_first_caption = (
        order[: order.index("captions")].count("visual_attributes") if "captions" in order else 0
    )
    return StepProfile(
        chunks=order.count("visual_attributes"),
        step_seconds={k: round(v, 3) for k, v in busy.items()},
        visual_steps_before_first_caption=before_first_caption,
        first_write_after_s=None
        if first_write is None or first_event is None
        else round(first_write - first_event, 3),
    )
