"""The spend ledger written by the command lines: one row per `enrich-captions` run that called
a model, one per collected batch (at the batch price), none for an offline run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from enrich_pipeline.bootstrap import build_provider
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline.batch.collect import collect_batch
from enrich_pipeline.pipeline.batch.poll import open_batches, poll_batches
from enrich_pipeline.pipeline.batch.state import TERMINAL
from enrich_pipeline.pipeline.batch.submit import submit_batch
from enrich_pipeline.settings import BatchSettings, RunSettings
from enrich_pipeline_tests.helpers import Items, run_cli, standin_settings, stat
from enrich_pipeline_tests.standin import StandIn

PRICES = {"qwen3-vl-plus": [0.2, 1.6], "text-embedding-v4": [0.07, 0.0], "currency": "USD"}


def spend(items: Items) -> list[tuple]:
    return items.execute(
        "SELECT run_id, user_id, command, models, prompt_tokens, completion_tokens,"
        " embedding_tokens, cost, currency FROM {ns}.enrich_spend ORDER BY recorded_at"
    )


def test_captions_run_records_its_spend_once(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    env.setenv("ENRICH_PRICES", json.dumps(PRICES))
    items.add("alice", str(image_dir / "blue.jpg"))
    items.add("alice", str(image_dir / "red.jpg"))

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    ((run_id, user, command, models, prompt, completion, embedding, cost, currency),) = spend(items)
    assert run_id.startswith("enrich-captions:") and command == "enrich-captions"
    assert (user, models, currency) == ("alice", "qwen3-vl-plus, text-embedding-v4", "USD")
    assert prompt + completion + embedding == int(stat(report, "Tokens used"))
    expected = (prompt * 0.2 + completion * 1.6 + embedding * 0.07) / 1_000_000
    assert cost == pytest.approx(expected) and cost > 0
    # A second run with nothing pending calls no model and records nothing.
    assert run_cli(["--user-id", "alice"])[0] == 0
    assert len(spend(items)) == 1


def test_offline_run_records_no_spend(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("bob", str(image_dir / "blue.jpg"))
    code, report = run_cli(["--offline"])
    assert code == 0, report
    assert spend(items) == []


def test_collected_batch_records_its_spend_at_the_batch_price_once(
    items: Items, store: Store, standin: StandIn, image_dir: Path
) -> None:
    standin.reset_batches()
    for color in ("blue", "green"):
        items.add("carol", str(image_dir / f"{color}.jpg"))
    settings = standin_settings(standin, prices=json.dumps(PRICES))
    submit_batch(
        store,
        settings,
        "carol",
        provider=build_provider(settings, embedded_db=False),
        policy=ImagePolicy(),
        batch=BatchSettings(),
        run=RunSettings(),
    )
    deadline = time.monotonic() + 30
    while not (ended := [b for b in poll_batches(store, settings) if b.status in TERMINAL]):
        assert time.monotonic() < deadline, [b.status for b in open_batches(store)]
        time.sleep(0.05)
    provider = build_provider(settings, embedded_db=False)

    result = collect_batch(store, settings, ended[0], provider=provider)
    again = collect_batch(store, settings, ended[0].local_id, provider=provider)

    assert result.stats.succeeded == 2 and again.already
    ((run_id, user, command, models, prompt, completion, embedding, cost, currency),) = spend(items)
    assert (run_id, user, command) == (f"batch:{ended[0].local_id}", "carol", "enrich-batch")
    assert (prompt, completion) == (result.prompt_tokens, result.completion_tokens)
    assert embedding == provider.usage.embedding_tokens > 0
    assert models == "qwen3-vl-plus, text-embedding-v4" and currency == "USD"
    # Captions at half the online price, their embeddings at the online one.
    expected = (prompt * 0.2 + completion * 1.6) / 2 / 1_000_000 + embedding * 0.07 / 1_000_000
    assert cost == pytest.approx(expected) and cost > 0
    standin.reset_batches()
