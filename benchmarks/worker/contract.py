"""What a benchmark worker is asked (specs) and what it answers (typed records).

The parent (``benchmarks.bench``) and the worker run in different processes, so both sides go
through JSON: ``to_json`` on the way out, ``parse`` (pydantic) on the way in, which checks every
field's type instead of trusting a string-keyed dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, TypeAdapter

RESULT_PREFIX = "BENCH_RESULT "
T = TypeVar("T")


# --- specs: one per kind of worker ----------------------------------------------------------


@dataclass(frozen=True)
class CliSpec:
    """``enrich-captions`` with these flags."""

    argv: list[str]
    kind: Literal["cli"] = "cli"


@dataclass(frozen=True)
class DagsterSpec:
    """The ``enrich_job`` on one user's partition, with this ``pending_rows`` config."""

    user: str
    config: dict[str, Any]
    kind: Literal["dagster"] = "dagster"


@dataclass(frozen=True)
class LegacySpec:
    """The legacy script's algorithm (``benchmarks/legacy.py``)."""

    user: str
    batch_size: int
    concurrent: int
    max_items: int
    kind: Literal["legacy"] = "legacy"


@dataclass(frozen=True)
class LocalSpec:
    """Local CPU per 1600x1200 photo, and the tokens of a 4000x3000 one."""

    folder: str
    count: int
    rounds: int
    kind: Literal["local"] = "local"


@dataclass(frozen=True)
class SensorSpec:
    """The sensor's tick on a seeded table of ``rows`` rows, one in ``pending_every`` pending."""

    rows: int
    users: int
    pending_every: int
    ticks: int
    kind: Literal["sensor"] = "sensor"


Spec = Annotated[
    CliSpec | DagsterSpec | LegacySpec | LocalSpec | SensorSpec, Field(discriminator="kind")
]
_SPEC: TypeAdapter[Spec] = TypeAdapter(Spec)


def parse_spec(document: str) -> Spec:
    return _SPEC.validate_json(document)


# --- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """Wall time, CPU time and memory of one measured call (``getrusage`` of the worker)."""

    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    cpu_s: float
    rss_before_kb: int
    peak_rss_before_kb: int
    peak_rss_kb: int
    rss_after_kb: int


@dataclass(frozen=True)
class ClientUsage:
    """The DashScope providers' own counts, summed over every provider the run built."""

    vision_calls: int = 0
    embedding_calls: int = 0
    failed_vision_calls: int = 0
    failed_embedding_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    image_tokens: int = 0
    total_tokens: int = 0
    limiter_waited_s: float = 0.0
    providers: int = 0


@dataclass(frozen=True)
class StageTime:
    seconds: float
    calls: int


@dataclass(frozen=True)
class StepProfile:
    """Where a Dagster run spent its time, and in which order the chunk steps ran."""

    chunks: int
    step_seconds: dict[str, float]  # by op name
    visual_steps_before_first_caption: int
    first_write_after_s: float | None


@dataclass(frozen=True)
class PipelineRun:
    """A ``cli``, ``legacy`` or ``dagster`` worker's answer."""

    resources: Resources
    exit_code: int
    usage: ClientUsage
    stages: dict[str, StageTime]  # by stage function name
    report_tail: str | None = None  # cli: the end of the command's report
    report_lines: int | None = None
    succeeded: int | None = None  # legacy
    failed: int | None = None
    materialization: dict[str, float] | None = None  # dagster: the numeric metadata
    steps: StepProfile | None = None


@dataclass(frozen=True)
class CpuParts:
    """Milliseconds per photo: the whole (CPU and wall) and each part (CPU)."""

    wall_ms: float
    cpu_ms: float
    load_ms: float
    colors_ms: float
    vision_ms: float
    tags_ms: float


@dataclass(frozen=True)
class PhotoTokens:
    width: int
    height: int
    sent: tuple[int, int]
    tokens: int
    full_tokens: int
    ratio: float

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class LocalRun:
    """A ``local`` worker's answer: medians per photo, and the tokens of photos as sent."""

    samples: int
    median: CpuParts
    median_one_thread: CpuParts  # scikit-learn's OpenMP pool limited to one thread
    thread_pools: list[int | None]
    max_side: int
    tokens: list[PhotoTokens] = field(default_factory=list)
    exit_code: int = 0


@dataclass(frozen=True)
class SensorRun:
    """A ``sensor`` worker's answer."""

    rows: int
    pending_rows: int
    pending_users: int
    run_requests: int
    seed_s: float
    setup_s: float
    tick_cold_ms: list[float]
    tick_steady_ms: list[float]
    fingerprints_ms: list[float]
    explain: list[str]
    index_name: str
    index_used: bool
    exit_code: int = 0


Answer = PipelineRun | LocalRun | SensorRun


def to_json(record: Any) -> Any:
    """A record (or a spec) as JSON-ready data."""
    return TypeAdapter(type(record)).dump_python(record, mode="json")


def parse(kind: type[T], data: Any) -> T:
    """``data`` (from JSON) as a ``kind`` record, every field checked."""
    return TypeAdapter(kind).validate_python(data)
