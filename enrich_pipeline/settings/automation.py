"""The Dagster deployment's sensors, run queue and op pools."""

from __future__ import annotations

from pydantic import Field

from enrich_pipeline.settings.framework import SettingsModel


class AutomationSettings(SettingsModel):
    """The Dagster deployment's sensors, run queue and op pools."""

    sensor_interval: int = Field(
        30,
        description="seconds between ticks of the pending-rows sensor",
        validation_alias="ENRICH_SENSOR_INTERVAL",
        ge=1,
        le=86_400,
    )
    batch_poll_interval: int = Field(
        60,
        description="seconds between polls of open DashScope batches",
        validation_alias="ENRICH_BATCH_POLL_INTERVAL",
        ge=1,
        le=86_400,
    )
    overview_interval: int = Field(
        300,
        description=(
            "seconds between ticks of the items_table sensor, which reads the whole items "
            "table (5-10 s a million rows on a busy 2-core machine, benchmarks/overview.py) "
            "only when a run ended, the tables changed or an hour passed, and observes it "
            "when a figure changed"
        ),
        validation_alias="ENRICH_OVERVIEW_INTERVAL",
        ge=1,
        le=86_400,
    )
    overview_in_run_ms: int = Field(
        1000,
        description=(
            "a run observes the items_table itself at its end while the last pass over the "
            "table took at most this many ms (about 100,000 rows here); above it, or 0, the "
            "items_table sensor observes it once for every run that ended meanwhile"
        ),
        validation_alias="ENRICH_OVERVIEW_IN_RUN_MS",
        ge=0,
        le=600_000,
    )
    max_concurrent_runs: int = Field(
        4,
        description="runs at once in the Dagster queue",
        validation_alias="ENRICH_MAX_CONCURRENT_RUNS",
        ge=1,
        le=100,
    )
    dashscope_pool_slots: int = Field(
        4,
        description="caption/embedding steps at once",
        validation_alias="ENRICH_DASHSCOPE_POOL_SLOTS",
        ge=1,
        le=100,
    )
    adbpg_pool_slots: int = Field(
        8,
        description="claim/write steps at once",
        validation_alias="ENRICH_ADBPG_POOL_SLOTS",
        ge=1,
        le=100,
    )
    rerun_backoff: int = Field(
        60,
        description=(
            "seconds the sensor waits before requesting again a user whose run ended without "
            "finishing its rows (failed, canceled, killed, stopped by the provider); doubled "
            "after each such run in a row"
        ),
        validation_alias="ENRICH_RERUN_BACKOFF",
        ge=1,
        le=86_400,
    )
    rerun_backoff_max: int = Field(
        1800,
        description="longest wait before a user's rows are requested again after such runs",
        validation_alias="ENRICH_RERUN_BACKOFF_MAX",
        ge=1,
        le=7 * 86_400,
    )

    def rerun_wait(self, unfinished: int) -> int:
        """Seconds to wait after the ``unfinished``-th run in a row that left a user's rows."""
        if unfinished <= 0:
            return 0
        return min(self.rerun_backoff_max, self.rerun_backoff * 2 ** min(unfinished - 1, 30))
