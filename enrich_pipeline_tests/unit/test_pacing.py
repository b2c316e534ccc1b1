"""Pacing as DashScope counts: no second holds more than RPM/60 requests or TPM/60 tokens, the
quota is still used (>= 0.9), and calls leave evenly spaced. On a fake clock: exact, instant."""

from __future__ import annotations

import random

import pytest

from enrich_pipeline.providers.ratelimit import (
    FIRST_CALL_ALLOWANCE,
    MINUTE,
    RateLimiter,
    per_second_budget,
)
from enrich_pipeline_tests.helpers import FakeClock, most_in


def limiter(rpm: float = 0, tpm: float = 0, **kw: object) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(rpm, tpm, clock=clock, sleep=clock.sleep, **kw), clock  # type: ignore[arg-type]


@pytest.mark.parametrize("rpm", [60, 300, 600, 1200, 1230])
def test_no_second_holds_more_than_rpm_over_60_and_the_quota_is_used(rpm: int) -> None:
    lim, clock = limiter(rpm)
    stamps = []
    for _ in range(3 * per_second_budget(rpm) * 10):
        lim.acquire()
        stamps.append(clock.now)
    assert most_in(stamps, 1.0) <= per_second_budget(rpm)
    assert most_in(stamps, 60.0) <= rpm
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert rate >= 0.9 * per_second_budget(rpm)


def test_calls_leave_evenly_spaced_not_a_second_at_once() -> None:
    lim, clock = limiter(1200)
    stamps = []
    for _ in range(100):
        lim.acquire()
        stamps.append(clock.now)
    gaps = [round(b - a, 6) for a, b in zip(stamps, stamps[1:], strict=False)]
    # 20 a second, spread over 1.05 s; after the very first call a little more (a process's
    # first call sets up its HTTP client and arrives late).
    assert gaps[0] == round(1.05 / 20 + FIRST_CALL_ALLOWANCE, 6)
    assert set(gaps[1:]) == {round(1.05 / 20, 6)}
    # The old sliding-minute limiter let the minute's 1,200 go in the first instant.
    assert most_in(stamps, 0.25) <= 5


def test_a_pause_is_not_saved_up_into_a_burst() -> None:
    lim, clock = limiter(600)
    for _ in range(30):
        lim.acquire()
    clock.now += 10.0  # a chunk being written
    stamps = []
    for _ in range(10):
        lim.acquire()
        stamps.append(clock.now)
    assert stamps[1] - stamps[0] == pytest.approx(1.05 / 10)
    assert most_in(stamps, 1.0) <= 10


def test_burst_allows_a_few_at_once_but_never_more_than_a_second() -> None:
    lim, clock = limiter(1200, burst=4)
    lim.acquire()
    clock.now += 5.0
    stamps = []
    for n in range(200):
        lim.acquire()
        stamps.append(clock.now)
        if n % 50 == 49:
            clock.now += 5.0
    assert stamps[:4] == [5.0] * 4 and stamps[4] > 5.0
    assert max(stamps.count(t) for t in stamps) == 4
    assert most_in(stamps, 1.0) <= 20


def test_jitter_up_to_the_margin_never_lets_the_server_see_one_too_many() -> None:
    lim, clock = limiter(300)
    rng = random.Random(7)
    arrivals = []
    for _ in range(500):
        lim.acquire()
        arrivals.append(clock.now + rng.uniform(0.0, 0.05))  # network and scheduling delay
        clock.now += rng.uniform(0.0, 0.02)  # the caller's own work
    assert most_in(arrivals, 1.0) <= 5


def test_tokens_per_second_and_minute_with_mixed_sizes() -> None:
    lim, clock = limiter(0, 1_000_000)  # 16,666 tokens a second
    rng = random.Random(3)
    stamps, sizes = [], []
    for _ in range(2000):
        size = rng.choice([600, 800, 1000, 2700])
        lim.acquire(size)
        stamps.append(clock.now)
        sizes.append(size)
    assert most_in(stamps, 1.0, sizes) <= 1_000_000 // 60
    assert most_in(stamps, 60.0, sizes) <= 1_000_000
    rate = sum(sizes[:-1]) / (stamps[-1] - stamps[0])
    assert rate >= 0.85 * (1_000_000 // 60)


def test_equal_requests_use_at_least_90_percent_of_tokens_per_second() -> None:
    lim, clock = limiter(0, 1_000_000)
    stamps = []
    for _ in range(600):
        lim.acquire(790)  # an 896x672 image, the prompt and max_tokens
        stamps.append(clock.now)
    assert most_in(stamps, 1.0, [790] * 600) <= 16_666
    assert (len(stamps) - 1) * 790 / (stamps[-1] - stamps[0]) >= 0.9 * 16_666


def test_requests_and_tokens_together_the_tighter_one_binds() -> None:
    lim, clock = limiter(1200, 1_000_000)
    stamps = []
    for _ in range(400):
        lim.acquire(2500)  # a capped 32-px image: tokens bind (6.7 a second, not 20)
        stamps.append(clock.now)
    assert most_in(stamps, 1.0, [2500] * 400) <= 16_666
    assert most_in(stamps, 1.0) <= 20
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert 5.0 <= rate <= 16_666 / 2500


def test_defer_starts_the_schedule_later() -> None:
    lim, clock = limiter(600)
    lim.defer(2.0)  # slots already given out elsewhere until then
    lim.acquire()
    assert clock.now == pytest.approx(2.0)
    lim.acquire()
    assert clock.now == pytest.approx(2.0 + 0.105 + FIRST_CALL_ALLOWANCE)
    assert lim.next_free() == pytest.approx(clock.now + 0.105)


def test_per_second_off_keeps_only_the_minute() -> None:
    lim, clock = limiter(600, per_second=False)
    for _ in range(600):
        lim.acquire()
    assert clock.now == 0.0
    lim.acquire()
    assert clock.now == MINUTE


def test_unlimited_never_waits() -> None:
    lim, clock = limiter()
    for _ in range(1000):
        lim.acquire(10_000)
    assert clock.now == 0.0 and not lim.limited
