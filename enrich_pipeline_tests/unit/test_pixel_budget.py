"""The bound on decoded pixels in flight (``ENRICH_MAX_PIXELS_IN_FLIGHT``): never exceeded by
concurrent loads, served in arrival order, and an image larger than the whole budget goes alone
instead of waiting forever."""

from __future__ import annotations

import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageFile

from enrich_pipeline.enrichment.images import ImagePolicy, load_image
from enrich_pipeline.enrichment.images.budget import (
    PixelBudget,
    return_freed_buffers,
    shared_budget,
)
from enrich_pipeline.settings import ConfigError, ImageSettings
from enrich_pipeline_tests.helpers import data_url, encode

DEADLINE = 60.0  # generous: two shared cores


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def holder(budget: PixelBudget, pixels: int, log: list[str], name: str) -> threading.Thread:
    """A thread that holds ``pixels`` until its release event is set."""
    release = threading.Event()

    def run() -> None:
        with budget.hold(pixels):
            log.append(f"+{name}")
            release.wait(DEADLINE)
            log.append(f"-{name}")

    thread = threading.Thread(target=run, daemon=True)
    thread.release = release  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_hold_that_does_not_fit_waits_for_the_pixels() -> None:
    budget = PixelBudget(10)
    log: list[str] = []
    a = holder(budget, 6, log, "a")
    wait_until(lambda: log == ["+a"], "a to hold")
    b = holder(budget, 6, log, "b")
    wait_until(lambda: budget.waiting() == 1, "b to wait")
    assert log == ["+a"] and budget.held == 6
    a.release.set()  # type: ignore[attr-defined]
    wait_until(lambda: "+b" in log, "b to hold")
    assert log[:3] == ["+a", "-a", "+b"]
    b.release.set()  # type: ignore[attr-defined]
    b.join(DEADLINE)
    assert budget.held == 0 and budget.peak == 6 and budget.waits == 1


def test_an_image_larger_than_the_whole_budget_goes_alone() -> None:
    budget = PixelBudget(10)
    log: list[str] = []
    small = holder(budget, 3, log, "small")
    wait_until(lambda: log == ["+small"], "small to hold")
    big = holder(budget, 1000, log, "big")
    wait_until(lambda: budget.waiting() == 1, "big to wait")
    small.release.set()  # type: ignore[attr-defined]
    wait_until(lambda: "+big" in log, "big to hold")
    assert budget.held == 10  # charged the whole budget: nothing else fits beside it
    big.release.set()  # type: ignore[attr-defined]
    big.join(DEADLINE)
    assert budget.held == 0


def test_holds_are_served_in_arrival_order_so_a_large_image_is_not_starved() -> None:
    budget = PixelBudget(10)
    log: list[str] = []
    first = holder(budget, 4, log, "first")
    wait_until(lambda: log == ["+first"], "first to hold")
    large = holder(budget, 9, log, "large")
    wait_until(lambda: budget.waiting() == 1, "large to wait")
    # A small one would fit beside the first, but the large one came before it.
    small = holder(budget, 2, log, "small")
    wait_until(lambda: budget.waiting() == 2, "small to wait")
    assert log == ["+first"]
    first.release.set()  # type: ignore[attr-defined]
    wait_until(lambda: "+large" in log, "large to hold")
    assert "+small" not in log
    large.release.set()  # type: ignore[attr-defined]
    wait_until(lambda: "+small" in log, "small to hold")
    small.release.set()  # type: ignore[attr-defined]
    small.join(DEADLINE)
    assert [e for e in log if e.startswith("+")] == ["+first", "+large", "+small"]


def test_an_interrupted_wait_leaves_the_line() -> None:
    budget = PixelBudget(10)
    log: list[str] = []
    a = holder(budget, 10, log, "a")
    wait_until(lambda: log == ["+a"], "a to hold")

    def interrupt_once_waiting() -> None:
        wait_until(lambda: budget.waiting() == 1, "the main thread to wait")
        # Ctrl-C, delivered to the main thread as the terminal delivers it.
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    threading.Thread(target=interrupt_once_waiting, daemon=True).start()
    with pytest.raises(KeyboardInterrupt), budget.hold(5):
        pass
    assert budget.waiting() == 0
    a.release.set()  # type: ignore[attr-defined]
    a.join(DEADLINE)
    with budget.hold(5):  # the line is not stuck behind the interrupted ticket
        assert budget.held == 5


@pytest.fixture
def decoding() -> Iterator[dict[str, int]]:
    """Pixels Pillow is decoding at this moment, summed over threads, and the most seen: counted
    in Pillow's own ``ImageFile.load`` (the decode), a floor of what the pipeline holds."""
    seen = {"now": 0, "peak": 0, "loads": 0}
    lock = threading.Lock()
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        if not self.tile:  # decoded already: nothing happens
            return original(self)
        pixels = self.size[0] * self.size[1]
        with lock:
            seen["now"] += pixels
            seen["peak"] = max(seen["peak"], seen["now"])
            seen["loads"] += 1
        try:
            time.sleep(0.02)  # long enough for the other threads to pile up if allowed
            return original(self)
        finally:
            with lock:
                seen["now"] -= pixels

    ImageFile.ImageFile.load = load  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        ImageFile.ImageFile.load = original  # type: ignore[method-assign]


def noisy_png(seed: int, size: tuple[int, int]) -> bytes:
    return encode(Image.effect_noise(size, 40 + seed).convert("RGB"), "PNG", compress_level=1)


def test_concurrent_loads_never_decode_more_than_the_budget(decoding: dict[str, int]) -> None:
    side = 1000  # 1 MP each; a budget of 2.5 MP lets two decode at once, never three
    capacity = 2_500_000
    sources = [data_url(noisy_png(n, (side, side))) for n in range(10)]
    policy = ImagePolicy(max_pixels_in_flight=capacity)
    budget = shared_budget(capacity)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda s: load_image(s, policy), sources))
    assert all(img.original_width == side for img in loaded)
    assert decoding["loads"] == 10
    assert side * side <= decoding["peak"] <= capacity
    assert budget.peak <= capacity and budget.held == 0
    assert budget.waits > 0  # eight threads for two places: some had to wait


def test_images_larger_than_the_budget_decode_one_at_a_time(decoding: dict[str, int]) -> None:
    capacity = 300_000  # below one 800x600 image
    sources = [data_url(noisy_png(n, (800, 600))) for n in range(4)]
    policy = ImagePolicy(max_pixels_in_flight=capacity)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda s: load_image(s, policy), sources, timeout=DEADLINE))
    assert len(loaded) == 4  # no deadlock
    assert decoding["peak"] == 800 * 600  # alone, each of them


def test_jpegs_are_charged_what_they_decode_after_dct_scaling() -> None:
    # A 4096x4096 JPEG decodes at half size for a 2048 working copy: 4 MP charged, not 16.
    capacity = 5_000_000
    raw = encode(Image.new("RGB", (4096, 4096), (10, 120, 30)), "JPEG", quality=80)
    budget = shared_budget(capacity)
    before = budget.peak
    load_image(data_url(raw, "image/jpeg"), ImagePolicy(max_pixels_in_flight=capacity))
    assert max(before, 2048 * 2048) == budget.peak


def test_the_setting_reaches_the_policy_and_zero_turns_the_bound_off() -> None:
    assert ImageSettings.from_env({}).policy().max_pixels_in_flight == 50_000_000
    env = {"ENRICH_MAX_PIXELS_IN_FLIGHT": "30000000"}
    assert ImageSettings.from_env(env).policy().max_pixels_in_flight == 30_000_000
    policy = ImageSettings.from_env({"ENRICH_MAX_PIXELS_IN_FLIGHT": "0"}).policy()
    assert policy.max_pixels_in_flight == 0
    assert load_image(data_url(noisy_png(0, (64, 64))), policy).image.size == (64, 64)
    for junk in ("-1", "1.5", "abc", str(10**11)):
        with pytest.raises(ConfigError, match="ENRICH_MAX_PIXELS_IN_FLIGHT"):
            ImageSettings.from_env({"ENRICH_MAX_PIXELS_IN_FLIGHT": junk})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_a_budget_has_malloc_return_freed_image_buffers() -> None:
    shared_budget(12_345_678)
    assert return_freed_buffers() is True
