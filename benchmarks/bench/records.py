"""The benchmark's results as typed records: what each scenario measured, and all of them.

``Results`` is what the report is built from and what ``artifacts/bench.json`` holds under
``results`` (the records' fields are its keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.worker.contract import (
    ClientUsage,
    LocalRun,
    SensorRun,
    StageTime,
    StepProfile,
    to_json,
)


@dataclass(frozen=True)
class Call:
    """One request the stand-in server answered (its request log, ``standin_proc stats``)."""

    at: float
    endpoint: str  # "chat" or "embeddings"
    status: int
    image_tokens: int


@dataclass(frozen=True)
class Calls:
    chat: int
    chat_ok: int
    embeddings: int
    throttled_429: int
    chat_429: int
    embeddings_429: int
    total: int


@dataclass(frozen=True)
class RunSetting:
    """One throughput run's setting: engine, size, calls in flight, latency, limits."""

    engine: str  # "cli", "dagster" or "legacy"
    n: int
    concurrent: int
    latency: float
    embedding_latency: float
    batch_size: int
    rpm: int  # the client's limit (DASHSCOPE_RPM); 0: none
    image_size: tuple[int, int]
    rpm_limit: int | None = None  # the stand-in's limit
    per_second: bool = False
    embeddings: bool = True
    overlap: str | None = None  # the Dagster job's ``overlap`` option


def bound(concurrent: int, latency: float, rpm: int) -> float | None:
    """Items per second no engine can beat: C calls in flight of L seconds, or the rate limit."""
    limits = []
    if latency > 0:
        limits.append(concurrent / latency)
    if rpm > 0:
        limits.append(rpm / 60.0)
    return min(limits) if limits else None


@dataclass(frozen=True, kw_only=True)
class ThroughputRun(RunSetting):
    """A throughput run: its setting and what was measured (flat, as ``bench.json`` has it)."""

    bound: float | None  # items/s no engine can beat at this setting (``bound``)
    exit_code: int
    done: int
    complete: bool
    wall_s: float
    items_per_s: float
    cpu_s: float
    cpu_ms_per_item: float
    peak_rss_mb: float
    rss_before_mb: float
    calls: Calls
    share_429: float
    times_429_s: list[float]  # when the 429s came, s after the first call (the first 20)
    image_tokens_per_item_server: float | None
    image_tokens_per_item_client: float | None
    mean_calls_in_flight: float | None
    mean_embedding_calls_in_flight: float | None
    concurrency_use: float | None
    uncaptioned: int
    no_call_in_flight_s: float | None
    usage: ClientUsage
    stages: dict[str, StageTime]
    steps: StepProfile | None = None
    materialization: dict[str, float] | None = None
    report_tail: str | None = None
    ratio_to_bound: float | None = None


@dataclass(frozen=True)
class SensorTick:
    """The sensor's own log line for one tick of the deployment."""

    pending_users: int
    changed: int
    runs: int
    users_requested: int
    ms: int
    database_ms: int
    cursor_bytes: int


@dataclass(frozen=True)
class Spread:
    min: float | None
    max: float | None
    mean: float | None


@dataclass(frozen=True)
class Deployment:
    """What the Dagster instance of the ``users`` scenario holds afterwards."""

    runs: int
    runs_by_status: dict[str, int]
    runs_succeeded: int
    shared_runs: int  # runs over a range of users
    users_per_shared_run: Spread
    partitions_materialized: int
    partitions: int
    sampled_partitions: int
    sampled_with_own_figures: int  # sampled partitions whose metadata is their own


@dataclass(frozen=True)
class CallCount:
    total: int
    throttled_429: int


@dataclass(frozen=True)
class UsersRun:
    """The deployment (``enrich-dagster`` at its defaults) on many users."""

    users: int
    rows: int
    done: int
    uncaptioned: int
    complete: bool
    wall_s: float
    all_captioned_after_s: float | None
    bound_s: float | None  # the quota's own time for these rows
    timeline: list[tuple[float, int]]  # (s since start, rows captioned)
    share_429: float
    calls: CallCount
    ticks: list[SensorTick]
    deployment: Deployment


@dataclass
class Results:
    """Every scenario's records; ``None`` where the scenario did not run."""

    cli: ThroughputRun | None = None
    legacy_same: ThroughputRun | None = None  # the legacy algorithm at the CLI's settings
    dagster: ThroughputRun | None = None
    dagster_overlap: dict[str, ThroughputRun] = field(default_factory=dict)  # by overlap mode
    legacy_defaults: ThroughputRun | None = None
    cli_defaults: ThroughputRun | None = None  # the CLI at the legacy defaults
    memory_small: ThroughputRun | None = None
    memory_large: ThroughputRun | None = None
    dagster_memory_small: ThroughputRun | None = None
    dagster_memory_large: ThroughputRun | None = None
    ratelimit: ThroughputRun | None = None
    local: LocalRun | None = None
    users: UsersRun | None = None
    sensor: SensorRun | None = None

    def to_json(self) -> dict[str, Any]:
        """The scenarios that ran, as JSON-ready data."""
        document: dict[str, Any] = to_json(self)
        return {k: v for k, v in document.items() if v not in (None, {})}
