"""Local CPU per photo (load, K-Means colors, downscale, tags) and the tokens photos cost."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.worker.contract import CpuParts, LocalRun, LocalSpec, PhotoTokens


def _median(samples: list[CpuParts]) -> CpuParts:
    return CpuParts(
        wall_ms=statistics.median(s.wall_ms for s in samples),
        cpu_ms=statistics.median(s.cpu_ms for s in samples),
        load_ms=statistics.median(s.load_ms for s in samples),
        colors_ms=statistics.median(s.colors_ms for s in samples),
        vision_ms=statistics.median(s.vision_ms for s in samples),
        tags_ms=statistics.median(s.tags_ms for s in samples),
    )


def run_local(spec: LocalSpec) -> LocalRun:
    """The per-item CPU on 1600x1200 photos, and the tokens a 4000x3000 photo costs."""
    from benchmarks.data import write_photos
    from enrich_pipeline.enrichment.colors import dominant_colors
    from enrich_pipeline.enrichment.images import (
        ImagePolicy,
        image_tokens,
        load_image,
        prepare_for_vision,
    )
    from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, derive_tags
    from enrich_pipeline.settings import DashScopeSettings

    folder = Path(spec.folder)
    max_side = DashScopeSettings.from_env().max_image_side
    policy = ImagePolicy(allow_local_files=True)
    caption = (
        "A modern blue fabric sofa with wooden legs in a minimalist living room, beside a "
        "white ceramic lamp and a green plant near a large window."
    )
    photos = write_photos(folder, spec.count, (1600, 1200))

    def one(path: Path) -> CpuParts:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        loaded = load_image(str(path), policy)
        cpu1 = time.process_time()
        dominant_colors(loaded.image, k=5)
        cpu2 = time.process_time()
        prepare_for_vision(loaded, max_side=max_side)
        cpu3 = time.process_time()
        derive_tags(caption, DEFAULT_VOCABULARY)
        cpu4 = time.process_time()
        return CpuParts(
            wall_ms=(time.perf_counter() - wall0) * 1000,
            cpu_ms=(cpu4 - cpu0) * 1000,
            load_ms=(cpu1 - cpu0) * 1000,
            colors_ms=(cpu2 - cpu1) * 1000,
            vision_ms=(cpu3 - cpu2) * 1000,
            tags_ms=(cpu4 - cpu3) * 1000,
        )

    for path in photos[:2]:  # warm-up: imports, first K-Means, codec tables
        one(path)
    samples = [one(p) for _ in range(spec.rounds) for p in photos]
    # Diagnostic: the same with scikit-learn's OpenMP pool limited to one thread. On a busy
    # machine its idle threads spin, and that CPU is charged to every K-Means call.
    from threadpoolctl import threadpool_info, threadpool_limits

    openmp_threads = [i.get("num_threads") for i in threadpool_info()]
    with threadpool_limits(1):
        for path in photos[:2]:
            one(path)
        single = [one(p) for _ in range(spec.rounds) for p in photos]

    tokens: list[PhotoTokens] = []
    for width, height in ((4000, 3000), (1600, 1200)):
        (path,) = write_photos(folder, 1, (width, height), seed=500)
        vision = prepare_for_vision(load_image(str(path), policy), max_side=max_side)
        full = image_tokens(width, height)
        tokens.append(
            PhotoTokens(
                width=width,
                height=height,
                sent=(vision.width, vision.height),
                tokens=vision.tokens,
                full_tokens=full,
                ratio=vision.tokens / full,
            )
        )
    return LocalRun(
        samples=len(samples),
        median=_median(samples),
        median_one_thread=_median(single),
        thread_pools=openmp_threads,
        max_side=max_side,
        tokens=tokens,
    )
