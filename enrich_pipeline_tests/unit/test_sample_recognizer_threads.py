"""The offline recognizer of the demo's drawings, called by many captioning threads at once on a
fresh process: every drawing is still recognised, and no thread fails.

Its reference silhouettes are built on first use. Built without a lock, threads that came in
while the first was still building read a half-filled table: drawings it did not hold yet came
out "subject is not known", and one thread died of "dictionary changed size during iteration".
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import pytest

from enrich_pipeline.enrichment import synthetic

THREADS = 20
FRESH_STARTS = 8


def fresh_synthetic(n: int) -> ModuleType:
    """A new copy of the module, as a newly started process has it: nothing built yet."""
    spec = importlib.util.spec_from_file_location(f"_fresh_synthetic_{n}", synthetic.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    # Threads switch every microsecond instead of every 5 ms, so that a start-up race shows on
    # every run rather than once in a while.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_every_drawing_is_recognised_when_many_threads_start_together(
    frequent_thread_switches: None,
) -> None:
    drawings = [
        (shape, synthetic.draw_sample(shape, (40, 80, 200), (240, 240, 240), (320, 240)))
        for shape in synthetic.SAMPLE_SUBJECTS
    ]
    wrong: list[tuple[int, str, object]] = []
    for start in range(FRESH_STARTS):
        module = fresh_synthetic(start)
        barrier = threading.Barrier(THREADS)

        def recognise(n: int, module: ModuleType = module, barrier: threading.Barrier = barrier):
            shape, image = drawings[n % len(drawings)]
            barrier.wait()
            known = module.recognize_sample(image)
            return shape, known[0] if known else None

        with ThreadPoolExecutor(THREADS) as pool:
            for shape, seen in pool.map(recognise, range(THREADS)):  # raises a thread's error
                if seen != shape:
                    wrong.append((start, shape, seen))
    assert wrong == [], f"{len(wrong)} drawing(s) not recognised: {wrong[:5]}"
