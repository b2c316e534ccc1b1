"""Process faults and concurrency: a CLI killed with SIGKILL mid-run, two workers on one user,
and a caption written by someone else while a run is in flight.

The killed run is a real ``python -m enrich_pipeline.cli.captions`` subprocess against the test
database
and a private stand-in server; the test decides when to kill it from what the database and the
server show, so the assertions are exact (no "probably killed in the middle").
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from enrich_pipeline.cli import captions as cli
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.synthetic import color_word
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.pipeline.stats import ItemOutcome, RunStats
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings, RunSettings
from enrich_pipeline_tests.helpers import (
    API_KEY,
    PATCH_KEYS,
    Items,
    cli_env,
    good_chat_calls,
    hues,
    log_writes,
    mean_of,
    paint,
    writes,
)
from enrich_pipeline_tests.standin import StandIn

LOCAL = ImagePolicy(allow_local_files=True)


# --- helpers ---------------------------------------------------------------------------------


def seed(items: Items, paths: list[Path], user: str = "alice") -> tuple[list[str], dict[str, Any]]:
    ids = [
        items.add(user, str(p), metadata={"title": p.stem, "keep": n}) for n, p in enumerate(paths)
    ]
    return ids, {i: items.row(i)["metadata"] for i in ids}


def count(items: Items, table: str) -> int:
    return int(items.execute(f"SELECT count(*) FROM {{ns}}.{table}")[0][0])


def is_complete(md: dict[str, Any], before: dict[str, Any]) -> bool:
    return (
        PATCH_KEYS <= set(md)
        and bool(md["caption"])
        and all(md.get(k) == v for k, v in before.items())
    )


# --- a CLI killed with SIGKILL ---------------------------------------------------------------


class InFlight:
    """ASGI wrapper counting the stand-in's requests in progress, per endpoint.

    The stand-in logs a request when it completes; to kill the CLI at a moment when no paid call
    is on the wire the test also needs to see the ones still open.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.open = {"chat": 0, "embeddings": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = "chat" if str(scope.get("path", "")).endswith("/chat/completions") else "embeddings"
        with self.lock:
            self.open[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self.lock:
                self.open[kind] -= 1


# Deadlines with room for a busy machine (a Python start and a chunk can take tens of seconds
# at load 17 on two cores): the run reaches its kill point well within KILL_POINT_WITHIN, and
# its hung embedding calls never time out before it (which would change what the run does).
KILL_POINT_WITHIN = 180.0
CALL_TIMEOUT = 600


@pytest.fixture(scope="module")
def slow_server() -> Iterator[tuple[StandIn, InFlight]]:
    """A private stand-in with latency, so a chunk takes long enough to be killed in."""
    server = StandIn(api_key=API_KEY, latency=0.3, hang_seconds=2 * CALL_TIMEOUT)
    wrapper = InFlight(server.app)
    server.app = wrapper
    with server:
        yield server, wrapper


# Short, so the re-run can take the dead run's rows without the test waiting minutes. A live
# run renews its leases every third of a lease, so the killed run's claims still hold for two
# thirds of it (7 s) while the test looks at them: room for a busy machine.
LEASE = 10
CLI = [sys.executable, "-m", "enrich_pipeline.cli.captions", "--user-id", "alice"]
CLI += ["--batch-size", "2"]
CLI += ["--max-items", "0", "--concurrent", "2", "--lease-seconds", str(LEASE)]


def test_sigkill_mid_run_keeps_written_chunks_and_the_rerun_pays_nothing_twice(
    items: Items,
    store: Store,
    slow_server: tuple[StandIn, InFlight],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, wire = slow_server
    server.clear_faults()
    server.reset_log()
    # Two red images (the first chunk) and eight blue ones: distinct bytes and means, so the
    # cache merges nothing, but every blue caption says "blue".
    reds = [(200, 30, 30), (190, 45, 35)]
    blues = [(40 + 6 * k, 80 - 4 * k, 200 + 3 * (k % 3)) for k in range(6)]
    paths = paint(tmp_path / "img", reds + blues)
    assert [color_word(mean_of(p)) for p in paths] == ["red"] * 2 + ["blue"] * 6
    ids, before = seed(items, paths)
    log_writes(items)
    # Embedding requests for blue captions hang: the first chunk is written, the others are
    # captioned (paid, cached) and then stuck before their write. The run can only be killed.
    server.add_rule("timeout", text_contains="blue")

    env = cli_env(items, server, DASHSCOPE_TIMEOUT=str(CALL_TIMEOUT))
    out = (tmp_path / "run1.out").open("w")
    proc = subprocess.Popen(CLI, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Kill once a chunk is written and the run is stalled with no chat call on the wire and
        # every paid caption in the cache, stable for a second (longer than any gap between two
        # calls): then "paid" and "cached" are the same set and the count below is exact.
        stable_since: float | None = None
        deadline = time.monotonic() + KILL_POINT_WITHIN
        while True:
            assert proc.poll() is None, (tmp_path / "run1.out").read_text()
            assert time.monotonic() < deadline, "the run never reached the kill point"
            with wire.lock:
                chat_open, embed_open = wire.open["chat"], wire.open["embeddings"]
            quiet = (
                len(writes(items)) >= 2
                and chat_open == 0
                and embed_open >= 1
                and count(items, "enrich_answer_cache") == good_chat_calls(server)
            )
            if not quiet:
                stable_since = None
            elif stable_since is None:
                stable_since = time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        out.close()
    assert proc.returncode == -signal.SIGKILL

    paid_before_kill = good_chat_calls(server)
    written = writes(items)
    assert 2 <= len(written) < len(ids), "killed after a chunk was written and before the last"
    assert set(written.values()) == {1}
    rows = {i: items.row(i)["metadata"] for i in ids}
    done = [i for i in ids if i in written]
    # Every row written before the kill is complete; every other row is exactly as it was.
    for i in ids:
        if i in written:
            assert is_complete(rows[i], before[i]), rows[i]
        else:
            assert rows[i] == before[i], rows[i]
    assert count(items, "enrich_embeddings") == len(done)
    assert count(items, "enrich_failures") == 0

    # The dead run's claims outlive it until its lease runs out (nobody renews them now): until
    # then no run takes those rows, afterwards they are pending again.
    held = {r[0] for r in items.execute("SELECT item_id FROM {ns}.enrich_claims")}
    assert held and not held & set(written)
    assert not held & set(store.items.pending_ids("alice", limit=None, max_attempts=3))
    time.sleep(LEASE + 0.5)
    assert held <= set(store.items.pending_ids("alice", limit=None, max_attempts=3))

    # The re-run is the same command line, in-process (a second interpreter start buys nothing).
    server.clear_faults()
    for name in [n for n in os.environ if n.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    assert cli.main(CLI[3:], out=out) == 0, out.getvalue()
    report = out.getvalue()

    # Finished: every row captioned once, nothing lost, nothing left claimed or failed.
    assert writes(items) == dict.fromkeys(ids, 1)
    for i in ids:
        assert is_complete(items.row(i)["metadata"], before[i])
    assert count(items, "enrich_embeddings") == len(ids)
    assert count(items, "enrich_failures") == 0
    assert count(items, "enrich_claims") == 0
    # Not paid twice: what the dead run paid for came from the cache.
    assert good_chat_calls(server) == len(ids) == len({p.read_bytes() for p in paths})
    hits = re.search(r"^  Cache hits:\s+(\d+)", report, re.M)
    assert hits and int(hits.group(1)) == paid_before_kill - len(done), report
    assert re.search(r"^  Failed:\s+0$", report, re.M), report


# --- concurrency -------------------------------------------------------------------------------


def test_two_workers_on_the_same_user_write_each_row_once(
    items: Items,
    store: Store,
    standin: StandIn,
    api_settings: DashScopeSettings,
    tmp_path: Path,
) -> None:
    ids, before = seed(items, paint(tmp_path, hues(20)))
    by_hand = [
        items.add("alice", str(tmp_path / "img00.png"), metadata={"caption": f"by hand {n}"})
        for n in range(2)
    ]
    hand_before = {i: items.row(i) for i in by_hand}
    log_writes(items)
    standin.latency = 0.05
    other = Store(items.settings)
    other.setup()
    engines = [
        Engine(
            s,
            DashScopeProvider(api_settings),
            api_settings,
            RunSettings(batch_size=3, concurrent=2),
            image_policy=LOCAL,
        )
        for s in (store, other)
    ]
    barrier = threading.Barrier(2)
    results: dict[int, RunStats | BaseException] = {}

    def work(n: int) -> None:
        barrier.wait()
        try:
            results[n] = engines[n].enrich("alice", worker=f"worker-{n}")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[n] = exc

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        other.close()

    stats = [results[0], results[1]]
    assert all(isinstance(s, RunStats) for s in stats), stats
    a, b = stats[0], stats[1]
    assert isinstance(a, RunStats) and isinstance(b, RunStats)
    assert a.succeeded + b.succeeded == 20 and a.failed == b.failed == 0
    # Each row: one committed write, one paid call; the rows captioned by hand untouched.
    assert writes(items) == dict.fromkeys(ids, 1)
    assert good_chat_calls(standin) == 20
    for i in ids:
        assert is_complete(items.row(i)["metadata"], before[i])
    assert {i: items.row(i) for i in by_hand} == hand_before
    assert count(items, "enrich_embeddings") == 20
    assert count(items, "enrich_claims") == 0 and count(items, "enrich_failures") == 0


def test_caption_written_by_someone_else_mid_run_is_kept(
    items: Items,
    store: Store,
    standin: StandIn,
    api_settings: DashScopeSettings,
    tmp_path: Path,
) -> None:
    paths = paint(tmp_path, hues(3))
    ids, before = seed(items, paths)
    target = ids[1]
    log_writes(items)
    # The target's first call fails (500): while the pipeline backs off, a person captions the
    # row. The retry succeeds and the pipeline holds a paid caption for a row no longer empty.
    standin.add_rule("500", color=mean_of(paths[1]), tolerance=8, times=1)
    written_by_hand = threading.Event()

    def backoff(seconds: float) -> None:
        if not written_by_hand.is_set():
            items.write_by_hand(target, caption="theirs, by hand")
            written_by_hand.set()
        time.sleep(seconds)

    provider = DashScopeProvider(api_settings, sleep=backoff)
    eng = Engine(store, provider, api_settings, RunSettings(), image_policy=LOCAL)
    outcomes: list[ItemOutcome] = []
    stats = eng.enrich("alice", on_outcome=lambda _user, o: outcomes.append(o))

    assert written_by_hand.is_set() and provider.usage.retries == 1
    assert (stats.succeeded, stats.skipped, stats.failed) == (2, 1, 0)
    status = {o.item_id: o.status for o in outcomes}
    assert status == {ids[0]: "succeeded", target: "skipped", ids[2]: "succeeded"}
    # The other caption is kept as it was: nothing of the pipeline's was merged into the row.
    assert items.row(target)["metadata"] == {**before[target], "caption": "theirs, by hand"}
    assert writes(items) == dict.fromkeys(ids, 1)  # the target's one write is the person's
    for i in (ids[0], ids[2]):
        assert is_complete(items.row(i)["metadata"], before[i])
    assert items.execute(
        "SELECT count(*) FROM {ns}.enrich_embeddings WHERE item_id = %s", (target,)
    ) == [(0,)]
    assert count(items, "enrich_claims") == 0 and count(items, "enrich_failures") == 0
