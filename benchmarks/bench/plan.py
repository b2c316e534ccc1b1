"""What a benchmark run does: its scenarios and every size, from the flags (``Plan``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

SCENARIOS = ("cli", "dagster", "legacy", "memory", "ratelimit", "tokens", "cpu", "sensor")
EXTRA_SCENARIOS = ("dagster-memory", "dagster-overlap", "users")  # only when asked for: long
OVERLAP_MODES = ("none", "load", "captions")
API_KEY = "sk-bench-0123456789"
USER = "bench-user"
DEFAULT_RPM = 1200  # DASHSCOPE_RPM's default, DashScope's usual qwen-vl quota
LEGACY_BATCH, LEGACY_CONCURRENT = 10, 5


@dataclass
class Plan:
    quick: bool
    scenarios: list[str]
    n: int
    concurrent: int
    latency: float
    embedding_latency: float
    per_second: bool
    batch_size: int
    rpm: int
    image_size: tuple[int, int]
    legacy_n: int
    legacy_defaults_n: int
    memory_n: tuple[int, int]
    memory_latency: float
    memory_image_size: tuple[int, int]
    ratelimit_rpm: int
    ratelimit_seconds: float
    ratelimit_concurrent: int
    ratelimit_latency: float
    ratelimit_captions_only: bool
    sensor_rows: int
    sensor_ticks: int
    cpu_images: int
    cpu_rounds: int
    users: int
    users_timeout: float

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Plan:
        q = a.quick
        n = a.n or (200 if q else 2000)
        batch = a.batch_size or (50 if q else 200)
        memory = tuple(int(x) for x in a.memory_n.split(",")) if a.memory_n else None
        scenarios = [s.strip() for s in a.scenarios.split(",")] if a.scenarios else [*SCENARIOS]
        unknown = sorted(set(scenarios) - set(SCENARIOS) - set(EXTRA_SCENARIOS))
        if unknown:
            raise SystemExit(
                f"unknown scenario(s): {', '.join(unknown)}; "
                f"use {', '.join(SCENARIOS + EXTRA_SCENARIOS)}"
            )
        return cls(
            quick=q,
            scenarios=scenarios,
            n=n,
            concurrent=a.concurrent,
            latency=a.latency if a.latency is not None else (0.5 if q else 2.0),
            embedding_latency=(
                a.embedding_latency if a.embedding_latency is not None else (0.1 if q else 0.3)
            ),
            per_second=not a.no_per_second,
            batch_size=batch,
            rpm=a.rpm,
            image_size=(256, 192),
            legacy_n=a.legacy_n or min(n, 3 * batch),
            legacy_defaults_n=a.legacy_defaults_n or (50 if q else 200),
            memory_n=memory or ((200, 2000) if q else (1000, 20000)),  # type: ignore[arg-type]
            memory_latency=a.memory_latency,
            memory_image_size=(64, 48),
            ratelimit_rpm=a.ratelimit_rpm or (300 if q else 600),
            ratelimit_seconds=a.ratelimit_seconds or (20.0 if q else 75.0),
            ratelimit_concurrent=32,
            ratelimit_latency=0.05,
            ratelimit_captions_only=a.ratelimit_captions_only,
            sensor_rows=a.sensor_rows or (100_000 if q else 1_000_000),
            sensor_ticks=a.sensor_ticks or (5 if q else 10),
            cpu_images=a.cpu_images or (6 if q else 12),
            cpu_rounds=a.cpu_rounds or (2 if q else 3),
            users=a.users or (500 if q else 10_000),
            users_timeout=a.users_timeout,
        )
