"""The claims one chunk holds, and the one way they are given back.

A chunk is claimed user by user (one part per user, each scoped to its user) and ends in one of
many ways: written part by part, failed by a step, stopped by the provider, dropped by a
lookahead that was aborted, or failed while it was still being claimed. Each of them calls
``release``, which gives back whatever is still held, once: a second call (a step's failure
after the lookahead's abort, say) finds nothing left and does nothing, from any thread.
"""

from __future__ import annotations

import threading

from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.stages import Chunk


class ChunkClaims:
    """The rows of a chunk still held by ``worker``, part by part, until written or released."""

    def __init__(self, store: Store, worker: str) -> None:
        self.store = store
        self.worker = worker
        self._held: list[tuple[str, list[str]] | None] = []
        self._lock = threading.Lock()

    def hold(self, part: Chunk) -> int:
        """A part just claimed; its index for ``written``."""
        with self._lock:
            self._held.append((part.user_id, [w.item.id for w in part.items]))
            return len(self._held) - 1

    def written(self, index: int) -> None:
        """Part ``index`` was written: writing settled its claims, nothing is left to give back."""
        with self._lock:
            self._held[index] = None

    @property
    def held(self) -> int:
        """Rows still held."""
        with self._lock:
            return sum(len(p[1]) for p in self._held if p is not None)

    def release(self) -> None:
        """Give back every claim still held (each part scoped to its user); then nothing is held.

        Every part is tried; the first error is raised after the others were given back."""
        with self._lock:
            parts = [p for p in self._held if p is not None and p[1]]
            self._held = [None] * len(self._held)
            error: Exception | None = None
            for user_id, ids in parts:
                try:
                    self.store.items.release(user_id, ids, worker=self.worker)
                except Exception as exc:  # noqa: BLE001 - raised once the others are back
                    error = error or exc
        if error is not None:
            raise error
