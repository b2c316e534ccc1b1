"""The client-side rate limiter keeps every sliding minute at or under the limit.

The first two tests check the minute windows alone (``per_second=False``): with DashScope's
per-second limits on (the default, see test_pacing.py) pauses do waste the paused seconds,
because the provider's per-second budget cannot be saved up either.
"""

from __future__ import annotations

from enrich_pipeline.providers.ratelimit import WINDOW, RateLimiter
from enrich_pipeline_tests.helpers import FakeClock, most_in


def test_no_sliding_minute_exceeds_the_limit_and_the_quota_is_used() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, per_second=False, clock=clock, sleep=clock.sleep)
    stamps = []
    for n in range(2000):
        limiter.acquire()
        stamps.append(clock.now)
        clock.now += 0.01 if n % 100 else 3.0  # a caller with pauses, like a chunked run
    assert most_in(stamps, 60.0) <= 600
    # The pauses did not waste quota: 2,000 calls in just over three windows.
    assert stamps[-1] <= 3 * WINDOW + 10


def test_tokens_per_minute_paces_large_requests() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, 6000, per_second=False, clock=clock, sleep=clock.sleep)
    for _ in range(20):
        limiter.acquire(tokens=1000)
    # 20,000 tokens at 6,000 a minute: the last request goes in the fourth window.
    assert 3 * WINDOW <= clock.now < 3 * WINDOW + 1


def test_a_request_larger_than_the_limit_still_goes_when_the_window_is_empty() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, 100, clock=clock, sleep=clock.sleep)
    limiter.acquire(tokens=50)
    limiter.acquire(tokens=500)
    assert clock.now == WINDOW
