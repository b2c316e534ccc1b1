"""The partitioned graph asset, materialized for real against the database and the stand-in."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.checks import (
    embedding_dimensions,
    failure_share,
    no_unrecorded_pending_rows,
)
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.partitions import key_to_user, user_to_key
from enrich_pipeline_tests.helpers import Items, mean_of
from enrich_pipeline_tests.standin import StandIn


def resources() -> dict:
    return {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }


def materialize_user(
    instance: DagsterInstance, user: str, *, raise_on_error: bool = True, **config: object
):
    key = user_to_key(user)
    instance.add_dynamic_partitions("users", [key])
    return materialize(
        [enriched_items, no_unrecorded_pending_rows, embedding_dimensions, failure_share],
        partition_key=key,
        instance=instance,
        resources=resources(),
        raise_on_error=raise_on_error,
        run_config={"ops": {"enriched_items": {"ops": {"pending_rows": {"config": config}}}}}
        if config
        else None,
    )


def test_partition_materializes_with_statistics(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    ids = [
        items.add("alice", str(image_dir / f"{c}.jpg"), metadata={"n": i})
        for i, c in enumerate(["blue", "red", "green", "yellow", "cyan"])
    ]
    broken = items.add("alice", str(image_dir / "broken.jpg"))
    other = items.add("bob", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()

    result = materialize_user(instance, "alice", batch_size=2)

    assert result.success
    # 6 rows in chunks of 2: each chunk's write is its own step.
    writes = [
        e
        for e in result.get_step_success_events()
        if e.step_key.startswith("enriched_items.write_results")
    ]
    assert len(writes) == 3
    # Depth first: each chunk is written before the next one's images are even loaded, so a
    # run that dies keeps every chunk it finished.
    started = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    assert started.index("enriched_items.write_results[chunk_0]") < started.index(
        "enriched_items.visual_attributes[chunk_1]"
    )
    (mat,) = result.asset_materializations_for_node("enriched_items")
    md = {k: v.value for k, v in mat.metadata.items()}
    # What this run did.
    assert (md["total"], md["succeeded"], md["failed"], md["skipped"]) == (6, 5, 1, 0)
    assert md["success_rate"] == pytest.approx(5 / 6, abs=1e-3)
    assert md["tokens_used"] > 0 and md["provider"] == "dashscope"
    assert md["sample_captions"].count("\n- ") >= 2
    assert broken in md["failure_ledger"] and md["failures_recorded"] == 1
    assert sum(md["errors"].values()) == 1
    # The asset: alice's items as they now are, on which server, by which model.
    # One user's figures are not the asset's: no dagster/row_count (the table's is on items_table).
    assert md["items_captioned"] == 5 and "dagster/row_count" not in md
    assert (md["items"], md["items_pending"], md["items_given_up"]) == (6, 0, 1)
    assert md["items_embedded"] == 5 and md["failure_share"] == pytest.approx(1 / 6, abs=1e-3)
    assert md["database"].startswith("PostgreSQL ") and md["model"] == "qwen3-vl-plus"
    # How it was asked: a server that is not DashScope gets plain text, in the one language.
    assert (md["answer_format"], md["caption_languages"]) == ("text", "en")
    assert md["embedding_model"] == "text-embedding-v4"
    # Nothing about storage: the summary is not pickled anywhere.
    assert "path" not in md
    assert mat.partition == "alice"
    # The failed row's reason is in the run log, at warning level.
    warned = [r.user_message for r in instance.all_logs(result.run_id) if r.level >= WARNING]
    assert any(f"row {broken} of user 'alice' failed: " in m for m in warned), warned
    for i in ids:
        assert items.row(i)["metadata"]["caption"]
    assert "caption" not in items.row(other)["metadata"]
    assert standin.count("embeddings") == 3
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["no_unrecorded_pending_rows"].passed
    assert checks["no_unrecorded_pending_rows"].metadata["failures_recorded"].value == 1
    assert checks["embedding_dimensions"].passed
    assert checks["embedding_dimensions"].metadata["embeddings"].value == 5
    # One failed row of six: over the default 10% threshold, so the check warns.
    share = checks["failure_share"]
    assert not share.passed and share.severity.value == "WARN"
    assert share.metadata["failed_rows"].value == 1


def test_checks_fail_on_unrecorded_pending_rows_and_wrong_dimensions(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    assert materialize_user(instance, "alice").success
    # Two new rows, a run limited to one of them, and the embedding size changed to 512
    # while the first row's vector still has 1024 dimensions.
    items.add("alice", str(image_dir / "red.jpg"))
    items.add("alice", str(image_dir / "green.jpg"))
    env.setenv("DASHSCOPE_EMBEDDING_DIMENSIONS", "512")
    result = materialize_user(instance, "alice", max_items=1)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["no_unrecorded_pending_rows"].passed
    assert checks["no_unrecorded_pending_rows"].metadata["pending_unrecorded"].value == 1
    assert not checks["embedding_dimensions"].passed
    assert checks["embedding_dimensions"].metadata["wrong_dimensions"].value == 1


def test_no_embedding_config_and_empty_partition(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    instance = DagsterInstance.ephemeral()
    result = materialize_user(instance, "alice", caption_embedding=False)
    assert result.success and standin.count("embeddings") == 0
    # Nothing pending any more: the run still records a materialization, which states the
    # user's items as they are and says the run had nothing to do, with no counter, no rate, no
    # tokens and no samples (nothing was attempted), so the plots do not dip to zero.
    again = materialize_user(instance, "alice")
    (mat,) = again.asset_materializations_for_node("enriched_items")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["items_captioned"] == 1
    assert md["items_pending"] == 0 and "nothing pending" in md["this_run"]
    for absent in (
        *("total", "succeeded", "failed", "skipped", "dagster/row_count"),
        *("success_rate", "tokens_used", "estimated_cost_usd", "sample_captions"),
    ):
        assert absent not in md, absent


def test_invalid_key_fails_the_run_and_leaves_rows_pending(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    item = items.add("alice", str(image_dir / "blue.jpg"))
    env.setenv("DASHSCOPE_API_KEY", "sk-wrong")
    result = materialize(
        [enriched_items],
        partition_key="alice",
        instance=_with_partition("alice"),
        resources=resources(),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "DASHSCOPE_API_KEY" in failure.step_failure_data.error.message
    assert items.row(item)["metadata"] == {}
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures") == [(0,)]


def _with_partition(user: str) -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", [user_to_key(user)])
    return instance


@pytest.mark.parametrize(
    "user",
    ["alice", "o'brien; DROP TABLE x;--", "a...b", "tab\there", "u64:x", "ユーザー", " padded "],
)
def test_partition_keys_round_trip(user: str) -> None:
    key = user_to_key(user)
    assert key_to_user(key) == user
    assert "..." not in key and "\t" not in key


def test_odd_user_id_partition_is_scoped_to_that_user(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    odd = "o'brien\"; DROP TABLE items;--"
    mine = items.add(odd, str(image_dir / "blue.jpg"))
    theirs = items.add("o'brien", str(image_dir / "red.jpg"))
    result = materialize_user(DagsterInstance.ephemeral(), odd)
    assert result.success
    assert items.row(mine)["metadata"]["caption"]
    assert items.row(theirs)["metadata"] == {}


def test_retry_failed_config_tries_recorded_failures_again(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    item = items.add("alice", str(image_dir / "cyan.jpg"))
    standin.add_rule("moderation", color=mean_of(image_dir / "cyan.jpg"), tolerance=12, times=1)
    instance = DagsterInstance.ephemeral()
    # alice's only row fails: her partition fails (no materialization), the ledger says why.
    first = materialize_user(instance, "alice", raise_on_error=False)
    assert not first.success and not first.asset_materializations_for_node("enriched_items")
    (failure,) = [e for e in first.all_events if e.event_type_value == "STEP_FAILURE"]
    ledger = failure.step_failure_data.user_failure_data.metadata["failure_ledger"].value
    assert "moderation" in ledger
    # Permanent: a plain re-run does not touch it (and fails the partition again); retry_failed
    # does, and now it passes.
    again = materialize_user(instance, "alice", raise_on_error=False)
    assert not again.success and standin.count("chat") == 1
    retried = materialize_user(instance, "alice", retry_failed=True)
    (mat,) = retried.asset_materializations_for_node("enriched_items")
    assert mat.metadata["succeeded"].value == 1
    assert items.row(item)["metadata"]["caption"]
    assert standin.count("chat") == 2


def test_estimated_cost_per_partition_from_usage_and_price_table(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    env.setenv("DASHSCOPE_VISION_MODEL", "qwen-test")
    env.setenv("ENRICH_PRICES", '{"qwen-test": [1000, 2000], "text-embedding-v4": [100, 0]}')
    items.add("alice", str(image_dir / "blue.jpg"))
    result = materialize_user(DagsterInstance.ephemeral(), "alice")
    md = {
        k: v.value
        for k, v in result.asset_materializations_for_node("enriched_items")[0].metadata.items()
    }
    expected = (
        md["prompt_tokens"] * 1000 + md["completion_tokens"] * 2000 + md["embedding_tokens"] * 100
    ) / 1e6
    assert md["estimated_cost_usd"] == pytest.approx(expected, rel=1e-6) and expected > 0
