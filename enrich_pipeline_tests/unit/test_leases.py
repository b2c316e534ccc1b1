"""The lease keeper renews a live process's claims, and a gated worker's only while its gate
says the run still progresses (a stuck run's rows then come back when their leases run out)."""

from __future__ import annotations

import threading
import time

from enrich_pipeline.db.leases import LeaseKeeper

DEADLINE = 30.0  # generous: the machine may be loaded; the keeper renews every 0.33 s here


class Renewals:
    def __init__(self) -> None:
        self.by_worker: dict[str, int] = {}
        self.changed = threading.Condition()

    def __call__(self, worker: str, ids: list[str], lease_seconds: int) -> None:
        with self.changed:
            self.by_worker[worker] = self.by_worker.get(worker, 0) + 1
            self.changed.notify_all()

    def wait(self, worker: str, more_than: int) -> int:
        with self.changed:
            assert self.changed.wait_for(
                lambda: self.by_worker.get(worker, 0) > more_than, DEADLINE
            ), f"{worker} not renewed"
            return self.by_worker[worker]


def test_a_gated_workers_claims_are_renewed_only_while_it_progresses() -> None:
    renewals = Renewals()
    keeper = LeaseKeeper(renewals)
    progressing = threading.Event()
    progressing.set()
    try:
        keeper.gate("stuck", progressing.is_set)
        keeper.hold("stuck", ["1", "2"], lease_seconds=1)
        keeper.hold("other", ["3"], lease_seconds=1)
        renewals.wait("stuck", 1)
        progressing.clear()
        # One renewal may have read the gate just before: let a full round go by first.
        other = renewals.wait("other", renewals.wait("other", 0))
        stuck = renewals.by_worker["stuck"]
        renewals.wait("other", other + 2)
        assert renewals.by_worker["stuck"] == stuck
        progressing.set()
        renewals.wait("stuck", stuck)
    finally:
        keeper.close()


def test_an_ungated_workers_claims_are_renewed_until_dropped() -> None:
    renewals = Renewals()
    keeper = LeaseKeeper(renewals)
    try:
        keeper.hold("w", ["1"], lease_seconds=1)
        count = renewals.wait("w", 1)
        keeper.drop("w", ["1"])
        time.sleep(1.0)
        assert renewals.by_worker["w"] <= count + 1  # at most one already under way
    finally:
        keeper.close()
