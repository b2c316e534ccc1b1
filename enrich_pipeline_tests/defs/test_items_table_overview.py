"""The items_table asset: the whole table observed after every run and by its own sensor, with
the spend each run recorded; what a person sees on the asset page and what the database keeps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dagster import (
    AssetObservation,
    DagsterInstance,
    SensorResult,
    SkipReason,
    build_sensor_context,
)

from enrich_pipeline.db.store import Store
from enrich_pipeline.defs.overview import ITEMS_TABLE, items_table_sensor
from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline_tests.defs.test_asset import materialize_user
from enrich_pipeline_tests.helpers import Items

PRICES = {"qwen3-vl-plus": [0.2, 1.6], "text-embedding-v4": [0.07, 0.0], "currency": "USD"}


def observations(instance: DagsterInstance) -> list[dict]:
    """The table's observations, oldest first, as their metadata values."""
    records = instance.fetch_observations(ITEMS_TABLE, limit=100, ascending=True).records
    return [
        {k: v.value for k, v in r.asset_observation.metadata.items()}
        for r in records
        if r.asset_observation is not None
    ]


class Sensor:
    """The items_table sensor as Dagster's daemon ticks it: its cursor carried from tick to
    tick, its observations stored."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self.cursor: str | None = None

    def tick(self) -> str | None:
        """One tick: None when it observed the table, else why it skipped."""
        with build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"adbpg": AdbpgResource()}
        ) as ctx:
            result = items_table_sensor(ctx)
        if isinstance(result, SkipReason):
            return str(result.skip_message)
        assert isinstance(result, SensorResult)
        self.cursor = result.cursor or self.cursor
        for event in result.asset_events:
            assert isinstance(event, AssetObservation)
            self.instance.report_runless_asset_event(event)
        if result.asset_events:
            return None
        assert result.skip_reason is not None
        return str(result.skip_reason.skip_message)


def test_runs_for_two_users_observe_the_whole_table(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    env.setenv("ENRICH_PRICES", json.dumps(PRICES))
    for color in ("blue", "red", "green"):
        items.add("alice", str(image_dir / f"{color}.jpg"))
    items.add("bob", str(image_dir / "broken.jpg"))
    items.add("carol", str(image_dir / "cyan.jpg"))
    instance = DagsterInstance.ephemeral()

    first = materialize_user(instance, "alice")
    # bob's only row fails: his partition is a failed one, and his run still observes.
    second = materialize_user(instance, "bob", raise_on_error=False)

    assert first.success and not second.success
    after_alice, after_bob = observations(instance)
    # The table's figures, every user's, not the last run's user (bob: one broken image).
    assert after_bob["dagster/row_count"] == after_bob["items"] == 5
    assert (after_bob["items_captioned"], after_bob["items_pending"]) == (3, 1)
    assert after_bob["items_given_up"] == 1 and after_bob["users_with_pending"] == 1
    assert after_alice["items_captioned"] == after_bob["items_captioned"] == 3
    assert after_bob["coverage"] == pytest.approx(3 / 5, abs=1e-3)
    assert (after_bob["users"], after_bob["items_embedded"]) == (3, 3)
    assert "| qwen3-vl-plus | en | 3 |" in after_bob["by_model_language"]
    assert after_bob["database"].startswith("PostgreSQL ")
    # Spend to date: alice's run paid for three captions; bob's broken image was never sent.
    (alice_mat,) = first.asset_materializations_for_node("enriched_items")
    alice_cost = alice_mat.metadata["estimated_cost_usd"].value
    assert after_alice["spend_to_date"] == pytest.approx(alice_cost, abs=1e-6) and alice_cost > 0
    assert after_alice["spend_currency"] == "USD"
    assert after_bob["spend_to_date"] == pytest.approx(alice_cost, abs=1e-6)
    assert "qwen3-vl-plus, text-embedding-v4 | USD | 1 |" in after_bob["spend_by_model"]
    # The ledger: one row for alice's run, none for a run that called no model.
    ledger = items.execute(
        "SELECT run_id, user_id, command, cost, currency, prompt_tokens > 0 FROM {ns}.enrich_spend"
    )
    assert ledger == [
        (first.run_id, "alice", "dagster", pytest.approx(alice_cost, abs=1e-6), "USD", True)
    ]


def test_offline_run_records_no_spend_and_says_so(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("dora", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    env.setenv("ENRICH_OFFLINE", "true")

    assert materialize_user(instance, "dora").success

    (seen,) = observations(instance)
    assert seen["items_captioned"] == 1 and seen["coverage"] == 1.0
    assert seen["spend_to_date"] == 0.0 and "offline runs" in seen["spend_note"]
    assert "| offline-synthetic | en | 1 |" in seen["by_model_language"]
    assert items.execute("SELECT count(*) FROM {ns}.enrich_spend") == [(0,)]


def changed_since(store: Store, before: int | None) -> None:
    """Wait until the server's statistics count a change (PostgreSQL reports a backend's counts
    within about a second, ten when it is idle)."""
    deadline = time.monotonic() + 30
    while store.overview.changes() == before:
        assert time.monotonic() < deadline, "the statistics never counted the change"
        time.sleep(0.2)


def test_sensor_observes_only_when_the_table_changed(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("erin", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    store = AdbpgResource().store

    sensor = Sensor(instance)

    assert sensor.tick() is None
    # Idle ticks neither read the table nor add to the event log.
    assert sensor.tick() == "the items table is unchanged since it was last read"
    # A run observes the table itself; the sensor reads it (a run ended) and has nothing new.
    assert materialize_user(instance, "erin").success
    assert sensor.tick() == "the items table is as last observed"
    # Rows added by someone else are seen once the statistics count them.
    before = store.overview.changes()
    items.add("fred", str(image_dir / "red.jpg"))
    changed_since(store, before)
    assert sensor.tick() is None

    seen = observations(instance)
    assert [o["items_pending"] for o in seen] == [1, 0, 1]
    assert [o["users"] for o in seen] == [1, 1, 2]
    assert all(o["observed_in_ms"] >= 0 for o in seen)


def test_runs_leave_a_slow_table_to_the_sensor_which_observes_once_for_them(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    """ENRICH_OVERVIEW_IN_RUN_MS=0 stands for a table whose pass is slower than the budget: the
    runs record their spend and say in their log that the sensor observes the table; its next
    tick does, once for both runs."""
    env.setenv("ENRICH_OVERVIEW_IN_RUN_MS", "0")
    items.add("gus", str(image_dir / "blue.jpg"))
    items.add("hal", str(image_dir / "red.jpg"))
    instance = DagsterInstance.ephemeral()

    runs = [materialize_user(instance, user) for user in ("gus", "hal")]

    assert all(r.success for r in runs) and observations(instance) == []
    logged = [
        e.message
        for r in runs
        for e in instance.all_logs(r.run_id)
        if "left to items_table_sensor" in (e.message or "")
    ]
    assert len(logged) == 2
    assert Sensor(instance).tick() is None
    (seen,) = observations(instance)
    assert (seen["items_captioned"], seen["items_pending"], seen["users"]) == (2, 0, 2)


def test_sensor_skips_in_one_line_when_the_database_is_down(
    env: pytest.MonkeyPatch, items: Items
) -> None:
    env.setenv("ADBPG_URL", "postgresql://nobody:secret-pw@127.0.0.1:9/none?connect_timeout=2")
    instance = DagsterInstance.ephemeral()

    skipped = Sensor(instance).tick()

    assert skipped is not None and "items table not read, will retry" in skipped
    assert "secret-pw" not in skipped
    assert observations(instance) == []
