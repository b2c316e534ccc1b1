"""A client-side limiter for requests and tokens per minute, shared by every worker thread.

Pacing calls keeps a high-concurrency run under the provider's quota instead of living on 429
retries. Providers count requests in a sliding minute, and a token bucket of capacity b admits
up to ``b + rate * 60`` in any minute; so the bucket holds one request (no burst) and refills at
``(limit - 1) / 60`` a second, which keeps every minute at or under the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class _Bucket:
    def __init__(self, per_minute: float, burst: float, now: float) -> None:
        self.capacity = max(1.0, burst)
        self.rate = max(per_minute - self.capacity, 1.0) / 60.0
        self.level = self.capacity
        self.stamp = now

    def wait_time(self, amount: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        # An amount larger than the bucket can ever hold would wait forever: let it go when full.
        need = min(amount, self.capacity)
        # A hair of tolerance: refilling by exactly the computed wait can land a rounding error
        # short, and waiting for 1e-17 s more would never end on a coarse clock.
        return 0.0 if self.level >= need - 1e-9 else (need - self.level) / self.rate


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        start = clock()
        self._requests = _Bucket(requests_per_minute, burst, start) if requests_per_minute else None
        # Token estimates are coarse; a second's worth of burst there is harmless.
        self._tokens = (
            _Bucket(tokens_per_minute, tokens_per_minute / 60, start) if tokens_per_minute else None
        )
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
                        # The whole estimate is owed, so a big request delays the next ones.
                        self._tokens.level -= tokens
                    return
                self.waited += wait
            self._sleep(wait)
