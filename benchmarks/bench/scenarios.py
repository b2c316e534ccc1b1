"""The scenarios (``--scenarios``): which runs each one makes, at the plan's sizes."""

from __future__ import annotations

import dataclasses
import uuid

from benchmarks.bench.deployment import users
from benchmarks.bench.harness import Bench
from benchmarks.bench.plan import LEGACY_BATCH, LEGACY_CONCURRENT, OVERLAP_MODES
from benchmarks.bench.records import Results, RunSetting
from benchmarks.bench.throughput import throughput
from benchmarks.worker.contract import LocalRun, LocalSpec, SensorRun, SensorSpec


def run_scenarios(bench: Bench) -> Results:
    p = bench.plan
    results = Results()
    wanted = set(p.scenarios)
    # The quota (DASHSCOPE_RPM, 1,200 a minute by default) is enforced by the stand-in as
    # DashScope does: per minute, and per second (RPS = RPM / 60) unless --no-per-second.
    main = RunSetting(
        engine="cli",
        n=p.n,
        concurrent=p.concurrent,
        latency=p.latency,
        embedding_latency=p.embedding_latency,
        batch_size=p.batch_size,
        rpm=p.rpm,
        image_size=p.image_size,
        rpm_limit=p.rpm or None,
        per_second=p.per_second,
    )
    replace = dataclasses.replace
    if "cli" in wanted:
        bench.say(
            f"[cli] N={p.n}, C={p.concurrent}, L={p.latency:g} s (embeddings "
            f"{p.embedding_latency:g} s), batch {p.batch_size}"
        )
        results.cli = throughput(bench, main)
        results.legacy_same = throughput(bench, replace(main, engine="legacy", n=p.legacy_n))
    if "dagster" in wanted:
        bench.say(f"[dagster] N={p.n}, C={p.concurrent}, L={p.latency:g} s")
        results.dagster = throughput(bench, replace(main, engine="dagster"))
    if "dagster-overlap" in wanted:
        for mode in OVERLAP_MODES:
            if mode == "captions" and results.dagster is not None:
                results.dagster_overlap[mode] = results.dagster  # the default: already run
                continue
            bench.say(f"[dagster-overlap] overlap={mode}, N={p.n}, C={p.concurrent}")
            results.dagster_overlap[mode] = throughput(
                bench, replace(main, engine="dagster", overlap=mode)
            )
    if "legacy" in wanted:
        bench.say(
            f"[legacy] both at the legacy defaults (batch {LEGACY_BATCH}, "
            f"concurrent {LEGACY_CONCURRENT}), L={p.latency:g} s"
        )
        defaults = replace(
            main, concurrent=LEGACY_CONCURRENT, batch_size=LEGACY_BATCH, n=p.legacy_defaults_n
        )
        results.legacy_defaults = throughput(bench, replace(defaults, engine="legacy"))
        results.cli_defaults = throughput(bench, defaults)
    for scenario, engine in (("memory", "cli"), ("dagster-memory", "dagster")):
        if scenario not in wanted:
            continue
        bench.say(
            f"[{scenario}] {engine} at N={p.memory_n[0]} and N={p.memory_n[1]}, "
            f"L={p.memory_latency:g} s, {p.memory_image_size[0]}x{p.memory_image_size[1]}"
        )
        small, large = (
            throughput(
                bench,
                RunSetting(
                    engine=engine,
                    n=n,
                    concurrent=p.concurrent,
                    latency=p.memory_latency,
                    embedding_latency=p.memory_latency,
                    batch_size=p.batch_size,
                    rpm=0,
                    image_size=p.memory_image_size,
                ),
            )
            for n in p.memory_n
        )
        if engine == "cli":
            results.memory_small, results.memory_large = small, large
        else:
            results.dagster_memory_small, results.dagster_memory_large = small, large
    if "ratelimit" in wanted:
        # DashScope limits each model on its own, and so do the client (DASHSCOPE_RPM for
        # captions, DASHSCOPE_EMBEDDING_RPM for embeddings) and the stand-in.
        rate = p.ratelimit_rpm / 60.0
        n = max(10, int(p.ratelimit_seconds * rate))  # captions pace the run
        bench.say(
            f"[ratelimit] stand-in limit {p.ratelimit_rpm} rpm, DASHSCOPE_RPM "
            f"{p.ratelimit_rpm}, C={p.ratelimit_concurrent}, N={n}"
        )
        results.ratelimit = throughput(
            bench,
            RunSetting(
                engine="cli",
                n=n,
                concurrent=p.ratelimit_concurrent,
                latency=p.ratelimit_latency,
                embedding_latency=p.ratelimit_latency,
                batch_size=p.batch_size,
                rpm=p.ratelimit_rpm,
                image_size=p.image_size,
                rpm_limit=p.ratelimit_rpm,
                embeddings=not p.ratelimit_captions_only,
                per_second=p.per_second,
            ),
        )
    if wanted & {"tokens", "cpu"}:
        bench.say(
            f"[cpu/tokens] {p.cpu_images} photos of 1600x1200 x {p.cpu_rounds} rounds, "
            "one of 4000x3000"
        )
        spec = LocalSpec(folder=str(bench.tmp / "photos"), count=p.cpu_images, rounds=p.cpu_rounds)
        results.local = bench.worker(spec, LocalRun, {})
    if "users" in wanted:
        results.users = users(bench, p)
    if "sensor" in wanted:
        bench.say(f"[sensor] {p.sensor_rows:,} rows, 1% pending, {p.sensor_ticks} ticks")
        namespace = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            results.sensor = bench.worker(
                SensorSpec(rows=p.sensor_rows, users=100, pending_every=100, ticks=p.sensor_ticks),
                SensorRun,
                {"ADBPG_URL": bench.database_url, "ADBPG_NAMESPACE": namespace},
            )
        finally:
            bench.drop(namespace)
    return results
