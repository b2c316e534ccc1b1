"""The code location: the enrichment asset, its job and sensor, resources from the environment."""

from dagster import Definitions, in_process_executor

from enrich_pipeline.assets import enriched_items
from enrich_pipeline.batch_dagster import BATCH_JOBS, BATCH_SENSORS
from enrich_pipeline.checks import embedding_dimensions, no_unrecorded_pending_rows
from enrich_pipeline.handoff import handoff_io_manager
from enrich_pipeline.jobs import enrich_job
from enrich_pipeline.ops import CHUNK_IO
from enrich_pipeline.resources.adbpg import AdbpgResource
from enrich_pipeline.resources.dashscope import DashScopeResource
from enrich_pipeline.sensors import pending_rows_sensor

defs = Definitions(
    assets=[enriched_items],
    asset_checks=[no_unrecorded_pending_rows, embedding_dimensions],
    jobs=[enrich_job, *BATCH_JOBS],
    sensors=[pending_rows_sensor, *BATCH_SENSORS],
    resources={
        "adbpg": AdbpgResource(),
        "dashscope": DashScopeResource(),
        CHUNK_IO: handoff_io_manager,
    },
    executor=in_process_executor,
)
