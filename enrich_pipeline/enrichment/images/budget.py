"""A bound on the decoded pixels one process holds at once (:class:`PixelBudget`).

Decoding is where an image costs memory: a 50-megapixel PNG is 150 MB of RGB before it is
reduced to the working copy, and every load in flight (``--concurrent``, the Dagster run's
threads) decodes at the same time: 16 of them at the 50-megapixel cap held 1.5 GB. Each decode
takes its pixel count, read from the header before any pixel is decoded, from one budget shared
by the whole process, and gives it back when the working copy is ready; a load that does not fit
waits. Loads are served in arrival order, so a large image is not overtaken forever by small
ones, and an image larger than the whole budget still goes, alone, rather than never.

A bound on pixels at once bounds memory only if freed pixels go back to the system. glibc's
malloc gives each thread an arena of its own and, once a large block has been freed, serves the
next large ones from those arenas instead of mapping them afresh; each arena then keeps its own
peak, and 16 threads each decoding 12 MP one after the other held 956 MB with at most 24 MP
decoded at a time (224 MB once freed buffers are returned). So a process that takes a budget
also fixes malloc's mapping threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``, which also stops
its automatic raising): every image-sized buffer is mapped when allocated and unmapped when
freed. Elsewhere than glibc this is skipped.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache


class PixelBudget:
    """At most ``capacity`` pixels held at once across threads, first come, first served.

    ``peak`` is the most ever held at once and ``waits`` how many holds had to wait: what the
    tests and a curious operator read.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.held = 0
        self.peak = 0
        self.waits = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        # More than the whole budget is charged as the whole budget: it waits for an empty
        # budget, then goes alone.
        charge = max(0, min(pixels, self.capacity))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            if not self._fits(ticket, charge):
                self.waits += 1
                try:
                    self._cond.wait_for(lambda: self._fits(ticket, charge))
                except BaseException:
                    # Interrupted in line (Ctrl-C in the main thread): leave the line, or
                    # everyone behind would wait for this ticket forever.
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                    raise
            self._queue.popleft()
            self.held += charge
            self.peak = max(self.peak, self.held)
            self._cond.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            with self._cond:
                self.held -= charge
                self._cond.notify_all()

    def waiting(self) -> int:
        """Holds waiting for pixels now."""
        with self._cond:
            return len(self._queue)

    def _fits(self, ticket: object, charge: int) -> bool:
        return self._queue[0] is ticket and self.held + charge <= self.capacity


@cache
def shared_budget(capacity: int) -> PixelBudget:
    """The process's budget of ``capacity`` pixels: every load with the same setting shares it
    (the CLI's item threads, a Dagster run's op threads and its lookahead alike)."""
    return_freed_buffers()
    return PixelBudget(capacity)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


@cache
def return_freed_buffers() -> bool:
    """Have malloc map every block of ``MMAP_THRESHOLD`` bytes or more on its own, so freeing it
    returns it to the system (module docstring). True where it took effect (glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
