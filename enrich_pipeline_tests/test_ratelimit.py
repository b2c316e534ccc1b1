"""The client-side rate limiter keeps every sliding minute at or under the limit."""

from __future__ import annotations

from enrich_pipeline.api.ratelimit import RateLimiter


class FakeClock:
    """Time that moves only when the limiter sleeps: the test is exact and instant."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_no_sliding_minute_exceeds_the_limit() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock, sleep=clock.sleep)
    stamps = []
    for _ in range(2000):
        limiter.acquire()
        stamps.append(clock.now)
    worst = max(
        sum(1 for t in stamps[i:] if t - start < 60.0) for i, start in enumerate(stamps[:700])
    )
    assert worst <= 600
    # ... and it is not needlessly slow: about 599 a minute.
    assert stamps[-1] / 60 * 599 >= 1990


def test_tokens_per_minute_paces_large_requests() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, 6000, clock=clock, sleep=clock.sleep)
    for _ in range(20):
        limiter.acquire(tokens=1000)
    # 20,000 tokens at 6,000 a minute, after a first second's worth: a little over 3 minutes.
    assert 180 <= clock.now <= 200
