"""The report: every figure, its bound or target, and PASS/MISS, built from the typed results.

One function per section of the printed table; each reads the records of its own scenario.
"""

from __future__ import annotations

import statistics

from benchmarks.bench.plan import LEGACY_BATCH, LEGACY_CONCURRENT, OVERLAP_MODES, Plan
from benchmarks.bench.records import Results, ThroughputRun, UsersRun, bound
from benchmarks.bench.table import Figure, Report, pass_or_miss
from benchmarks.worker.contract import LocalRun, SensorRun


def build_report(plan: Plan, results: Results) -> Report:
    report = Report()
    _throughput(report, plan, results)
    _overlap(report, plan, results)
    if results.users is not None:
        _users(report, plan, results.users)
    if results.legacy_defaults is not None and results.cli_defaults is not None:
        _legacy_defaults(report, plan, results, results.legacy_defaults, results.cli_defaults)
    for engine, small, large, target in (
        ("CLI", results.memory_small, results.memory_large, True),
        ("Dagster", results.dagster_memory_small, results.dagster_memory_large, False),
    ):
        if small is not None and large is not None:
            _memory(report, plan, engine, small, large, target)
    if results.ratelimit is not None:
        _ratelimit(report, results.ratelimit)
    if results.local is not None:
        if "tokens" in plan.scenarios:
            _tokens(report, results, results.local)
        if "cpu" in plan.scenarios:
            _cpu(report, results.local)
    if results.sensor is not None:
        _sensor(report, results.sensor)
    return report


def _setting(plan: Plan) -> str:
    return (
        f"N={plan.n}, C={plan.concurrent}, L={plan.latency:g} s (embeddings "
        f"{plan.embedding_latency:g} s), batch {plan.batch_size}, quota {plan.rpm} rpm"
        + (" enforced per second" if plan.per_second else "")
    )


def _throughput_figures(
    report: Report, section: str, name: str, r: ThroughputRun, target: float | None
) -> None:
    b = r.bound
    ratio = r.items_per_s / b if b else None
    bound_text = ""
    if b:
        parts = []
        if r.latency > 0:
            parts.append(f"C/L {r.concurrent / r.latency:.0f}")
        if r.rpm > 0:
            parts.append(f"{r.rpm} rpm {r.rpm / 60:.0f}")
        bound_text = f"{b:.1f}/s (min {', '.join(parts)})"
    report.add(
        Figure(
            section,
            f"{name} items/s (N={r.n})",
            r.items_per_s,
            "/s",
            b,
            bound_text,
            ratio,
            f">= {target:.2f} x bound" if target else "",
            pass_or_miss(ratio is not None and ratio >= target) if target else "",
        )
    )
    report.add(
        Figure(
            section,
            f"  {name}: calls answered 429 ({r.calls.throttled_429} of {r.calls.total})",
            r.share_429,
            "%",
        )
    )
    report.add(Figure(section, f"  {name}: rows left uncaptioned", float(r.n - r.done), "rows"))
    if not r.complete:
        report.notes.append(f"{section} / {name}: only {r.done} of {r.n} items captioned")
    if r.exit_code not in (0, None):
        report.notes.append(f"{section} / {name}: exit code {r.exit_code}")


def _throughput(report: Report, plan: Plan, results: Results) -> None:
    sec = f"throughput ({_setting(plan)})"
    cli, legacy, dagster = results.cli, results.legacy_same, results.dagster
    if cli is not None and legacy is not None:
        _throughput_figures(report, sec, "CLI", cli, 0.9)
        if dagster is not None:
            _throughput_figures(report, sec, "Dagster job", dagster, 0.9)
        _throughput_figures(report, sec, "legacy algorithm", legacy, None)
        report.add(
            Figure(sec, "CLI / legacy (same settings)", cli.items_per_s / legacy.items_per_s, "x")
        )
        for name, r in (("CLI", cli), ("Dagster job", dagster)):
            if r is None:
                continue
            report.add(Figure(sec, f"{name} local CPU per item", r.cpu_ms_per_item, "ms"))
            report.add(Figure(sec, f"{name} peak RSS", r.peak_rss_mb, "MB"))
            # At the bound, bound x L caption calls are in flight (embedding calls add ~10%).
            at_bound = min(float(r.concurrent), (r.bound or 0.0) * r.latency)
            report.add(
                Figure(
                    sec,
                    f"{name} calls in flight (mean)",
                    r.mean_calls_in_flight,
                    bound_text=f"C {r.concurrent}, at bound {at_bound:.1f}",
                )
            )
            report.add(
                Figure(sec, f"{name} time with no call in flight", r.no_call_in_flight_s, "s")
            )
    elif dagster is not None:
        _throughput_figures(report, sec, "Dagster job", dagster, 0.9)
    steps = dagster.steps if dagster is not None else None
    if steps is not None and steps.chunks:
        report.notes.append(
            f"Dagster: {steps.chunks} chunks; step seconds {steps.step_seconds}; "
            f"{steps.visual_steps_before_first_caption} visual_attributes steps ran "
            f"before the first captions step; first chunk written after "
            f"{steps.first_write_after_s} s"
        )


def _overlap(report: Report, plan: Plan, results: Results) -> None:
    sec = f"Dagster job overlap options ({_setting(plan)})"
    for mode in OVERLAP_MODES:
        r = results.dagster_overlap.get(mode)
        if r is None:
            continue
        _throughput_figures(report, sec, f"overlap={mode}", r, None)
        report.add(
            Figure(
                sec, f"  overlap={mode}: time with no call in flight", r.no_call_in_flight_s, "s"
            )
        )
        chunks = r.steps.chunks if r.steps else 0
        step_seconds = r.steps.step_seconds if r.steps else {}
        for op, seconds in sorted(step_seconds.items()):
            once = op in ("pending_rows", "summarize") or op.startswith("enriched_items_")
            label = f"{op} step" + ("" if once else f", mean of {chunks}")
            report.add(
                Figure(
                    sec,
                    f"  overlap={mode}: {label}",
                    seconds if once else seconds / max(1, chunks),
                    "s",
                )
            )


def _users(report: Report, plan: Plan, u: UsersRun) -> None:
    d = u.deployment
    sec = (
        f"deployment on {u.users:,} users x 3 rows (enrich-dagster defaults: 4 runs at "
        f"once, sensor every 30 s; L={plan.latency:g}/{plan.embedding_latency:g} s, quota "
        f"{plan.rpm} rpm{' per second' if plan.per_second else ''})"
    )
    after = u.all_captioned_after_s
    report.add(
        Figure(
            sec,
            f"all {u.rows:,} rows captioned after"
            if after is not None
            else f"stopped after, with {u.uncaptioned:,} rows left",
            after if after is not None else u.wall_s,
            "s",
            3000.0,
            "50 min",
            (after or u.wall_s) / 3000.0,
            "<= 50 min",
            pass_or_miss(after is not None and after <= 3000.0),
        )
    )
    if u.bound_s:
        report.add(Figure(sec, "  the quota's own time for these rows", u.bound_s, "s"))
    report.add(Figure(sec, "  rows left uncaptioned", float(u.uncaptioned), "rows"))
    report.add(
        Figure(
            sec,
            f"  calls answered 429 ({u.calls.throttled_429} of {u.calls.total})",
            u.share_429,
            "%",
        )
    )
    report.add(Figure(sec, "runs", float(d.runs)))
    report.add(Figure(sec, "  of them shared (a range of users)", float(d.shared_runs)))
    if d.users_per_shared_run.mean:
        report.add(Figure(sec, "  users per shared run (mean)", float(d.users_per_shared_run.mean)))
    report.add(
        Figure(
            sec,
            "partitions with their own materialization",
            float(d.partitions_materialized),
            "",
            float(u.users),
            f"{u.users:,}",
            d.partitions_materialized / u.users,
            "all",
            pass_or_miss(d.partitions_materialized == u.users),
        )
    )
    report.add(
        Figure(
            sec,
            f"  sampled partitions whose metadata is their own ({d.sampled_partitions})",
            float(d.sampled_with_own_figures),
        )
    )
    ticks = [t for t in u.ticks if t.changed]
    if ticks:
        slowest = max(t.ms for t in ticks)
        report.add(
            Figure(
                sec,
                f"slowest sensor tick ({len(ticks)} ticks with changes)",
                float(slowest),
                "ms",
                1000.0,
                "1 s",
                slowest / 1000.0,
                "< 1 s",
                pass_or_miss(slowest < 1000.0),
            )
        )
        report.add(
            Figure(sec, "  runs requested by one tick, at most", float(max(t.runs for t in ticks)))
        )
        report.add(Figure(sec, "  largest cursor", float(max(t.cursor_bytes for t in ticks)), "B"))


def _legacy_defaults(
    report: Report, plan: Plan, results: Results, legacy: ThroughputRun, ours: ThroughputRun
) -> None:
    sec = (
        f"legacy defaults (batch {LEGACY_BATCH}, concurrent {LEGACY_CONCURRENT}, "
        f"L={plan.latency:g} s, N={plan.legacy_defaults_n})"
    )
    _throughput_figures(report, sec, "legacy algorithm", legacy, None)
    _throughput_figures(report, sec, "CLI", ours, None)
    speedup = ours.items_per_s / legacy.items_per_s
    report.add(
        Figure(
            sec,
            "CLI / legacy, both at legacy defaults",
            speedup,
            "x",
            3.0,
            "3 x",
            speedup / 3.0,
            ">= 3 x",
            pass_or_miss(speedup >= 3.0),
        )
    )
    ceiling = (bound(LEGACY_CONCURRENT, plan.latency, plan.rpm) or 0) / legacy.items_per_s
    report.add(Figure(sec, "  (best possible at these settings: bound / legacy)", ceiling, "x"))
    if results.cli is not None:
        ratio = results.cli.items_per_s / legacy.items_per_s
        report.add(
            Figure(
                sec,
                f"CLI at C={plan.concurrent}, batch {plan.batch_size} / legacy at defaults",
                ratio,
                "x",
                3.0,
                "3 x",
                ratio / 3.0,
                ">= 3 x",
                pass_or_miss(ratio >= 3.0),
            )
        )


def _memory(
    report: Report,
    plan: Plan,
    engine: str,
    small: ThroughputRun,
    large: ThroughputRun,
    target: bool,
) -> None:
    sec = f"memory ({engine}, L={plan.memory_latency:g} s, no client limit, 64x48 images)"
    report.add(Figure(sec, f"peak RSS at N={small.n}", small.peak_rss_mb, "MB"))
    ratio = large.peak_rss_mb / small.peak_rss_mb
    report.add(
        Figure(
            sec,
            f"peak RSS at N={large.n}",
            large.peak_rss_mb,
            "MB",
            small.peak_rss_mb * 1.3,
            f"{small.peak_rss_mb * 1.3:.0f} MB (1.3 x)",
            ratio,
            "<= 1.3 x" if target else "",
            pass_or_miss(ratio <= 1.3) if target else "",
        )
    )
    for r in (small, large):
        growth = r.peak_rss_mb - r.rss_before_mb
        report.add(Figure(sec, f"growth over pre-run RSS, N={r.n}", growth, "MB"))
    report.add(Figure(sec, f"items/s at N={large.n} (CPU-bound)", large.items_per_s, "/s"))
    report.add(Figure(sec, f"local CPU per item at N={large.n}", large.cpu_ms_per_item, "ms"))


def _ratelimit(report: Report, r: ThroughputRun) -> None:
    sec = (
        f"rate limit (stand-in {r.rpm_limit} rpm, DASHSCOPE_RPM {r.rpm}, "
        f"C={r.concurrent}, L={r.latency:g} s" + (")" if r.embeddings else ", captions only)")
    )
    share = r.share_429
    report.add(
        Figure(
            sec,
            f"calls answered 429 ({r.calls.throttled_429} of {r.calls.total})",
            share,
            "%",
            0.01,
            "1%",
            share / 0.01,
            "< 1%",
            pass_or_miss(share < 0.01),
        )
    )
    if r.embeddings:
        report.add(Figure(sec, "  of which on embeddings", float(r.calls.embeddings_429)))
    if r.times_429_s:
        report.notes.append(
            f"rate limit: 429s at {', '.join(map(str, r.times_429_s))} s after the "
            "first call (the stand-in counts calls over a sliding 60 s window)"
        )
    report.add(Figure(sec, "retries (client usage)", float(r.usage.retries)))
    _throughput_figures(report, sec, "CLI", r, None)
    report.add(Figure(sec, "run length", r.wall_s, "s"))


def _tokens(report: Report, results: Results, local: LocalRun) -> None:
    sec = "image tokens (counted as DashScope bills the vision model)"
    for key, r in (
        ("cli", results.cli),
        ("ratelimit", results.ratelimit),
        ("memory_small", results.memory_small),
    ):
        if r is not None and r.image_tokens_per_item_client:
            report.add(
                Figure(
                    sec,
                    f"tokens per item sent, {key} run ({r.image_size[0]}x{r.image_size[1]} images)",
                    r.image_tokens_per_item_client,
                    "",
                    note=f"server saw {r.image_tokens_per_item_server}",
                )
            )
            break
    for t in local.tokens:
        # Only the large photo has a target: a phone photo must not be sent at full size.
        target = 1 / 3 if (t.width, t.height) == (4000, 3000) else None
        report.add(
            Figure(
                sec,
                f"{t.size} photo sent as {t.sent[0]}x{t.sent[1]} (max side {local.max_side})",
                float(t.tokens),
                "tokens",
                float(t.full_tokens),
                f"{t.full_tokens} at full size",
                t.ratio,
                "<= 0.33 x full" if target else "",
                pass_or_miss(t.ratio <= target) if target else "",
            )
        )


def _cpu(report: Report, local: LocalRun) -> None:
    m = local.median
    sec = f"local CPU, 1600x1200 JPEG ({local.samples} samples, median)"
    report.add(
        Figure(
            sec,
            "load + colors + downscale + tags",
            m.cpu_ms,
            "ms",
            20.0,
            "20 ms",
            m.cpu_ms / 20.0,
            "<= 20 ms",
            pass_or_miss(m.cpu_ms <= 20.0),
        )
    )
    for part, ms in (
        ("load", m.load_ms),
        ("colors", m.colors_ms),
        ("vision", m.vision_ms),
        ("tags", m.tags_ms),
    ):
        report.add(Figure(sec, f"  {part}", ms, "ms"))
    report.add(Figure(sec, "  wall time (same items)", m.wall_ms, "ms"))
    one = local.median_one_thread
    report.add(Figure(sec, "same, OpenMP limited to 1 thread (diagnostic)", one.cpu_ms, "ms"))
    report.add(Figure(sec, "  colors, 1 thread", one.colors_ms, "ms"))


def _sensor(report: Report, s: SensorRun) -> None:
    sec = f"sensor ({s.rows:,} rows, {s.pending_rows:,} pending for {s.pending_users} users)"
    cold = statistics.median(s.tick_cold_ms)
    report.add(
        Figure(
            sec,
            "tick, no cursor (all users requested), median",
            cold,
            "ms",
            200.0,
            "200 ms",
            cold / 200.0,
            "< 200 ms",
            pass_or_miss(cold < 200.0),
        )
    )
    report.add(
        Figure(sec, "tick, unchanged rows, median", statistics.median(s.tick_steady_ms), "ms")
    )
    report.add(
        Figure(
            sec, "pending_fingerprints alone, median", statistics.median(s.fingerprints_ms), "ms"
        )
    )
    report.add(
        Figure(
            sec,
            f"partial index {s.index_name} in the plan",
            1.0 if s.index_used else 0.0,
            "yes/no",
            target="used",
            verdict=pass_or_miss(s.index_used),
        )
    )
    report.add(Figure(sec, "index build (Store.setup)", s.setup_s, "s"))
    if s.explain:
        report.appendix.append("EXPLAIN ANALYZE of the sensor's pending query:")
        report.appendix.extend("  " + line for line in s.explain[0].splitlines())
