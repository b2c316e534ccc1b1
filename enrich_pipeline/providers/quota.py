"""One quota per account: pacing shared by every process through a budget they all reach.

DashScope's limits are per account and model, whatever key, workspace or process sends: four
Dagster runs, a CLI backfill and a batch collect that each pace themselves at the full quota
send four or five times it. ``SharedRateLimiter`` asks a shared ``RateBudget`` (in practice
``db.quota.RateBudgetTable``, a row per account and model in the pipeline's database) for each
call's send time, so that together they keep the spacing of one limiter: one database round
trip per call.

If the budget cannot be reached (a database blip, a table not yet migrated), the process warns
once and paces alone with its local limiter, at the share of the account it was getting lately
(measured from the budget's own reservation counter), and tries the budget again after
``retry_after`` seconds. A budget failure never fails a call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from enrich_pipeline.providers.ratelimit import RateLimiter
from enrich_pipeline.providers.regions import host_of, region_of
from enrich_pipeline.settings import DashScopeSettings

log = logging.getLogger(__name__)

RETRY_AFTER = 15.0
"""Seconds of local pacing after the shared budget failed, before it is tried again."""
SHARE_WINDOW = 30.0
"""Seconds of this process's reservations that its share of the account is measured over."""


class RateBudget(Protocol):
    def reserve(
        self,
        account: str,
        model: str,
        *,
        request_spacing: float,
        token_spacing: float,
        not_before: float = 0.0,
    ) -> tuple[float, int]:
        """Reserve one send slot, ``not_before`` seconds from now at the earliest; returns
        (seconds to wait, reservations counted so far)."""
        ...

    def close(self) -> None: ...


def account_of(base_url: str) -> str:
    """The quota's owner as far as the pipeline can tell: the Model Studio region of the base
    URL (every process on one database is taken to use one account), else its host."""
    return region_of(base_url) or host_of(base_url) or base_url


class SharedRateLimiter:
    """Paces one model's calls on the shared budget, with a local fallback."""

    def __init__(
        self,
        local: RateLimiter,
        budget: RateBudget,
        account: str,
        model: str,
        *,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.local = local
        self.budget = budget
        self.account = account
        self.model = model
        self.retry_after = retry_after
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._retry_at = float("-inf")
        self._fallback: RateLimiter | None = None
        self._mine: deque[tuple[float, int]] = deque()  # (when, the budget's counter)
        self._latest = float("-inf")  # the latest send time this process was given
        self._queued = 0  # calls waiting in the local fallback
        self.shared_calls = 0
        self.local_calls = 0
        self.failures = 0
        self.waited = 0.0

    @property
    def limited(self) -> bool:
        return self.local.limited

    def share(self) -> float:
        """This process's share of the account's reservations over the last SHARE_WINDOW."""
        with self._lock:
            if len(self._mine) < 2:
                return 1.0
            (_, first), (_, last) = self._mine[0], self._mine[-1]
            if last <= first:
                return 1.0
            return min(1.0, (len(self._mine) - 1) / (last - first))

    def acquire(self, tokens: float = 0) -> None:
        if not self.local.limited:
            return
        now = self._clock()
        if now >= self._retry_at:
            with self._lock:
                # Back from local pacing: the budget does not know what was sent meanwhile, so
                # the first slots start after the local schedule's last one, and after those of
                # the calls still waiting in it.
                fallback, queued = self._fallback, self._queued
            not_before = (
                fallback.next_free() + queued * fallback.request_spacing - now
                if fallback is not None
                else 0.0
            )
            try:
                wait, counter = self.budget.reserve(
                    self.account,
                    self.model,
                    request_spacing=self.local.spacing_next(),
                    token_spacing=self.local.spacing_after(tokens),
                    not_before=not_before,
                )
            except Exception as exc:  # noqa: BLE001 - any budget failure: pace alone
                self._fall_back(exc)
            else:
                self._shared(counter, wait)
                if wait > 0:
                    self.waited += wait
                    self._sleep(wait)
                return
        with self._lock:
            fallback = self._fallback or self.local
            self.local_calls += 1
            self._queued += 1
        try:
            fallback.acquire(tokens)
        finally:
            with self._lock:
                self._queued -= 1

    def _shared(self, counter: int, wait: float) -> None:
        now = self._clock()
        with self._lock:
            self.shared_calls += 1
            self._latest = max(self._latest, now + wait)
            self._mine.append((now, counter))
            while self._mine and now - self._mine[0][0] > SHARE_WINDOW:
                self._mine.popleft()
            if self._fallback is not None:
                self._fallback = None
                log.warning(
                    "shared rate budget for %s/%s is reachable again: pacing with the other "
                    "processes",
                    self.account,
                    self.model,
                )

    def _fall_back(self, exc: Exception) -> None:
        share = self.share()
        with self._lock:
            self.failures += 1
            self._retry_at = self._clock() + self.retry_after
            if self._fallback is not None:
                return
            local = self.local
            self._fallback = RateLimiter(
                local.requests_per_minute * share,
                local.tokens_per_minute * share,
                per_second=local.per_second,
                margin=local.second - 1.0,
                clock=self._clock,
                sleep=self._sleep,
            )
            # Calls already given slots by the budget are still to go: start after them.
            self._fallback.defer(self._latest + self._fallback.request_spacing)
        log.warning(
            "shared rate budget for %s/%s unavailable (%s): pacing this process alone at "
            "%.0f%% of the quota (its recent share), trying again in %.0f s",
            self.account,
            self.model,
            exc,
            100 * share,
            self.retry_after,
        )


def pacer(
    settings: DashScopeSettings,
    model: str,
    requests_per_minute: float,
    tokens_per_minute: float = 0,
    budget: RateBudget | None = None,
) -> RateLimiter | SharedRateLimiter:
    """The limiter of one model: local, or on the shared budget when one is given."""
    local = RateLimiter(
        requests_per_minute,
        tokens_per_minute,
        per_second=settings.rate_per_second,
        margin=settings.rate_margin,
    )
    # The budget keeps a schedule of per-second spacing; without it there is nothing to share.
    if budget is None or not local.limited or not settings.rate_per_second:
        return local
    return SharedRateLimiter(local, budget, account_of(settings.url), model)
