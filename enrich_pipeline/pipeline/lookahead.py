"""Keeping caption calls in flight across a run's chunk steps.

The in-process executor runs one step at a time, depth first: ``visual_attributes[n]``,
``captions[n]``, ``caption_embeddings[n]``, ``write_results[n]``, then chunk n+1. Done strictly
in that order, no caption call is in flight while a chunk's images load, its tail of calls
drains, its embeddings run and it is written (measured: 0.72 of C/L at L = 2 s).

A run's ``Lookahead`` works one chunk ahead of the steps, in background threads, so that the
steps find their work done or under way:

- ``load``: when ``visual_attributes[n]`` runs, chunk n+1 is claimed and its images loaded in
  the background, while chunk n is captioned.
- ``captions`` (the default): as well, chunk n+1's caption calls are queued as soon as it is
  loaded, behind chunk n's, on one pool of ``concurrent`` workers; they take the slots chunk n's
  tail frees and keep going while chunk n is embedded and written.

Chunk n is always served first (the pool's queue is ordered by chunk), at most three chunks are
in memory (the one being written, the one being captioned, the one loading), and every chunk is
still written by its own ``write_results`` step as soon as its captions are done. Claims of
chunks taken ahead are held by the same lease keeper, so a run that dies gives them back within
one lease; a run that fails releases them at once (``abort``).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from enrich_pipeline.providers.base import FatalProviderError

S = TypeVar("S")
T = TypeVar("T")


class Overlap(Enum):
    """How far a run works ahead of its steps (run config ``overlap``)."""

    none = "none"
    load = "load"
    captions = "captions"


class CallPool:
    """``workers`` threads taking calls in priority order (lowest first, then FIFO).

    With ``rate`` (the calls a second the run may send: its share of the quota), no more calls
    are in flight than that rate can use: ``rate`` x the calls' mean duration (Little's law),
    between 1 and ``workers``. A run given a quarter of the quota then sends a quarter, evenly,
    instead of ``workers`` calls at once that the provider answers with 429 (DashScope also
    counts each second). A call function returns True when it reached the provider (a cache hit
    says nothing about latency).
    """

    def __init__(
        self,
        workers: int,
        name: str = "enrich-call",
        rate: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock  # times each call, for the mean duration
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        self.workers = max(1, workers)
        self.rate = rate if rate and rate > 0 else None
        self._gate = threading.Condition()
        self._in_flight = 0
        self._mean: float | None = None  # seconds a call takes, smoothed
        self.limit = self._limit()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
            for n in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def _limit(self) -> int:
        if self.rate is None:
            return self.workers
        mean = 1.0 if self._mean is None else self._mean  # a first guess until calls come back
        return max(1, min(self.workers, round(self.rate * mean)))

    def submit(self, priority: int, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.cancel()
            return future
        self._queue.put((priority, next(self._seq), (fn, future)))
        return future

    def _work(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            with self._gate:
                self._gate.wait_for(lambda: self._in_flight < self.limit)
                self._in_flight += 1
            started = self._clock()
            reached = False
            try:
                value = fn()
                reached = value is True
                future.set_result(value)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                reached = True
                future.set_exception(exc)
            finally:
                with self._gate:
                    self._in_flight -= 1
                    if reached:
                        took = self._clock() - started
                        self._mean = took if self._mean is None else 0.8 * self._mean + 0.2 * took
                        self.limit = self._limit()
                    self._gate.notify_all()

    def cancel_pending(self) -> None:
        """Cancel every call not started yet (after a fatal error)."""
        kept = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item[2] is not None:
                item[2][1].cancel()
            else:
                kept.append(item)
        for item in kept:
            self._queue.put(item)

    def close(self) -> None:
        self._closed = True
        self.cancel_pending()
        for _ in self._threads:
            self._queue.put((2**62, next(self._seq), None))


@dataclass
class _Ahead(Generic[S]):
    loaded: Future[S]
    calls: list[Future[Any]] = field(default_factory=list)


class Lookahead(Generic[S]):
    """One run's work ahead of its steps. ``S`` is the loaded chunk (a ``ChunkState``).

    ``load(spec)`` claims and loads a chunk; ``calls(state)`` returns the chunk's caption calls
    as zero-argument functions (one per item, True when it reached the provider);
    ``release(state)`` gives its claims back; ``rate`` caps the calls in flight (``CallPool``).
    """

    def __init__(
        self,
        specs: Sequence[Any],
        *,
        mode: Overlap,
        concurrent: int,
        load: Callable[[Any], S],
        calls: Callable[[S], list[Callable[[], Any]]],
        release: Callable[[S], None],
        rate: float | None = None,
    ) -> None:
        self.specs = list(specs)
        self.mode = mode
        self._load = load
        self._calls = calls
        self._release = release
        self._pool = CallPool(concurrent, "enrich-caption", rate=rate)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="enrich-lookahead")
        self._ahead: dict[int, _Ahead[S]] = {}
        self._started: dict[int, list[Future[Any]]] = {}
        self._lock = threading.Lock()
        self.stopped: BaseException | None = None

    # -- steps ------------------------------------------------------------------------------

    def visual(self, index: int) -> S:
        """Chunk ``index`` claimed and loaded (by the lookahead, or now), and the next one
        started in the background."""
        self._check()
        with self._lock:
            ahead = self._ahead.pop(index, None)
        if ahead is None:
            state = self._load(self.specs[index])
        else:
            state = ahead.loaded.result()
            if ahead.calls:
                with self._lock:
                    self._started[index] = ahead.calls
        if self.mode is not Overlap.none:
            self._prefetch(index + 1)
        return state

    def captions(self, index: int, state: S) -> None:
        """Wait for chunk ``index``'s caption calls (queued ahead, or queued now)."""
        self._check()
        with self._lock:
            calls = self._started.pop(index, None)
        if calls is None:
            calls = self._submit(index, state)
        try:
            for future in calls:
                future.result()
        except BaseException as exc:
            if isinstance(exc, FatalProviderError):
                self.stopped = exc
                self._pool.cancel_pending()
            for future in calls:
                future.cancel()
            raise

    # -- background -------------------------------------------------------------------------

    def _submit(self, index: int, state: S) -> list[Future[Any]]:
        return [self._pool.submit(index, fn) for fn in self._calls(state)]

    def _prefetch(self, index: int) -> None:
        if index >= len(self.specs) or self.stopped is not None:
            return
        with self._lock:
            if index in self._ahead:
                return
            entry: _Ahead[S] = _Ahead(Future())
            self._ahead[index] = entry

        def run() -> None:
            try:
                state = self._load(self.specs[index])
            except BaseException as exc:  # noqa: BLE001 - raised again by the step
                entry.loaded.set_exception(exc)
                return
            if self.mode is Overlap.captions and self.stopped is None:
                try:
                    entry.calls = self._submit(index, state)
                except BaseException as exc:  # noqa: BLE001
                    self._release(state)
                    entry.loaded.set_exception(exc)
                    return
            entry.loaded.set_result(state)

        self._loader.submit(run)

    def _check(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    # -- the end ----------------------------------------------------------------------------

    def abort(self, reason: BaseException | None = None) -> None:
        """Stop working ahead and give back the claims of chunks loaded ahead of their steps."""
        if reason is not None and self.stopped is None:
            self.stopped = reason
        self._pool.cancel_pending()
        with self._lock:
            ahead = list(self._ahead.values())
            self._ahead.clear()
        for entry in ahead:
            try:
                state = entry.loaded.result(timeout=60)
            except BaseException:  # noqa: BLE001 - nothing was claimed, or it failed loading
                continue
            for future in entry.calls:
                future.cancel()
            try:
                self._release(state)
            except Exception:  # noqa: BLE001 - the leases run out on their own
                pass

    def close(self) -> None:
        self.abort()
        self._pool.close()
        self._loader.shutdown(wait=False, cancel_futures=True)
