"""Client-side pacing, as DashScope counts: per model, per minute and per second.

Model Studio's limits are RPM and TPM per account and model, and "also apply per second:
RPS = RPM / 60, TPS = TPM / 60. Burst requests within a single second can trigger throttling
even if total usage stays below the per-minute limit." A minute's quota sent in a burst is
therefore mostly answered 429. The limiter keeps, for each model's requests and tokens:

- **hard caps**: sliding logs of what was sent, so that no window of ``SECOND`` seconds holds
  more than ``RPM // 60`` requests (``TPM // 60`` tokens) and no window of ``MINUTE`` seconds
  more than RPM (TPM). The windows are a little longer than the provider's (``margin``, 5 % by
  default), so that jitter between our send and the provider's arrival cannot squeeze one call
  too many into the provider's second;
- **smoothing**: the next request goes no sooner than ``SECOND / RPS`` after the previous one
  (and after the previous one's tokens at ``SECOND / TPS`` a token): calls leave evenly spaced,
  at most ``burst`` at once (1 by default), instead of a second's quota at the top of each second.

A run faster than the quota therefore goes at ``1 / (1 + margin)`` of it, spread evenly, and a
pause (chunk writes, a Dagster step) costs only the pause: the per-second budget cannot be
saved up, because the provider does not save it up either. Per-second budgets round down (the
stricter reading; the docs do not say) but are never below one request (one token).

``per_second=False`` keeps only the minute windows (the older behaviour, for servers that count
only minutes, e.g. a local vLLM behind a proxy with an RPM cap).

Several processes share one account's quota through ``providers/quota.py``, which uses this
limiter's spacing for its schedule and this limiter as the fallback when that budget is away.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

MINUTE = 60.5
"""The minute windows: half a second longer than the provider's minute, for jitter."""
DEFAULT_MARGIN = 0.05
"""Share of a second by which the second windows (and the spacing) are longer than the
provider's: 5 % of the quota is given up so that 50 ms of jitter never costs a 429."""

FIRST_CALL_ALLOWANCE = 0.1
"""Seconds added to the spacing after a limiter's first request: a process's first call sets up
its HTTP client and arrives 50-80 ms late (measured here), which would squeeze the calls after
it into the provider's second."""

# Kept for callers that import the old name of the minute window.
WINDOW = MINUTE


class _Window:
    """At most ``limit`` units sent in any ``span`` seconds."""

    def __init__(self, limit: float, span: float) -> None:
        self.limit = limit
        self.span = span
        self.log: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def wait_time(self, amount: float, now: float) -> float:
        while self.log and now - self.log[0][0] >= self.span:
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
                return max(sent + self.span - now, 1e-3)
        return self.span  # unreachable: the log holds the whole total

    def take(self, amount: float, now: float) -> None:
        self.log.append((now, amount))
        self.total += amount


def per_second_budget(per_minute: float) -> int:
    """The provider's per-second budget for a per-minute limit: ``limit // 60``, at least 1."""
    return max(1, int(per_minute // 60))


class RateLimiter:
    """Requests and tokens of one model, paced per second and capped per minute."""

    def __init__(
        self,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        *,
        per_second: bool = True,
        margin: float = DEFAULT_MARGIN,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if margin < 0 or burst < 1:
            raise ValueError("margin must be >= 0 and burst >= 1")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.per_second = per_second
        self.second = 1.0 + margin
        self.burst = burst
        self._windows: list[tuple[_Window, bool]] = []  # (window, counts tokens)
        self.request_spacing = 0.0
        self.token_spacing = 0.0
        self.tokens_per_second = 0
        if requests_per_minute:
            self._windows.append((_Window(requests_per_minute, MINUTE), False))
            if per_second:
                rps = per_second_budget(requests_per_minute)
                self._windows.append((_Window(rps, self.second), False))
                self.request_spacing = self.second / rps
        if tokens_per_minute:
            self._windows.append((_Window(tokens_per_minute, MINUTE), True))
            if per_second:
                self.tokens_per_second = per_second_budget(tokens_per_minute)
                self._windows.append((_Window(self.tokens_per_second, self.second), True))
                self.token_spacing = self.second / self.tokens_per_second
        self._sent_any = False
        self._next_request = float("-inf")  # smoothing: when the next request may go
        self._next_token = float("-inf")
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self.waited = 0.0

    @property
    def limited(self) -> bool:
        return bool(self._windows)

    def spacing_next(self) -> float:
        """Seconds between this request and the next (more after the first one, see
        FIRST_CALL_ALLOWANCE). Called once per request sent."""
        if not self.request_spacing:
            return 0.0
        first, self._sent_any = not self._sent_any, True
        return self.request_spacing + (FIRST_CALL_ALLOWANCE if first else 0.0)

    def spacing_after(self, tokens: float) -> float:
        """Seconds the next request waits after one of ``tokens`` tokens, for a budget that
        keeps no log (the shared one): the time the per-second token budget takes to earn them
        back, the budget reduced by the request's own size, so that a window opening just
        before one request and closing just after the next holds no more than a second's
        worth (exact for requests of equal size)."""
        if not self.token_spacing or not tokens:
            return 0.0
        budget = self.tokens_per_second
        if tokens <= budget / 2:
            return self.second * tokens / (budget - tokens)
        # At most one such request fits in a second; a larger one goes alone (see _Window).
        return self.second * max(1.0, tokens / budget)

    def _wait(self, tokens: float, now: float) -> float:
        wait = 0.0
        for window, counts_tokens in self._windows:
            if counts_tokens:
                if tokens:
                    wait = max(wait, window.wait_time(tokens, now))
            else:
                wait = max(wait, window.wait_time(1, now))
        if self.request_spacing:
            tolerance = (self.burst - 1) * self.request_spacing
            wait = max(wait, self._next_request - tolerance - now)
        if self.token_spacing and tokens:
            wait = max(wait, self._next_token - now)
        return wait

    def _take(self, tokens: float, now: float) -> None:
        for window, counts_tokens in self._windows:
            if counts_tokens:
                if tokens:
                    window.take(tokens, now)
            else:
                window.take(1, now)
        if self.request_spacing:
            self._next_request = max(self._next_request, now) + self.spacing_next()
        if self.token_spacing and tokens:
            # The second windows hold the hard cap, so the smoothing can earn tokens back at
            # the full rate (spacing_after's reduced rate is for a budget without logs).
            self._next_token = max(self._next_token, now) + tokens * self.token_spacing

    def acquire(self, tokens: float = 0) -> None:
        """Block until one request of ``tokens`` estimated tokens may be sent, and book it."""
        if not self._windows:
            return
        while True:
            with self._lock:
                now = self._clock()
                wait = self._wait(tokens, now)
                if wait <= 1e-9:
                    self._take(tokens, now)
                    return
                self.waited += wait
            self._sleep(wait)

    def next_free(self) -> float:
        """When the next request could go by the smoothing schedule (this limiter's clock)."""
        with self._lock:
            return max(self._next_request, self._next_token)

    def defer(self, until: float) -> None:
        """Send the next request no sooner than ``until`` (this limiter's clock)."""
        with self._lock:
            self._next_request = max(self._next_request, until)
            self._next_token = max(self._next_token, until)
