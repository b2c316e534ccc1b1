"""A chunk's claims are given back in one place: ``ChunkClaims.release`` returns what is still
held, once, whichever thread or failure path calls it, and leaves written parts alone."""

from __future__ import annotations

import threading
from pathlib import Path

from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.claims import ChunkClaims
from enrich_pipeline_tests.helpers import Items


def claim(store: Store, user: str, ids: list[str]) -> stages.Chunk:
    return stages.claim_chunk(store, user, ids, worker="run-1", lease_seconds=600, max_attempts=3)


def test_release_gives_back_what_is_held_once_from_any_thread(
    store: Store, items: Items, image_dir: Path
) -> None:
    image = str(image_dir / "blue.jpg")
    alice = [items.add("alice", image), items.add("alice", image)]
    bob = [items.add("bob", image)]
    claims = ChunkClaims(store, "run-1")
    claims.hold(claim(store, "alice", alice))
    claims.hold(claim(store, "bob", bob))
    assert claims.held == 3
    assert store.items.pending_ids("bob", limit=None, max_attempts=3) == []

    claims.written(0)  # alice's part was written: its write settles its claims
    assert claims.held == 1
    errors: list[BaseException] = []

    def release() -> None:
        try:
            claims.release()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=release) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    claims.release()

    assert errors == [] and claims.held == 0
    assert store.items.pending_ids("bob", limit=None, max_attempts=3) == bob
    held = {r[0] for r in items.execute("SELECT item_id FROM {ns}.enrich_claims")}
    assert held == set(alice)
