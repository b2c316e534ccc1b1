"""Run configuration as the launchpad shows it, with defaults, bounds and help from the
settings tree, and the deployment's automation settings read once at load time.

A junk environment value must not stop the code location from loading: it is reported as one
``error:`` line naming the variable, the defaults are used for the definitions, and the run or
tick that reads the value again fails (or skips) with the same line.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, TypeVar

from dagster import Config
from pydantic import BaseModel, Field

from enrich_pipeline.pipeline.lookahead import Overlap
from enrich_pipeline.settings import (
    DAGSTER_BATCH_SIZE,
    AutomationSettings,
    BatchSettings,
    ConfigError,
    RunSettings,
    SettingsModel,
    bounds,
    describe,
)

M = TypeVar("M", bound=BaseModel)


def loaded(model: type[M]) -> M:
    """``model`` from the environment, or its defaults with one error line when a value is bad."""
    try:
        return model.from_env()  # type: ignore[attr-defined,no-any-return]
    except ConfigError as exc:
        print(f"error: {exc} (using the default until it is fixed)", file=sys.stderr)
        return model()


class DagsterSettings(SettingsModel):
    """Settings of the Dagster layer only: how the sensor groups users into runs, when the
    failure check warns, how a dead run is noticed."""

    bundle_rows: int = Field(
        2000,
        description="a user with fewer pending rows than this shares a run with other such "
        "users, up to this many rows a run (one run per user above it)",
        validation_alias="ENRICH_BUNDLE_ROWS",
        ge=1,
        le=1_000_000,
    )
    bundle_users: int = Field(
        1000,
        description="user partitions in one shared run at most",
        validation_alias="ENRICH_BUNDLE_USERS",
        ge=1,
        le=5000,
    )
    runs_per_tick: int = Field(
        0,
        description="runs one sensor tick requests at most (0: twice "
        "ENRICH_MAX_CONCURRENT_RUNS, less the runs already queued or running)",
        validation_alias="ENRICH_SENSOR_MAX_RUNS",
        ge=0,
        le=10_000,
    )
    sensor_concurrent: int = Field(
        16,
        description="model calls in flight in each run the sensor requests",
        validation_alias="ENRICH_SENSOR_CONCURRENT",
        ge=1,
        le=256,
    )
    failure_share_warn: float = Field(
        0.1,
        description="the failure check warns when more than this share of a user's attempted "
        "rows failed",
        validation_alias="ENRICH_FAILURE_SHARE_WARN",
        ge=0.0,
        le=1.0,
    )
    heartbeat_interval: float = Field(
        10.0,
        description="seconds between a run's heartbeats",
        validation_alias="ENRICH_RUN_HEARTBEAT_INTERVAL",
        gt=0,
        le=3600,
    )
    heartbeat_timeout: float = Field(
        90.0,
        description="seconds without a heartbeat after which run monitoring fails a run as dead",
        validation_alias="ENRICH_RUN_HEARTBEAT_TIMEOUT",
        gt=0,
        le=86_400,
    )


RUN = loaded(RunSettings)
AUTOMATION = loaded(AutomationSettings)
# Read at load time for the definitions; what runs, ticks and checks use is read again when
# they run (``dagster_settings()``), like every other setting.
DAGSTER = loaded(DagsterSettings)


def dagster_settings() -> DagsterSettings:
    """The Dagster layer's settings as the environment has them now."""
    return loaded(DagsterSettings)


def field_of(model: type[BaseModel], name: str, default: Any, note: str = "") -> Any:
    """A config field with the setting's description and bounds; ``default`` is the effective
    one (the environment's, where the setting has a variable)."""
    info = model.model_fields[name]
    return Field(default=default, description=describe(model, name) + note, **bounds(info))


class EnrichConfig(Config):
    """Run configuration of one user partition (launchpad:
    ``ops.enriched_items.ops.pending_rows.config``)."""

    batch_size: int = field_of(
        RunSettings,
        "batch_size",
        DAGSTER_BATCH_SIZE,
        f"; {DAGSTER_BATCH_SIZE} here, not the CLI's 10: every chunk is five steps",
    )
    max_items: int | None = field_of(RunSettings, "max_items", None, "; here: every pending row")
    concurrent: int = field_of(RunSettings, "concurrent", RUN.concurrent)
    caption_embedding: bool = field_of(RunSettings, "caption_embedding", RUN.caption_embedding)
    max_attempts: int = field_of(RunSettings, "max_attempts", RUN.max_attempts)
    lease_seconds: int = field_of(RunSettings, "lease_seconds", RUN.lease_seconds)
    retry_failed: bool = Field(
        default=False,
        description="forget the user's recorded failures first, so those rows are tried again",
    )
    recaption: bool = field_of(
        RunSettings, "recaption", False, "; each old caption stays until its new one is written"
    )
    on_image_change: Literal["recaption", "flag", "ignore"] = field_of(
        RunSettings, "on_image_change", RUN.on_image_change
    )
    overlap: Overlap = Field(
        default=Overlap.captions,
        description=(
            "how far the run works ahead of its steps: 'captions' (default: the next chunk is "
            "loaded and its caption calls queued while this one finishes, so calls stay in "
            "flight between chunks), 'load' (only the next chunk's claim and images), 'none' "
            "(strictly one step at a time)"
        ),
    )

    def run_settings(self) -> RunSettings:
        values = self.model_dump(exclude={"retry_failed", "overlap"})
        return RunSettings.build(values, {k: f"config.{k}" for k in values})


_BATCH = BatchSettings()


class BatchSubmitConfig(Config):
    """Run configuration of ``batch_submit_job`` (launchpad: ``ops.batch_submit.config``)."""

    user_id: str | None = Field(
        default=None, description="the user to submit; default: the run's partition"
    )
    max_items: int | None = field_of(BatchSettings, "max_items", None)
    max_attempts: int = field_of(RunSettings, "max_attempts", RUN.max_attempts)
    caption_embedding: bool = field_of(RunSettings, "caption_embedding", True)
    concurrent: int = field_of(RunSettings, "concurrent", RUN.concurrent, "; images loaded at once")
    on_image_change: Literal["recaption", "flag", "ignore"] = field_of(
        RunSettings,
        "on_image_change",
        RUN.on_image_change,
        "; batches take stale rows only with recaption",
    )
    max_lines: int = field_of(BatchSettings, "max_lines", _BATCH.max_lines)
    max_bytes: int = field_of(BatchSettings, "max_bytes", _BATCH.max_bytes)
    lease_seconds: int = field_of(BatchSettings, "lease_seconds", _BATCH.lease_seconds)

    def batch_settings(self) -> BatchSettings:
        names = ("max_items", "max_lines", "max_bytes", "lease_seconds")
        return BatchSettings.build(
            {n: getattr(self, n) for n in names}, {n: f"config.{n}" for n in names}
        )

    def run_settings(self) -> RunSettings:
        names = ("max_attempts", "caption_embedding", "concurrent", "on_image_change")
        return RunSettings.build(
            {n: getattr(self, n) for n in names}, {n: f"config.{n}" for n in names}
        )


class BatchCollectConfig(Config):
    """Run configuration of ``batch_collect_job`` (the sensor fills it in)."""

    batch: str = Field(description="our local batch id or DashScope's batch id")
