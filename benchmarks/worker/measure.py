"""What a worker measures: its own CPU time and memory, and (for diagnostics) the pipeline's.

Because the worker process does nothing but its scenario, ``getrusage(RUSAGE_SELF)`` is the
pipeline's own CPU time and peak RSS: PostgreSQL and the stand-in server run in other processes.
The instrumentation (providers built, time per stage function) only adds diagnostics; no figure
the benchmark judges depends on it.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import io
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from benchmarks.worker.contract import ClientUsage, Resources, StageTime

T = TypeVar("T")

STAGE_NAMES = (
    "claim_chunk",
    "visual_attributes",
    "load_visual",
    "caption_chunk",
    "caption_item",
    "embed_chunk",
    "write_chunk",
)


def current_rss_kb() -> int:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def measure(fn: Callable[[], T]) -> tuple[T, Resources]:
    """Run ``fn`` and return its value with wall time, CPU time and memory figures."""
    gc.collect()
    rss_before = current_rss_kb()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return value, Resources(
        wall_s=wall,
        cpu_user_s=after.ru_utime - before.ru_utime,
        cpu_sys_s=after.ru_stime - before.ru_stime,
        cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        rss_before_kb=rss_before,
        peak_rss_before_kb=before.ru_maxrss,
        peak_rss_kb=after.ru_maxrss,
        rss_after_kb=current_rss_kb(),
    )


class TailWriter(io.TextIOBase):
    """A text sink that keeps only the last lines: the report must not grow memory with N."""

    def __init__(self, keep: int = 60) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.count = 0
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = self._partial + text
        *complete, self._partial = data.split("\n")
        self.lines.extend(complete)
        self.count += len(complete)
        return len(text)

    def text(self) -> str:
        return "\n".join([*self.lines, self._partial]).strip()


_providers: list[Any] = []
_stage_time: dict[str, list[float]] = {}
_stage_lock = threading.Lock()


def instrument() -> None:
    """Remember every DashScope provider built and time the shared stage functions."""
    from enrich_pipeline.pipeline import stages
    from enrich_pipeline.providers import dashscope

    original_init = dashscope.DashScopeProvider.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _providers.append(self)

    dashscope.DashScopeProvider.__init__ = init  # type: ignore[method-assign]

    for name in STAGE_NAMES:
        fn = getattr(stages, name, None)
        if fn is None:
            continue

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                with _stage_lock:
                    entry = _stage_time.setdefault(_name, [0.0, 0.0])
                    entry[0] += time.perf_counter() - started
                    entry[1] += 1

        setattr(stages, name, timed)


def provider_usage() -> ClientUsage:
    known = {f.name for f in dataclasses.fields(ClientUsage)}
    totals: dict[str, float] = {}
    for provider in _providers:
        raw = provider.usage.as_dict() if hasattr(provider.usage, "as_dict") else {}
        for key, value in raw.items():
            if key in known:  # a count the provider gains later is left out, not an error
                totals[key] = totals.get(key, 0) + value
        limiter = getattr(provider, "_limiter", None)
        waited = getattr(limiter, "waited", None)
        if isinstance(waited, int | float):
            totals["limiter_waited_s"] = totals.get("limiter_waited_s", 0.0) + waited
    return ClientUsage(**totals, providers=len(_providers))  # type: ignore[arg-type]


def stage_breakdown() -> dict[str, StageTime]:
    with _stage_lock:
        return {k: StageTime(seconds=v[0], calls=int(v[1])) for k, v in _stage_time.items()}
