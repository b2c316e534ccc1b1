"""The items_table asset: the whole table observed after every run and by its own sensor, with
the spend each run recorded; what a person sees on the asset page and what the database keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import (
    AssetObservation,
    DagsterInstance,
    SensorResult,
    SkipReason,
    build_sensor_context,
)

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


def tick(instance: DagsterInstance) -> SensorResult | SkipReason:
    """One tick, its observation stored as Dagster's daemon stores a sensor's asset events."""
    with build_sensor_context(instance=instance, resources={"adbpg": AdbpgResource()}) as ctx:
        result = items_table_sensor(ctx)
    if isinstance(result, SensorResult):
        for event in result.asset_events:
            assert isinstance(event, AssetObservation)
            instance.report_runless_asset_event(event)
    return result


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
    second = materialize_user(instance, "bob")

    assert first.success and second.success
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


def test_sensor_observes_only_when_the_table_changed(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("erin", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()

    assert isinstance(tick(instance), SensorResult)
    # Idle ticks leave the event log as it was.
    assert isinstance(quiet := tick(instance), SkipReason), quiet
    assert "as last observed" in str(quiet.skip_message)
    # A run observes the table itself; the sensor then has nothing new to say.
    assert materialize_user(instance, "erin").success
    assert isinstance(tick(instance), SkipReason)
    # Rows added by someone else are seen at the next tick.
    items.add("fred", str(image_dir / "red.jpg"))
    assert isinstance(tick(instance), SensorResult)

    seen = observations(instance)
    assert [o["items_pending"] for o in seen] == [1, 0, 1]
    assert [o["users"] for o in seen] == [1, 1, 2]


def test_sensor_skips_in_one_line_when_the_database_is_down(
    env: pytest.MonkeyPatch, items: Items
) -> None:
    env.setenv("ADBPG_URL", "postgresql://nobody:secret-pw@127.0.0.1:9/none?connect_timeout=2")
    instance = DagsterInstance.ephemeral()

    result = tick(instance)

    assert isinstance(result, SkipReason)
    assert "items table not read, will retry" in str(result.skip_message)
    assert "secret-pw" not in str(result.skip_message)
    assert observations(instance) == []
