"""One quota per account: runs that share a database share one rate budget per model, so that
together they stay under DashScope's per-second limits; a database blip falls back to local
pacing with a warning and no row fails. Real PostgreSQL, the stand-in in per-second mode.

The schedule is checked two ways, neither of them a wall-clock tolerance: on a fake clock given
to the limiters and to the budget's table (the database then does the arithmetic on that clock:
exact and instant), and, for real runs, on the send slots the database handed out (logged by a
trigger, on the server's own clock). How close real calls come to the quota is a figure of
``benchmarks/pacing.py``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from enrich_pipeline.bootstrap import build_provider
from enrich_pipeline.db.quota import RateBudgetTable
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.providers.quota import SharedRateLimiter
from enrich_pipeline.providers.ratelimit import RateLimiter, per_second_budget
from enrich_pipeline.settings import DashScopeSettings, DbSettings, RunSettings
from enrich_pipeline_tests.helpers import (
    API_KEY,
    FakeClock,
    Items,
    data_url,
    good_chat_calls,
    most_in,
    png,
    standin_settings,
)
from enrich_pipeline_tests.standin import StandIn

VISION = "qwen3-vl-plus"
RPM = 600  # the stand-in's quota for the vision model: 10 calls a second
RPS = per_second_budget(RPM)


@pytest.fixture
def strict(standin: StandIn) -> Iterator[StandIn]:
    """The stand-in enforcing RPM per second on the vision model, from an empty window."""
    with standin._lock:
        standin._windows.clear()
        standin._token_windows.clear()
    standin.per_second = True
    standin.rpm_limit = {VISION: RPM}
    standin.latency = 0.2
    try:
        yield standin
    finally:
        standin.per_second = False
        standin.rpm_limit = None


def add_rows(items: Items, user: str, n: int, seed: int) -> list[str]:
    """``n`` rows with distinct tiny images (one paid call each)."""
    return [
        items.add(user, data_url(png((seed % 256, n_ % 256, (seed + n_) // 256 % 256))))
        for n_ in range(n)
    ]


def refusals(server: StandIn) -> int:
    return sum(1 for r in list(server.requests) if r["status"] == 429)


def api(server: StandIn, **changes: object) -> DashScopeSettings:
    return standin_settings(
        server,
        **{
            "timeout": 10.0,
            "backoff_initial": 0.05,
            "backoff_max": 0.5,
            "requests_per_minute": RPM,
            "embedding_requests_per_minute": 0,
            **changes,
        },
    )


def log_slots(items: Items) -> None:
    """Log every send slot the budget hands out, as the database computed it (its clock)."""
    items.execute(
        "CREATE TABLE {ns}.slot_log (model text, slot double precision)"
        ";CREATE FUNCTION {ns}.log_slot() RETURNS trigger LANGUAGE plpgsql AS $f$"
        " BEGIN INSERT INTO {ns}.slot_log VALUES (NEW.model, NEW.last_slot); RETURN NEW; END $f$"
        ";CREATE TRIGGER log_slot AFTER UPDATE ON {ns}.enrich_rate_budget"
        " FOR EACH ROW EXECUTE FUNCTION {ns}.log_slot()"
    )


def slots(items: Items, model: str = VISION) -> list[float]:
    return sorted(
        r[0] for r in items.execute("SELECT slot FROM {ns}.slot_log WHERE model = %s", (model,))
    )


def on_fake_clock(items: Items, clock: FakeClock, **budget: float) -> SharedRateLimiter:
    """One process's vision limiter on the shared budget, all of it on ``clock``."""
    local = RateLimiter(RPM, clock=clock, sleep=clock.sleep)
    table = RateBudgetTable(items.settings, clock=clock, **budget)
    return SharedRateLimiter(local, table, "acct", VISION, clock=clock, sleep=clock.sleep)


def send(limiters: list, n: int, clock: FakeClock) -> list[float]:
    """``n`` calls from the limiters in turn; each call's send time on the fake clock."""
    stamps = []
    for k in range(n):
        limiters[k % len(limiters)].acquire()
        stamps.append(clock.now)
    return stamps


def test_reservations_of_two_budgets_are_spaced_as_one(store: Store, items: Items) -> None:
    clock = FakeClock()
    a = RateBudgetTable(items.settings, clock=clock)
    b = RateBudgetTable(items.settings, clock=clock)
    try:
        waits = []
        for n in range(20):
            budget = a if n % 2 else b
            wait, count = budget.reserve("acct", "m", request_spacing=0.1, token_spacing=0.0)
            waits.append(wait)
            assert count == n + 1
        # Twenty reservations at once: slots 0.1 s apart whoever asked.
        assert waits == pytest.approx([0.1 * n for n in range(20)], abs=1e-9)
        # A schedule is not saved up: once its slots are past, the next one is now.
        clock.now += 5.0
        assert a.reserve("acct", "m", request_spacing=0.1, token_spacing=0.0)[0] == 0.0
        # Tokens space the next request too, and a slot can be asked for later than now.
        wait, _ = a.reserve("acct", "t", request_spacing=0.0, token_spacing=0.5)
        assert wait == 0.0
        wait, _ = b.reserve("acct", "t", request_spacing=0.0, token_spacing=0.0, not_before=0.2)
        assert wait == pytest.approx(0.5, abs=1e-9)
        wait, _ = b.reserve("acct", "u", request_spacing=0.0, token_spacing=0.0, not_before=0.3)
        assert wait == pytest.approx(0.3, abs=1e-9)
        # Another model of the same account has its own schedule.
        assert a.reserve("acct", "other", request_spacing=0.1, token_spacing=0.0)[0] == 0.0
    finally:
        a.close()
        b.close()


def test_without_a_clock_the_budget_keeps_the_database_servers_time(
    store: Store, items: Items
) -> None:
    a, b = RateBudgetTable(items.settings), RateBudgetTable(items.settings)
    try:
        assert a.reserve("acct", "m", request_spacing=30.0, token_spacing=0.0)[0] == 0.0
        # The second slot is 30 s after the first on the server's clock, less whatever time
        # passed between the two statements: seconds at most, however busy the machine.
        wait, count = b.reserve("acct", "m", request_spacing=30.0, token_spacing=0.0)
        assert 20.0 < wait <= 30.0 and count == 2
    finally:
        a.close()
        b.close()


def test_four_limiters_on_separate_budgets_send_no_more_than_the_quota_together(
    store: Store, items: Items
) -> None:
    clock = FakeClock()
    limiters = [on_fake_clock(items, clock) for _ in range(4)]
    try:
        stamps = send(limiters, 120, clock)
    finally:
        for lim in limiters:
            lim.budget.close()
    assert most_in(stamps, 1.0) <= RPS
    assert most_in(stamps, 60.0) <= RPM
    # ... and use it: the four together go at the quota, less the jitter margin.
    assert (len(stamps) - 1) / (stamps[-1] - stamps[0]) >= 0.9 * RPS
    assert [(lim.shared_calls, lim.local_calls) for lim in limiters] == [(30, 0)] * 4


def test_four_limiters_without_the_budget_send_four_times_the_quota() -> None:
    clock = FakeClock()
    limiters = [RateLimiter(RPM, clock=clock, sleep=clock.sleep) for _ in range(4)]
    stamps = send(limiters, 120, clock)
    # Each paces itself at the whole quota: the account sees four times it.
    assert most_in(stamps, 1.0) == 4 * RPS


def test_pacing_stays_under_the_quota_through_a_database_blip_and_back(
    store: Store, items: Items, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    limiter = on_fake_clock(items, clock, timeout=0.3)
    limiter.retry_after = 2.0
    table = sql.Identifier(items.namespace, "enrich_rate_budget")
    try:
        with caplog.at_level(logging.WARNING, logger="enrich_pipeline.providers.quota"):
            stamps = send([limiter], 30, clock)
            with psycopg.connect(items.conninfo) as conn:
                # The budget's table locked (its statements time out) for 5 s of the schedule.
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
                until = clock.now + 5.0
                while clock.now < until:
                    stamps += send([limiter], 1, clock)
                blip_failures, blip_local = limiter.failures, limiter.local_calls
            stamps += send([limiter], 30, clock)
            before = limiter.shared_calls
            stamps += send([limiter], 10, clock)
    finally:
        limiter.budget.close()
    # Tried again every 2 s while locked (3 times in 5 s), pacing alone meanwhile...
    assert blip_failures == 3 and blip_local >= 30
    # ... and back on the budget once it answered, at the first try after the lock.
    assert limiter.failures == 3 and limiter.shared_calls == before + 10
    assert limiter.shared_calls + limiter.local_calls == len(stamps)
    text = caplog.text
    assert "pacing this process alone" in text and "reachable again" in text
    # Whichever schedule a call went by, no second of the account holds more than its quota.
    assert most_in(stamps, 1.0) <= RPS
    assert (len(stamps) - 1) / (stamps[-1] - stamps[0]) >= 0.85 * RPS


def test_four_engines_on_separate_stores_share_one_quota(
    strict: StandIn, items: Items, store: Store
) -> None:
    log_slots(items)
    users = [f"user{k}" for k in range(4)]
    for k, user in enumerate(users):
        add_rows(items, user, 12, seed=40 * k)
    settings = api(strict)
    engines = []
    for _ in users:
        store = Store(items.settings)
        store.setup()
        provider = build_provider(settings, embedded_db=False, db=items.settings)
        assert isinstance(provider.limiters[0], SharedRateLimiter)
        engines.append(
            Engine(
                store,
                provider,
                settings,
                RunSettings(concurrent=8, batch_size=6, max_items=None),
                image_policy=ImagePolicy(),
            )
        )
    results = {}

    def run(k: int) -> None:
        results[k] = engines[k].enrich(users[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.provider.close()
        e.store.close()

    assert all(results[k].succeeded == 12 for k in range(4)), results
    assert good_chat_calls(strict) == 48  # every row paid for once (a refusal is retried)
    # The schedule the four kept, as the database handed it out: one quota, not four.
    shared = [e.provider.limiters[0].shared_calls for e in engines]
    assert all(shared), shared
    reserved = slots(items)
    assert len(reserved) == sum(shared)
    assert most_in(reserved, 1.0) <= RPS, reserved
    # Not asserted: when the calls reached the stand-in. On a loaded machine calls reserved in
    # consecutive seconds can leave their threads together and arrive in one (11 in a second
    # was seen beside stress-ng); the strict stand-in refuses the excess, the refusals are
    # retried, and every row is still paid once (above).


def test_without_the_shared_budget_four_runs_send_four_times_the_quota(
    strict: StandIn, items: Items
) -> None:
    settings = api(strict, max_retries=0)
    providers = [
        build_provider(settings.with_(shared_quota=False), embedded_db=False) for _ in range(4)
    ]
    assert all(isinstance(p.limiters[0], RateLimiter) for p in providers)
    from enrich_pipeline.enrichment.images import load_image, prepare_for_vision

    images = [
        prepare_for_vision(load_image(data_url(png((k, 9, 9))), ImagePolicy())) for k in range(40)
    ]
    failed = []

    def run(p: DashScopeProvider, part: list) -> None:
        for image in part:
            try:
                p.caption(image)
            except Exception as exc:  # noqa: BLE001 - counted below
                failed.append(exc)

    # Quick answers and two callers a provider: each provider alone could send its full quota
    # (10 a second), whatever the machine's load, so the four together send about four times it.
    strict.latency = 0.05
    threads = [
        threading.Thread(target=run, args=(providers[k % 4], images[k::8])) for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in providers:
        p.close()
    # Each paces itself at the whole quota: the account sees about four times it.
    assert refusals(strict) >= 10 and failed


def test_processes_share_the_budget_through_the_database(
    strict: StandIn, items: Items, store: Store
) -> None:
    log_slots(items)
    users = ["p0", "p1", "p2"]
    for k, user in enumerate(users):
        add_rows(items, user, 10, seed=90 + 30 * k)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ADBPG_", "DASHSCOPE_"))},
        "ADBPG_URL": items.conninfo,
        "ADBPG_NAMESPACE": items.namespace,
        "DASHSCOPE_API_KEY": API_KEY,
        "DASHSCOPE_BASE_URL": strict.base_url,
        "DASHSCOPE_RPM": str(RPM),
        "DASHSCOPE_EMBEDDING_RPM": "0",
        "DASHSCOPE_BACKOFF_INITIAL": "0.05",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "enrich_pipeline.cli.captions",
                "--user-id",
                user,
                "--concurrent",
                "8",
                "--quiet",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for user in users
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("Succeeded:        10" in out for out in outputs), outputs
    assert good_chat_calls(strict) == 30
    (count,) = items.execute(
        "SELECT reservations FROM {ns}.enrich_rate_budget WHERE model = %s", (VISION,)
    )[0]
    # Every call of the three went by the shared schedule, which never holds more than the
    # quota in a second of the database's clock.
    reserved = slots(items)
    assert count == len(reserved) >= 30
    assert most_in(reserved, 1.0) <= RPS, reserved


def test_a_database_blip_falls_back_to_local_pacing_and_no_row_fails(
    strict: StandIn, items: Items, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    add_rows(items, "blip", 60, seed=200)
    settings = api(strict)
    provider = build_provider(settings, embedded_db=False, db=items.settings)
    limiter = provider.limiters[0]
    assert isinstance(limiter, SharedRateLimiter)
    limiter.retry_after = 1.0
    limiter.budget.timeout = 0.5  # type: ignore[attr-defined]
    table = sql.Identifier(items.namespace, "enrich_rate_budget")
    blip = threading.Event()

    def hold_the_table() -> None:
        # A blip: the budget's table is locked for 2.5 s (its statements time out), then free.
        with psycopg.connect(items.conninfo) as conn:
            while not limiter.shared_calls:
                time.sleep(0.01)
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
            blip.set()
            time.sleep(2.5)

    holder = threading.Thread(target=hold_the_table)
    holder.start()
    engine = Engine(
        store,
        provider,
        settings,
        RunSettings(concurrent=8, batch_size=10, max_items=None),
        image_policy=ImagePolicy(),
    )
    with caplog.at_level(logging.WARNING, logger="enrich_pipeline.providers.quota"):
        stats = engine.enrich("blip")
    holder.join()
    provider.close()

    assert blip.is_set()
    assert stats.succeeded == 60 and stats.failed == 0
    assert limiter.failures >= 1 and limiter.local_calls >= 1
    text = caplog.text
    assert "unavailable" in text and "pacing this process alone" in text
    assert "reachable again" in text  # and it went back to the shared budget
    # Each row paid for once: a refusal while switching schedules is retried, as every 429 is
    # (the schedule across the switch is checked exactly on a fake clock above).
    assert good_chat_calls(strict) == 60


def test_shared_quota_setting_defaults_on_with_a_database_and_off_embedded(
    items: Items, standin: StandIn
) -> None:
    settings = api(standin)
    shared = build_provider(settings, embedded_db=False, db=items.settings)
    alone = build_provider(settings, embedded_db=True, db=DbSettings())
    forced_off = build_provider(
        settings.with_(shared_quota=False), embedded_db=False, db=items.settings
    )
    try:
        assert isinstance(shared.limiters[0], SharedRateLimiter)
        assert isinstance(shared.limiters[1], RateLimiter)  # no embedding limit: nothing to share
        assert isinstance(alone.limiters[0], RateLimiter)
        assert isinstance(forced_off.limiters[0], RateLimiter)
    finally:
        for p in (shared, alone, forced_off):
            p.close()
