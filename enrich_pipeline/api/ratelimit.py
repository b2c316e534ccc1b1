"""A client-side limiter for requests and tokens per minute, shared by every worker thread.

Pacing calls keeps a high-concurrency run under the provider's quota instead of living on 429
retries. Token buckets refill continuously, so bursts up to one second's worth pass at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class _Bucket:
    def __init__(self, per_minute: float, burst_seconds: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def wait_time(self, amount: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        # An amount larger than the bucket can ever hold would wait forever: let it go when full.
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._requests = (
            _Bucket(requests_per_minute, burst_seconds) if requests_per_minute else None
        )
        self._tokens = _Bucket(tokens_per_minute, burst_seconds) if tokens_per_minute else None
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self.waited = 0.0

    def acquire(self, tokens: float = 0) -> None:
        """Block until one request of ``tokens`` estimated tokens may be sent."""
        while True:
            with self._lock:
                now = self._clock()
                wait = 0.0
                if self._requests:
                    wait = max(wait, self._requests.wait_time(1, now))
                if self._tokens and tokens:
                    wait = max(wait, self._tokens.wait_time(tokens, now))
                if wait <= 0:
                    if self._requests:
                        self._requests.level -= 1
                    if self._tokens and tokens:
                        self._tokens.level -= min(tokens, self._tokens.capacity)
                    return
                self.waited += wait
            self._sleep(wait)
