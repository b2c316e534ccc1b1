"""API faults injected for real: the stand-in DashScope server misbehaves, the real pipeline runs.

Each test runs the Engine (or the CLI) over a real PostgreSQL and the stand-in server through the
real ``openai`` client, then asserts on what is left in the database (captions, failure ledger,
claims, embeddings) and on what the user sees (statistics, report, exit code, stderr).

Fault matrix covered here (see the README's fault matrix):

- 429 (with and without Retry-After), 500, 503, hang past the timeout, connection reset,
  malformed JSON body, empty caption: transient, retried with backoff, the row captioned once.
- The same faults that never clear: the row recorded as transient with attempts and last error.
- Moderation and bad-image rejections: permanent, recorded once, exactly one call.
- 401: the run stops at once (FatalProviderError / exit code 3), nothing marked failed, claims
  released, later rows not attempted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.base import FatalProviderError
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings, RunSettings
from enrich_pipeline_tests.helpers import (
    API_KEY,
    PATCH_KEYS,
    Items,
    hues,
    mean_of,
    paint,
    run_cli,
    standin_settings,
)
from enrich_pipeline_tests.standin import StandIn

LOCAL = ImagePolicy(allow_local_files=True)
TRANSIENT = ["429", "500", "503", "timeout", "reset", "malformed", "empty_caption"]
# Throttling past the retries is never the row's fault: such a row is given back
# uncharged rather than recorded, see faults/test_provider_failures.py
# ::test_throttling_on_one_row_past_the_retries_costs_it_nothing.
ROW_TRANSIENT = [f for f in TRANSIENT if f != "429"]
TRANSIENT_CODES = {
    "429": "rate_limited",
    "500": "server_error",
    "503": "server_error",
    "timeout": "timeout",
    "reset": "connection",
    "malformed": "malformed_response",
    "empty_caption": "empty_caption",
}


# --- helpers ---------------------------------------------------------------------------------


def seed(items: Items, paths: list[Path], user: str = "alice") -> tuple[list[str], dict[str, Any]]:
    """Rows with metadata the pipeline must keep; returns ids and their metadata before."""
    ids = [
        items.add(user, str(p), metadata={"title": p.stem, "price": n, "tags": ["keep"]})
        for n, p in enumerate(paths)
    ]
    return ids, {i: items.row(i)["metadata"] for i in ids}


def engine(
    store: Store,
    api: DashScopeSettings,
    *,
    sleep: Callable[[float], None] | None = None,
    **run: Any,
) -> Engine:
    provider = DashScopeProvider(api, sleep=sleep)
    return Engine(store, provider, api, RunSettings(**run), image_policy=LOCAL)


def chat(standin: StandIn, *, fault: str | None = None, ok: bool = False) -> int:
    """Chat requests the stand-in finished: all, those served ``fault``, or the good answers."""
    log = list(standin.requests)  # a copy: the server appends from its own thread
    return sum(
        1
        for r in log
        if r["endpoint"] == "chat"
        and (fault is None or r["fault"] == fault)
        and (not ok or (r["fault"] is None and r["status"] == 200))
    )


def assert_captioned_once(items: Items, ids: list[str], before: dict[str, Any]) -> None:
    """Full patch written, every key the row had kept, exactly one embedding each."""
    for i in ids:
        md = items.row(i)["metadata"]
        assert PATCH_KEYS <= set(md), (i, md)
        assert md["caption"] and md["dominant_colors"], md
        assert {k: md[k] for k in before[i]} == before[i], "an existing key was lost"
    emb = dict(
        items.execute(
            "SELECT item_id, count(*) FROM {ns}.enrich_embeddings"
            " WHERE item_id = ANY(%s) GROUP BY item_id",
            (ids,),
        )
    )
    assert emb == dict.fromkeys(ids, 1)


def assert_untouched(items: Items, ids: list[str], before: dict[str, Any]) -> None:
    for i in ids:
        assert items.row(i)["metadata"] == before[i], i


def claims(items: Items) -> int:
    return items.execute("SELECT count(*) FROM {ns}.enrich_claims")[0][0]


# How long a hung request stays open on a private server (its stop ends it at once): long, so
# that a call ended by its 0.5 s timeout is told from one that waited, however busy the machine.
HANG = 30.0


@pytest.fixture
def server_for(standin: StandIn) -> Iterator[Callable[[str], StandIn]]:
    """The shared stand-in, or a private one for hangs.

    A hung request stays open on the server for ``hang_seconds`` and is logged when it ends, so
    on the shared server it would land in a later test's request log. A private server is
    stopped at the end of the test, which wakes and finishes its hung requests at once.
    """
    private: list[StandIn] = []

    def pick(fault: str) -> StandIn:
        if fault != "timeout":
            return standin
        server = StandIn(api_key=API_KEY, hang_seconds=HANG).start()
        private.append(server)
        return server

    yield pick
    for server in private:
        server.stop()


def settings_for(server: StandIn, **overrides: Any) -> DashScopeSettings:
    # A hung request fails after 0.5 s, long before the hang ends.
    return standin_settings(server, **{"timeout": 0.5, **overrides})


# --- transient faults that clear ---------------------------------------------------------------


@pytest.mark.parametrize("fault", TRANSIENT)
def test_transient_fault_is_retried_and_the_row_captioned_once(
    fault: str,
    items: Items,
    store: Store,
    server_for: Callable[[str], StandIn],
    tmp_path: Path,
) -> None:
    server = server_for(fault)
    ids, before = seed(items, paint(tmp_path, hues(3)))
    server.inject(fault, times=2, endpoint="chat")
    eng = engine(store, settings_for(server))

    started = time.monotonic()
    stats = eng.enrich("alice")
    elapsed = time.monotonic() - started

    assert (stats.total, stats.succeeded, stats.failed, stats.skipped) == (3, 3, 0, 0)
    assert eng.usage.retries == 2
    assert chat(server, ok=True) == 3, "each row is captioned by exactly one good answer"
    assert_captioned_once(items, ids, before)
    assert store.items.failures("alice") == []
    assert claims(items) == 0
    if fault == "timeout":
        # Two requests hung; the run gave up on each after 0.5 s instead of waiting out HANG.
        assert elapsed < HANG / 2
    else:
        assert chat(server, fault=fault) == 2


def test_retry_after_is_honoured(
    items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids, before = seed(items, paint(tmp_path, hues(1)))
    standin.inject("429", times=2, endpoint="chat", retry_after=0.3)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    # backoff_max stays at its default (30 s): the server's hint is below it and must win over
    # the 10 ms the exponential backoff would pick.
    api = settings_for(standin, backoff_max=30.0)
    eng = engine(store, api, sleep=sleep)
    stats = eng.enrich("alice")

    assert stats.succeeded == 1
    assert slept == [pytest.approx(0.3), pytest.approx(0.3)]
    assert eng.usage.retries == 2
    assert chat(standin, fault="429") == 2 and chat(standin, ok=True) == 1
    assert_captioned_once(items, ids, before)
    assert store.items.failures("alice") == []


def test_429_without_retry_after_backs_off_exponentially_with_jitter(
    items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids, before = seed(items, paint(tmp_path, hues(1)))
    standin.inject("429", times=3, endpoint="chat")
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    eng = engine(store, settings_for(standin, backoff_initial=0.04, backoff_max=30.0), sleep=sleep)
    assert eng.enrich("alice").succeeded == 1
    # Full jitter under an exponentially growing ceiling: 40, 80, 160 ms (the draws themselves
    # are checked with an injected random source in unit/test_backoff.py).
    assert len(slept) == 3
    for n, seconds in enumerate(slept):
        ceiling = 0.04 * 2**n
        assert 0.0 <= seconds <= ceiling, (n, seconds)
    assert eng.usage.retries == 3
    assert_captioned_once(items, ids, before)


# --- transient faults that never clear ---------------------------------------------------------


@pytest.mark.parametrize("fault", ROW_TRANSIENT)
def test_exhausted_retries_record_a_transient_failure(
    fault: str,
    items: Items,
    store: Store,
    server_for: Callable[[str], StandIn],
    tmp_path: Path,
) -> None:
    server = server_for(fault)
    paths = paint(tmp_path, hues(3))
    ids, before = seed(items, paths)
    target, others = ids[0], ids[1:]
    server.add_rule(fault, color=mean_of(paths[0]), tolerance=8)  # forever
    eng = engine(store, settings_for(server, max_retries=2))

    stats = eng.enrich("alice")

    assert (stats.total, stats.succeeded, stats.failed) == (3, 2, 1)
    assert stats.errors == {TRANSIENT_CODES[fault]: 1}
    (entry,) = store.items.failures("alice")
    assert (entry.item_id, entry.attempts, entry.permanent) == (target, 1, False)
    assert entry.error_code == TRANSIENT_CODES[fault] and entry.last_error
    assert eng.usage.retries == 2  # max_retries, all on the target
    assert_untouched(items, [target], before)
    assert_captioned_once(items, others, before)
    assert items.execute(
        "SELECT count(*) FROM {ns}.enrich_embeddings WHERE item_id = %s", (target,)
    ) == [(0,)]
    assert claims(items) == 0
    # Transient: still pending, and the next run tries again and counts a second attempt.
    assert store.items.count_pending("alice", max_attempts=3) == 1
    if fault != "timeout":
        assert chat(server, fault=fault) == 3  # 1 call + max_retries
        eng.enrich("alice")
        (entry,) = store.items.failures("alice")
        assert entry.attempts == 2
        assert chat(server, fault=fault) == 6


# --- permanent rejections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code", "words"),
    [("moderation", "moderation", "moderation"), ("bad_image", "bad_image", "could not use")],
)
def test_permanent_rejection_is_recorded_once_and_not_retried(
    fault: str,
    code: str,
    words: str,
    items: Items,
    store: Store,
    standin: StandIn,
    api_settings: DashScopeSettings,
    tmp_path: Path,
) -> None:
    paths = paint(tmp_path, hues(3))
    ids, before = seed(items, paths)
    target = ids[1]
    standin.add_rule(fault, color=mean_of(paths[1]), tolerance=8)
    eng = engine(store, api_settings)

    stats = eng.enrich("alice")

    assert (stats.succeeded, stats.failed) == (2, 1) and stats.errors == {code: 1}
    assert chat(standin, fault=fault) == 1, "a permanent rejection is never retried"
    assert eng.usage.retries == 0
    (entry,) = store.items.failures("alice")
    assert (entry.item_id, entry.attempts, entry.permanent, entry.error_code) == (
        target,
        1,
        True,
        code,
    )
    assert words in entry.last_error
    assert_untouched(items, [target], before)
    assert_captioned_once(items, [ids[0], ids[2]], before)
    # Out of the pending set: a second run does not pay for it again.
    assert store.items.count_pending("alice", max_attempts=3) == 0
    assert eng.enrich("alice").total == 0
    assert chat(standin) == 3


# --- a rejected key stops the run --------------------------------------------------------------


def test_key_rejected_mid_run_stops_at_once_and_releases_claims(
    items: Items,
    store: Store,
    standin: StandIn,
    api_settings: DashScopeSettings,
    tmp_path: Path,
) -> None:
    paths = paint(tmp_path, hues(6))
    ids, before = seed(items, paths)
    # The key is revoked while the run is going: the third image's call is the first to see it.
    standin.add_rule("unauthorized", color=mean_of(paths[2]), tolerance=8)
    eng = engine(store, api_settings, batch_size=2, concurrent=1)

    with pytest.raises(FatalProviderError, match="DASHSCOPE_API_KEY") as info:
        eng.enrich("alice")

    assert API_KEY not in str(info.value)
    # The first chunk was written before the stop and stays written.
    assert_captioned_once(items, ids[:2], before)
    # Nothing else was attempted: row 4 (same chunk) and rows 5-6 (later chunks) cost no call.
    assert chat(standin) == 3 and chat(standin, fault="unauthorized") == 1
    assert_untouched(items, ids[2:], before)
    # Nothing is marked failed, nothing stays claimed: the next run (with a good key) has them.
    assert store.items.failures("alice") == []
    assert claims(items) == 0
    assert store.items.count_pending("alice", max_attempts=3) == 4


def test_cli_invalid_key_exits_3_with_one_clear_line(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids, before = seed(items, paint(tmp_path, hues(4)))
    wrong = "sk-wrong-4242424242"
    env.setenv("DASHSCOPE_API_KEY", wrong)

    code, report = run_cli(["--user-id", "alice", "--batch-size", "2", "--concurrent", "1"])

    err = capsys.readouterr().err
    assert code == 3, report
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "DASHSCOPE_API_KEY" in lines[0]
    assert wrong not in err + report and API_KEY not in err + report
    assert chat(standin) == 1, "the first 401 stops the run; no other row is tried"
    assert_untouched(items, ids, before)
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures") == [(0,)]
    assert claims(items) == 0


def test_cli_key_revoked_mid_run_keeps_written_chunks(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = paint(tmp_path, hues(6))
    ids, before = seed(items, paths)
    standin.add_rule("unauthorized", color=mean_of(paths[2]), tolerance=8)

    code, report = run_cli(["--user-id", "alice", "--batch-size", "2", "--concurrent", "1"])

    err = capsys.readouterr().err
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "DASHSCOPE_API_KEY" in err
    # What was written before the stop is in the report and in the table.
    assert report.count(": OK") == 2 and "FAILED" not in report
    assert_captioned_once(items, ids[:2], before)
    assert_untouched(items, ids[2:], before)
    assert chat(standin) == 3
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures") == [(0,)]
    assert claims(items) == 0


def test_cli_report_counts_retries_of_transient_faults(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids, before = seed(items, paint(tmp_path, hues(3)))
    standin.inject("503", times=2, endpoint="chat")
    standin.inject("429", times=1, endpoint="chat")

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert re.search(r"^  Succeeded:\s+3$", report, re.M), report
    assert re.search(r"^  Failed:\s+0$", report, re.M), report
    # Every call made counts, answered or not: 3 answered + 3 refused.
    assert re.search(r"^  API calls:\s+6 vision, 1 embedding, 3 retries$", report, re.M), report
    assert re.search(r"^  Failed calls:\s+3 vision, 0 embedding", report, re.M), report
    assert_captioned_once(items, ids, before)
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures") == [(0,)]
