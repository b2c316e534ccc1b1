"""The code location: the enrichment asset, its job, checks and sensors, batch mode's jobs and
sensor, and the resources."""

import os

from dagster import Definitions, EnvVar, in_process_executor

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.batch import BATCH_JOBS, BATCH_SENSORS
from enrich_pipeline.defs.checks import (
    embedding_dimensions,
    failure_share,
    no_unrecorded_pending_rows,
)
from enrich_pipeline.defs.heartbeat import HeartbeatResource
from enrich_pipeline.defs.io_managers import CHUNK_IO, handoff_io_manager, run_memory_io_manager
from enrich_pipeline.defs.jobs import enrich_job
from enrich_pipeline.defs.overview import items_table, items_table_sensor
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.defs.run_state import RunStateResource
from enrich_pipeline.defs.sensors import pending_rows_sensor


def _secret(variable: str) -> EnvVar | None:
    """The variable as an ``EnvVar`` (the UI names it, never shows it) when it is set; unset,
    the field stays empty and the settings tree decides (offline demo, or one error line)."""
    return EnvVar(variable) if os.environ.get(variable) else None


defs = Definitions(
    assets=[enriched_items, items_table],
    asset_checks=[no_unrecorded_pending_rows, embedding_dimensions, failure_share],
    jobs=[enrich_job, *BATCH_JOBS],
    sensors=[pending_rows_sensor, items_table_sensor, *BATCH_SENSORS],
    resources={
        "adbpg": AdbpgResource(url=_secret("ADBPG_URL"), password=_secret("ADBPG_PASSWORD")),
        "dashscope": DashScopeResource(api_key=_secret("DASHSCOPE_API_KEY")),
        # The run's own: a fresh state for its steps, and a heartbeat while it progresses.
        "run_state": RunStateResource(),
        "heartbeat": HeartbeatResource(),
        CHUNK_IO: handoff_io_manager,
        "io_manager": run_memory_io_manager,
    },
    executor=in_process_executor,
)
