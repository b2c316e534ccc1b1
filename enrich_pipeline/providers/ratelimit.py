"""A client-side limiter for requests and tokens per minute, shared by every worker thread.

Pacing calls keeps a high-concurrency run under the provider's quota instead of living on 429
retries. The quota is "so many a minute", counted over a sliding minute, and the limiter counts
the same way: a call may go when the calls (or tokens) sent in the last minute leave room for
it. Unlike a smoothing token bucket, a pause (a run between chunks, a Dagster step that writes)
does not waste quota: the next calls use it. The window is half a second longer than a minute,
so that network jitter between our clock and the provider's cannot squeeze one call too many
into the provider's minute.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW = 60.5


class _Window:
    """At most ``limit`` units sent in any ``WINDOW`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.log: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def wait_time(self, amount: float, now: float) -> float:
        while self.log and now - self.log[0][0] >= WINDOW:
            self.total -= self.log.popleft()[1]
        # A single request larger than the whole limit goes alone, once the window is empty.
        amount = min(amount, self.limit)
        excess = self.total + amount - self.limit
        if excess <= 1e-9:
            return 0.0
        freed = 0.0
        for sent, units in self.log:
            freed += units
            if freed >= excess - 1e-9:
                return max(sent + WINDOW - now, 1e-3)
        return WINDOW  # unreachable: the log holds the whole total

    def take(self, amount: float, now: float) -> None:
        self.log.append((now, amount))
        self.total += amount


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._requests = _Window(requests_per_minute) if requests_per_minute else None
        self._tokens = _Window(tokens_per_minute) if tokens_per_minute else None
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
                        self._requests.take(1, now)
                    if self._tokens and tokens:
                        self._tokens.take(tokens, now)
                    return
                self.waited += wait
            self._sleep(wait)
