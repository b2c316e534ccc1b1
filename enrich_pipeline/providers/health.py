"""Run-wide call policy: how a run slows down when the provider struggles, and when it gives up.

A failure that is not one row's (throttling, an outage, an unreachable or mistyped endpoint,
timeouts on call after call) must never cost a row an attempt. One ``Governor`` per model
(DashScope limits and fails each model separately) sees every attempt and every call:

- **fewer calls in flight**: each throttle or service failure halves the calls let in flight
  (at most once per pause, so one burst of failures is one cut), each success lets one more in
  (additive increase, multiplicative decrease, as TCP does);
- **longer waits, shared**: the same failure pauses every call of the model, not only the
  failing one, for half its backoff ceiling (the server's Retry-After when it sends one), so the
  whole run backs off instead of each call hammering on its own schedule;
- **a health record** of the last ``WINDOW`` calls: a service error that persisted through one
  row's retries is that row's only while most other calls succeed (``healthy``);
- **giving up**: after ``GIVE_UP_AFTER`` calls in a row failed past their retries with no
  success between (or most of the recent calls did), the provider stops the run with one
  ``ProviderUnavailable`` saying what happened; every other call then stops without a request.
  Rows not yet written are given back untouched.

How long a run rides out a storm follows from the retry settings: each call tries
1 + ``DASHSCOPE_MAX_RETRIES`` times with backoff from ``DASHSCOPE_BACKOFF_INITIAL`` doubling up to
its cap, and the run gives up after three such calls failed in a row (about 10 s with the
defaults). Raise ``DASHSCOPE_MAX_RETRIES`` to wait longer.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from enrich_pipeline.providers.base import (
    SCOPE_ROW,
    FatalProviderError,
    ProviderError,
    ProviderUnavailable,
)
from enrich_pipeline.providers.errors import CallContext

GIVE_UP_AFTER = 3  # calls in a row failed past their retries, with no success between
WINDOW = 20  # recent calls the health record keeps
MAX_IN_FLIGHT = 1024  # the caller's concurrency is the real bound until a failure cuts it

_WHAT = {
    "connection": "unreachable",
    "rate_limited": "throttling every call",
    "timeout": "not answering in time",
    "server_error": "failing",
    "malformed_response": "answering unreadably",
    "answer_too_large": "sending answers over DASHSCOPE_MAX_ANSWER_BYTES",
}


class StopLatch:
    """The provider's stop: once set, every call raises it without making a request, and
    every wait (a backoff, a pause, a slot) ends at once."""

    def __init__(self) -> None:
        self._error: FatalProviderError | None = None
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._conditions: list[threading.Condition] = []

    def watch(self, condition: threading.Condition) -> None:
        self._conditions.append(condition)

    @property
    def error(self) -> FatalProviderError | None:
        return self._error

    def set(self, error: FatalProviderError) -> FatalProviderError:
        """Stop (the first error wins) and return the error the run stops with."""
        with self._lock:
            if self._error is None:
                self._error = error
                self._event.set()
            first = self._error
        for condition in self._conditions:
            with condition:
                condition.notify_all()
        return first

    def reset(self) -> None:
        """A new run: the previous run's stop no longer applies."""
        with self._lock:
            self._error = None
            self._event.clear()

    def check(self) -> None:
        error = self._error
        if error is not None:
            # A fresh instance per raise: threads must not share one traceback.
            again = type(error)(error.code, str(error), kind=error.kind)
            raise again

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the run stops meanwhile."""
        self._event.wait(max(0.0, seconds))


class Governor:
    """One model's calls: admission (adaptive concurrency, shared pause), outcomes, health and
    the give-up rule. See the module docstring."""

    def __init__(
        self,
        ctx: CallContext,
        *,
        backoff_initial: float,
        backoff_max: float,
        stop: StopLatch,
        give_up_after: int = GIVE_UP_AFTER,
        window: int = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop = stop
        self.give_up_after = give_up_after
        self.clock = clock
        self.limit = MAX_IN_FLIGHT
        self.lowest_limit = MAX_IN_FLIGHT  # how far the run slowed down (for tests and logs)
        self.pauses = 0
        self.in_flight = 0
        # Whether this model's endpoint ever answered a call properly: until it has, an answer
        # that is not the API's means the base URL is wrong (``errors.classify``).
        self.answered = False
        self._cond = threading.Condition()
        stop.watch(self._cond)
        self._pause_until = 0.0
        self._no_cut_until = 0.0
        self._streak = 0  # failed attempts since the last success
        self._failing_since: float | None = None
        self._failed_in_a_row = 0  # calls failed past their retries since the last success
        self._run_failures = 0  # calls of this run that failed past their retries
        # The health record outlives a run (a provider used for several runs keeps its evidence).
        self._recent: deque[bool] = deque(maxlen=window)
        self._refusal: tuple[tuple[str, str], int] = (("", ""), 0)

    def begin_run(self) -> None:
        """A new run: its own give-up count (the health record and the pace are kept)."""
        with self._cond:
            self._failed_in_a_row = 0
            self._run_failures = 0
            self._refusal = (("", ""), 0)
            self._streak = 0
            self._failing_since = None

    # -- admission -----------------------------------------------------------------------

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Wait for the shared pause to end and for room in flight; raise the stop if set."""
        with self._cond:
            while True:
                self.stop.check()
                wait = self._pause_until - self.clock()
                if wait > 0:
                    self._cond.wait(wait)
                elif self.in_flight >= self.limit:
                    self._cond.wait(1.0)
                else:
                    break
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()

    # -- attempts ------------------------------------------------------------------------

    def attempt_ok(self) -> None:
        with self._cond:
            self.answered = True
            self._streak = 0
            self._failing_since = None
            if self.limit < MAX_IN_FLIGHT:
                self.limit += 1
                self._cond.notify_all()

    def attempt_failed(
        self, error: ProviderError, hint: float | None = None, attempt: int = 1
    ) -> None:
        """A failed try (the call's ``attempt``-th). Throttling and service failures slow every
        call of the model down: the calls in flight are halved and every call waits half the
        failing call's backoff ceiling (or the server's Retry-After); a row's own rejection
        slows nothing down."""
        if error.scope == SCOPE_ROW:
            return
        with self._cond:
            now = self.clock()
            self._streak += 1
            if self._failing_since is None:
                self._failing_since = now
            if now >= self._no_cut_until:
                self.limit = max(1, min(self.limit, self.in_flight) // 2)
                self.lowest_limit = min(self.lowest_limit, self.limit)
            ceiling = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
            pause = min(hint, self.backoff_max) if hint is not None else ceiling / 2
            if now + pause > self._pause_until:
                self._pause_until = now + pause
                self.pauses += 1
            self._no_cut_until = self._pause_until

    # -- calls ---------------------------------------------------------------------------

    def call_ok(self) -> None:
        with self._cond:
            self._recent.append(True)
            self._failed_in_a_row = 0
            self._refusal = (("", ""), 0)

    def call_failed(self, error: ProviderError, tries: int) -> ProviderError:
        """A call that failed for good (past its retries, or permanently): the error the row
        sees, or the run's stop when this was one failure too many."""
        if isinstance(error, FatalProviderError):
            return self.stop.set(error)
        if error.scope == SCOPE_ROW:
            return self._refused(error)
        with self._cond:
            self._recent.append(False)
            self._failed_in_a_row += 1
            self._run_failures += 1
            failed = self._recent.count(False)
            most = len(self._recent) >= self._recent.maxlen // 2 and 2 * failed > len(self._recent)
            if self._failed_in_a_row < self.give_up_after and not most:
                return error
            since = self._failing_since if self._failing_since is not None else self.clock()
            elapsed = self.clock() - since
            streak = self._streak
        what = _WHAT.get(error.code, "failing")
        return self.stop.set(
            ProviderUnavailable(
                "provider_unavailable",
                f"DashScope {what} at {self.ctx.where} ({self.ctx.kind} model "
                f"{self.ctx.model!r}): {streak} tries failed over {elapsed:.1f} s with no "
                f"success, the last: {error}; no row was charged an attempt, the rows not "
                "written are left pending: run again later",
                kind=self.ctx.kind,
            )
        )

    def _refused(self, error: ProviderError) -> ProviderError:
        """A row's rejection. The same unrecognised refusal on call after call is not the rows'
        (the table missed a request problem): stop rather than give every row up."""
        if not (error.code == "bad_request" or error.code.startswith("http_")):
            with self._cond:
                self._refusal = (("", ""), 0)
            return error
        key = (error.code, re.sub(r"[0-9a-f-]{8,}|\d+", "#", str(error)))
        with self._cond:
            same, count = self._refusal
            count = count + 1 if same == key else 1
            self._refusal = (key, count)
        if count < self.give_up_after:
            return error
        return self.stop.set(
            FatalProviderError(
                "request_refused",
                f"DashScope refused {count} calls in a row with the same answer ({error}): a "
                f"problem of the request or the settings, not of the images; check "
                f"{self.ctx.the_model} and {self.ctx.where}",
                kind=self.ctx.kind,
            )
        )

    def healthy(self) -> bool:
        """Most recent calls succeeded (at least one, and no fewer than failed)."""
        with self._cond:
            ok = self._recent.count(True)
            return ok > 0 and ok >= len(self._recent) - ok

    def row_at_fault(self, *, likely_row: bool = False) -> bool:
        """Whether a service error that persisted through one row's retries is the row's: yes
        while most recent calls succeed and the provider answered since the previous failed
        call (two failed calls in a row: it is failing now); with no success at all to go by,
        only for an error that is likely the row's (an HTTP 500) and the run's only failed
        call so far."""
        with self._cond:
            if self._failed_in_a_row > 1:
                return False
            ok = self._recent.count(True)
            if ok:
                return ok >= len(self._recent) - ok
            return likely_row and self._run_failures <= 1
