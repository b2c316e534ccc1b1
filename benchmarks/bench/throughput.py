"""One throughput run: seed N rows, run an engine against the stand-in, summarize its calls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields

from benchmarks.bench.harness import Bench
from benchmarks.bench.plan import USER
from benchmarks.bench.records import Call, Calls, RunSetting, ThroughputRun, bound
from benchmarks.worker.contract import CliSpec, DagsterSpec, LegacySpec, PipelineRun, Spec


def _spec(s: RunSetting) -> Spec:
    if s.engine == "cli":
        return CliSpec(
            argv=[
                "--concurrent",
                str(s.concurrent),
                "--batch-size",
                str(s.batch_size),
                "--max-items",
                "0",
                *([] if s.embeddings else ["--no-caption-embedding"]),
            ]
        )
    if s.engine == "dagster":
        config = {
            "batch_size": s.batch_size,
            "concurrent": s.concurrent,
            "max_items": None,
            "caption_embedding": s.embeddings,
            **({"overlap": s.overlap} if s.overlap else {}),
        }
        return DagsterSpec(user=USER, config=config)
    return LegacySpec(user=USER, batch_size=s.batch_size, concurrent=s.concurrent, max_items=s.n)


def _label(s: RunSetting) -> str:
    label = (
        f"{s.engine} N={s.n} C={s.concurrent} L={s.latency:g}s/{s.embedding_latency:g}s"
        f" batch={s.batch_size} rpm={s.rpm}"
    )
    if s.rpm_limit:
        label += f" (stand-in {s.rpm_limit} rpm{' per second' if s.per_second else ''})"
    label += "" if s.embeddings else " (no embeddings)"
    label += f" overlap={s.overlap}" if s.overlap else ""
    return label


def throughput(bench: Bench, setting: RunSetting) -> ThroughputRun:
    s = setting
    images = bench.images(s.image_size, s.n)
    namespace = bench.seed(images)
    standin = bench.standin(s.latency, s.rpm_limit, s.embedding_latency, s.per_second)
    env = bench.pipeline_env(namespace, standin.base_url, s.rpm)
    bench.say(f"  running {_label(s)} ...")
    try:
        raw = bench.worker(_spec(s), PipelineRun, env)
        done = bench.captioned(namespace)
    finally:
        bench.drop(namespace)
    result = summarize_run(setting, raw, standin.requests(), done=done)
    bench.say(
        f"    {result.items_per_s:.2f} items/s, {done}/{s.n} captioned, "
        f"{result.wall_s:.1f} s, CPU {result.cpu_ms_per_item:.1f} ms/item, "
        f"peak RSS {result.peak_rss_mb:.0f} MB, 429s {result.share_429:.2%}"
    )
    return result


def summarize_run(
    setting: RunSetting, raw: PipelineRun, log: Sequence[Call], *, done: int
) -> ThroughputRun:
    """The run's figures from the worker's answer and the stand-in's request log."""
    s = setting
    wall = raw.resources.wall_s
    latency = s.latency
    chat = [r for r in log if r.endpoint == "chat"]
    embeddings = [r for r in log if r.endpoint == "embeddings"]
    admitted = [r for r in log if r.status != 429]
    throttled = len(log) - len(admitted)
    chat_ok = [r for r in chat if r.status == 200]
    usage = raw.usage
    first = min((r.at for r in log), default=0.0)
    # Caption calls in flight, from the server's side: each admitted one is held `latency` s.
    captions = [r for r in admitted if r.endpoint == "chat"]
    busy = union_length([(r.at, r.at + latency) for r in captions]) if latency > 0 else 0.0
    span = (max(r.at for r in captions) + latency - min(r.at for r in captions)) if captions else 0
    limit = bound(s.concurrent, s.latency, s.rpm)
    items_per_s = done / wall if wall > 0 else 0.0
    return ThroughputRun(
        **{f.name: getattr(s, f.name) for f in fields(RunSetting)},
        bound=limit,
        ratio_to_bound=items_per_s / limit if limit else None,
        exit_code=raw.exit_code,
        done=done,
        complete=done == s.n,
        wall_s=wall,
        items_per_s=items_per_s,
        cpu_s=raw.resources.cpu_s,
        cpu_ms_per_item=raw.resources.cpu_s * 1000 / max(done, 1),
        peak_rss_mb=raw.resources.peak_rss_kb / 1024,
        rss_before_mb=raw.resources.rss_before_kb / 1024,
        calls=Calls(
            chat=len(chat),
            chat_ok=len(chat_ok),
            embeddings=len(embeddings),
            throttled_429=throttled,
            chat_429=sum(1 for r in chat if r.status == 429),
            embeddings_429=sum(1 for r in embeddings if r.status == 429),
            total=len(log),
        ),
        share_429=throttled / len(log) if log else 0.0,
        times_429_s=[round(r.at - first, 2) for r in sorted(log, key=_at) if r.status == 429][:20],
        image_tokens_per_item_server=(
            sum(r.image_tokens for r in chat_ok) / len(chat_ok) if chat_ok else None
        ),
        image_tokens_per_item_client=(
            usage.image_tokens / usage.vision_calls if usage.vision_calls else None
        ),
        mean_calls_in_flight=len(captions) * latency / wall if wall > 0 else None,
        mean_embedding_calls_in_flight=(
            sum(1 for r in admitted if r.endpoint == "embeddings") * s.embedding_latency / wall
            if wall > 0
            else None
        ),
        concurrency_use=(len(captions) * latency / wall / s.concurrent)
        if wall > 0 and latency > 0
        else None,
        uncaptioned=s.n - done,
        no_call_in_flight_s=(span - busy) if latency > 0 else None,
        usage=usage,
        stages=raw.stages,
        steps=raw.steps,
        materialization=raw.materialization,
        report_tail=raw.report_tail,
    )


def _at(call: Call) -> float:
    return call.at


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total
