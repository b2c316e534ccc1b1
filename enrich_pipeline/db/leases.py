"""Lease renewal for the claims a live process holds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import psycopg


class LeaseKeeper:
    """Renews the leases of the claims a live process holds, every third of a lease.

    Leases can then be short: rows claimed by a process that was killed come back to the
    pending set within one lease, while a slow chunk of a live process is never taken over.
    A worker may be gated (``gate``): its claims are renewed only while its gate says it still
    makes progress, so that the rows of a process that is alive but stuck come back too.
    """

    def __init__(self, renew: Callable[[str, list[str], int], None]) -> None:
        self._renew = renew
        self._held: dict[tuple[str, int], set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = 30.0
        self._gates: dict[str, Callable[[], bool]] = {}

    def hold(self, worker: str, ids: Iterable[str], lease_seconds: int) -> None:
        with self._lock:
            self._held.setdefault((worker, lease_seconds), set()).update(ids)
            self._interval = min(self._interval, max(0.2, lease_seconds / 3))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="enrich-lease-keeper", daemon=True
                )
                self._thread.start()

    def gate(self, worker: str, alive: Callable[[], bool]) -> None:
        """Renew ``worker``'s claims only while ``alive()``; a later gate replaces this one."""
        with self._lock:
            self._gates[worker] = alive

    def drop(self, worker: str, ids: Iterable[str]) -> None:
        gone = set(ids)
        with self._lock:
            for key in [k for k in self._held if k[0] == worker]:
                self._held[key] -= gone
                if not self._held[key]:
                    del self._held[key]

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                batches = [(w, sorted(ids), lease) for (w, lease), ids in self._held.items()]
                gates = dict(self._gates)
            for worker, ids, lease in batches:
                if worker in gates and not gates[worker]():
                    continue  # stuck: its leases run out, and its rows come back
                try:
                    self._renew(worker, ids, lease)
                except psycopg.Error:
                    # The database is away; the write retries, and an expired lease only
                    # lets another run take rows this one will then find already written.
                    continue

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
