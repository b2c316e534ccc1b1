"""Batch mode end to end: the real embedded PostgreSQL, the stand-in's files and batches
endpoints, the real ``openai`` SDK. Submit, "restart" (new store and settings objects: state
only from the database), poll, collect, and the guarantees of the online path."""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    SensorResult,
    SkipReason,
    build_sensor_context,
)
from dagster._core.test_utils import create_run_for_test

from enrich_pipeline.bootstrap import build_provider
from enrich_pipeline.cli import batch as batch_mode
from enrich_pipeline.db.batches import BatchRecord
from enrich_pipeline.db.store import Store
from enrich_pipeline.defs.batch import (
    BATCH_JOBS,
    BATCH_SENSORS,
    batch_collect_job,
    batch_poll_sensor,
    batch_submit_job,
)
from enrich_pipeline.defs.heartbeat import HeartbeatResource
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.enrichment.images import ImagePolicy, load_image, prepare_for_vision
from enrich_pipeline.enrichment.structured import Answer
from enrich_pipeline.pipeline.batch import collect as collect_mode
from enrich_pipeline.pipeline.batch.collect import collect_batch
from enrich_pipeline.pipeline.batch.poll import cancel_batch, open_batches, poll_batches
from enrich_pipeline.pipeline.batch.state import TERMINAL
from enrich_pipeline.pipeline.batch.submit import submit_batch
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers import wire
from enrich_pipeline.providers.batch_api import BatchRejected, BatchUnsupported
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import BatchSettings, DashScopeSettings, RunSettings
from enrich_pipeline_tests.helpers import (
    API_KEY,
    Items,
    mean_of,
    standin_settings,
)
from enrich_pipeline_tests.standin import StandIn

POLICY = ImagePolicy()  # local paths allowed: the test images are files


@pytest.fixture
def server(standin: StandIn) -> Any:
    standin.reset_batches()
    yield standin
    standin.reset_batches()


def fresh_settings(server: StandIn, **overrides: Any) -> DashScopeSettings:
    """Settings built anew, as a process started later would."""
    return standin_settings(server, **overrides)


def submit(store: Store, settings: DashScopeSettings, user: str = "alice", **kw: Any):
    """``submit_batch`` with batch and run settings from keywords (``limit``: max items)."""
    provider = kw.pop("provider", None) or build_provider(settings, embedded_db=False)
    batch = {"max_items": kw.pop("limit", None)}
    batch.update({k: kw.pop(k) for k in list(kw) if k in BatchSettings.model_fields})
    run = {k: kw.pop(k) for k in list(kw) if k in RunSettings.model_fields}
    return submit_batch(
        store,
        settings,
        user,
        provider=provider,
        policy=POLICY,
        batch=BatchSettings(**batch),
        run=RunSettings(**run),
        **kw,
    )


def collect(store: Store, settings: DashScopeSettings, batch: Any, **kw: Any):
    """``collect_batch`` with a provider of these settings, as a collecting process has."""
    provider = kw.pop("provider", None) or build_provider(settings, embedded_db=False)
    return collect_batch(store, settings, batch, provider=provider, **kw)


def poll_until_ended(
    store: Store, settings: DashScopeSettings, timeout: float = 10.0
) -> list[BatchRecord]:
    deadline = time.monotonic() + timeout
    while True:
        ready = poll_batches(store, settings)
        still = [b for b in open_batches(store) if b.status not in TERMINAL]
        if ready and not still:
            return ready
        assert time.monotonic() < deadline, [(b.ref, b.status) for b in open_batches(store)]
        time.sleep(0.02)


def claims_of(items: Items, worker: str) -> list[str]:
    return [
        r[0]
        for r in items.execute(
            "SELECT item_id FROM {ns}.enrich_claims WHERE worker = %s ORDER BY item_id", (worker,)
        )
    ]


def ledger(store: Store, user: str = "alice") -> dict[str, tuple[str, bool, int]]:
    return {e.item_id: (e.error_code, e.permanent, e.attempts) for e in store.items.failures(user)}


SAME_AS_ONLINE = (
    "caption",
    "dominant_colors",
    "style_tags",
    "object_tags",
    "caption_model",
    "caption_prompt_version",
)


def test_submit_restart_poll_collect_writes_like_the_online_path(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    img = {c: str(image_dir / f"{c}.jpg") for c in ("blue", "green", "yellow", "cyan")}
    alice = {
        "blue": items.add("alice", img["blue"], metadata={"sku": "a-1"}),
        "blue_twin": items.add("alice", img["blue"], metadata={"sku": "a-2"}),
        "green": items.add("alice", img["green"], metadata=None),
        "yellow": items.add("alice", img["yellow"], metadata={"sku": "a-4"}),
        "cyan": items.add("alice", img["cyan"], metadata={"sku": "a-5"}),
    }
    done = items.add("alice", img["green"], metadata={"caption": "by hand"})
    bob = items.add("bob", img["blue"], metadata={"sku": "b-1"})
    untouched = {i: items.row(i) for i in (done, bob)}
    server.batch_delay = 2.0  # long enough that the first poll finds it running on a busy machine
    settings = fresh_settings(server)

    result = submit(store, settings)

    # One batch, one line per distinct image (the twins share one), every row claimed.
    assert result.queued == 5 and result.lines == 4 and len(result.parts) == 1
    (part,) = result.parts
    assert part.batch_id and part.state == "open" and part.status == "validating"
    assert sorted(claims_of(items, result.worker)) == sorted(alice.values())
    assert server.count("chat") == 0 and server.count("files") == 1
    # The file holds the online path's request: model, prompt, max_tokens, downscaled image.
    upload = next(f for f in server.files.values() if f["purpose"] == "batch")
    lines = [json.loads(x) for x in upload["_content"].decode().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(
        [alice["blue"], alice["green"], alice["yellow"], alice["cyan"]]
    )
    body = lines[0]["body"]
    assert (body["model"], body["max_tokens"]) == (settings.vision_model, 200)
    assert body["messages"][0]["content"][1] == {"type": "text", "text": settings.prompt}
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg")

    # Online runs leave the claimed rows alone.
    provider = DashScopeProvider(settings)
    engine = Engine(store, provider, settings, RunSettings(max_items=None), image_policy=POLICY)
    assert engine.enrich_user("alice", limit=None, worker="cli-test").total == 0
    assert server.count("chat") == 0

    # Meanwhile somebody writes a caption: it must win.
    items.write_by_hand(alice["yellow"], caption="meanwhile")
    store.close()

    # A restart: new store, new settings; everything comes from the database.
    store2 = Store(items.settings)
    store2.setup()
    try:
        settings2 = fresh_settings(server)
        first = poll_batches(store2, settings2)
        assert first == []  # still running (batch_delay): claims renewed, nothing to collect
        (running,) = open_batches(store2)
        assert running.status in ("validating", "in_progress", "finalizing")
        (ended,) = poll_until_ended(store2, settings2)
        assert ended.status == "completed" and ended.output_file_id

        collected = collect(store2, settings2, ended)

        s = collected.stats
        assert (s.total, s.succeeded, s.failed, s.skipped) == (5, 4, 0, 1)
        assert s.embedded == 4 and collected.prompt_tokens > 0
        assert collected.batch.state == "collected"
        assert claims_of(items, result.worker) == []
        assert items.row(alice["yellow"])["metadata"] == {"sku": "a-4", "caption": "meanwhile"}
        for key in ("blue", "blue_twin", "green", "cyan"):
            md = items.row(alice[key])["metadata"]
            assert md["caption"] and md["dominant_colors"] and md["caption_generated_at"]
            assert md["caption_model"] == settings.vision_model
        assert items.row(alice["blue"])["metadata"]["sku"] == "a-1"
        assert items.row(alice["green"])["metadata"]["caption"]  # metadata NULL before
        for item_id, row in untouched.items():
            assert items.row(item_id) == row  # another user's row, and a captioned one
        assert server.count("chat") == 0 and server.count("batch_chat") == 4

        # Exactly what the online path writes: bob's blue row, captioned online now.
        Engine(
            store2, DashScopeProvider(settings2), settings2, RunSettings(), image_policy=POLICY
        ).enrich_user("bob", limit=None, worker="cli-test")
        online, batched = items.row(bob)["metadata"], items.row(alice["blue"])["metadata"]
        assert {k: online[k] for k in SAME_AS_ONLINE} == {k: batched[k] for k in SAME_AS_ONLINE}
        vectors = dict(
            items.execute(
                "SELECT item_id, embedding FROM {ns}.enrich_embeddings WHERE model = %s",
                (settings.embedding_model,),
            )
        )
        assert vectors[alice["blue"]] == vectors[bob] and len(vectors[bob]) == 1024
        assert alice["yellow"] not in vectors
        # Paid captions are in the cache (the yellow line was paid for too).
        assert items.execute("SELECT count(*) FROM {ns}.enrich_answer_cache") == [(4,)]

        # Collecting twice writes nothing twice.
        before = items.all()
        again = collect(store2, settings2, ended.local_id)
        assert again.already and again.stats.total == 0
        assert items.all() == before
        assert poll_batches(store2, settings2) == [] and open_batches(store2) == []
    finally:
        store2.close()


def test_line_errors_are_classified_as_online(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = {
        c: items.add("alice", str(image_dir / f"{c}.jpg"))
        for c in ("blue", "red", "green", "yellow", "broken")
    }
    server.add_rule("moderation", color=mean_of(image_dir / "red.jpg"))
    server.add_rule("bad_image", color=mean_of(image_dir / "yellow.jpg"))
    server.add_rule("500", color=mean_of(image_dir / "green.jpg"))
    settings = fresh_settings(server)

    result = submit(store, settings)

    # The unreadable image never reaches a batch: recorded at once, permanent, as online.
    assert result.queued == 4 and result.direct.failed == 1
    assert ledger(store)[ids["broken"]][1:] == (True, 1)
    (ended,) = poll_until_ended(store, settings)
    assert ended.error_file_id

    collected = collect(store, settings, ended)

    s = collected.stats
    assert (s.total, s.succeeded, s.failed) == (4, 1, 3)
    found = ledger(store)
    assert found[ids["red"]] == ("moderation", True, 1)
    assert found[ids["yellow"]] == ("bad_image", True, 1)
    assert found[ids["green"]] == ("server_error", False, 1)
    assert items.row(ids["blue"])["metadata"]["caption"]
    # Permanent errors are left out; the transient one is pending again.
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == [ids["green"]]


@pytest.mark.parametrize("ending", ["expired", "failed", "cancelled"])
def test_a_batch_that_ends_early_writes_what_was_done_and_releases_the_rest(
    items: Items, store: Store, server: StandIn, image_dir: Path, ending: str
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "green", "cyan")]
    settings = fresh_settings(server)
    if ending == "cancelled":
        server.batch_delay = 5.0
    else:
        server.batch_force, server.batch_expire_after = ending, 1

    result = submit(store, settings)
    if ending == "cancelled":
        cancel_batch(store, settings, result.parts[0].ref)
    (ended,) = poll_until_ended(store, settings)
    assert ended.status == ending

    collected = collect(store, settings, ended)

    done = 1 if ending == "expired" else (3 if ending == "cancelled" else 0)
    assert (collected.stats.succeeded, collected.stats.failed) == (done, 3 - done)
    assert claims_of(items, result.worker) == []
    code = f"batch_{ending}"
    expected = {i: (code, False, 1) for i in ids[done:]}
    assert ledger(store) == expected
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == ids[done:]


def test_a_crash_midway_through_collect_is_finished_by_the_next_collect(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = [
        items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("red", "blue", "green", "cyan")
    ]
    server.add_rule("moderation", color=mean_of(image_dir / "red.jpg"))
    server.add_rule("503", color=mean_of(image_dir / "green.jpg"))
    settings = fresh_settings(server)
    submit(store, settings)
    (ended,) = poll_until_ended(store, settings)

    class DiesOnSecondEmbedding(DashScopeProvider):
        calls = 0

        def embed(self, texts):  # type: ignore[no-untyped-def]
            type(self).calls += 1
            if type(self).calls == 2:
                raise RuntimeError("the process was killed")
            return super().embed(texts)

    with pytest.raises(RuntimeError):
        collect(store, settings, ended, chunk_size=1, provider=DiesOnSecondEmbedding(settings))
    assert items.row(ids[1])["metadata"]["caption"]  # the chunks before the crash are written
    assert "caption" not in items.row(ids[3])["metadata"]

    again = collect(store, fresh_settings(server), ended.local_id, chunk_size=1)

    assert (again.stats.total, again.stats.succeeded) == (1, 1)  # only what was left
    assert items.row(ids[3])["metadata"]["caption"]
    # Failures were recorded once, not once per collect.
    assert ledger(store) == {ids[0]: ("moderation", True, 1), ids[2]: ("server_error", False, 1)}
    assert collect(store, settings, ended.local_id).already


def test_files_are_split_by_lines_and_by_bytes(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    colors = ("blue", "red", "green", "yellow", "cyan")
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in colors]
    settings = fresh_settings(server)

    by_lines = submit(store, settings, max_lines=2)

    assert [p.lines for p in by_lines.parts] == [2, 2, 1]
    assert len({p.batch_id for p in by_lines.parts}) == 3
    ready = poll_until_ended(store, settings)
    assert len(ready) == 3
    for record in ready:
        collect(store, settings, record)
    assert all(items.row(i)["metadata"]["caption"] for i in ids)

    # By bytes: no two requests fit in one file, so each image gets a batch of its own.
    more = [items.add("alice", str(image_dir / f"{c}.jpg"), metadata={"n": 2}) for c in colors]
    items.execute("DELETE FROM {ns}.enrich_answer_cache")  # make them go to the batch
    sizes = [
        len(
            wire.batch_line(
                "0",
                wire.caption_request_body(
                    settings,
                    prepare_for_vision(
                        load_image(str(image_dir / f"{c}.jpg"), POLICY), max_side=1024
                    ).data_url,
                ),
            )
        )
        for c in colors
    ]
    limit = max(sizes) + 100
    assert 2 * min(sizes) > limit  # one fits, two never do
    by_bytes = submit(store, settings, max_bytes=limit)
    assert [p.lines for p in by_bytes.parts] == [1] * 5
    for record in poll_until_ended(store, settings):
        collect(store, settings, record)
    assert all(items.row(i)["metadata"]["caption"] for i in more)

    # A request larger than a file may be is a permanent failure of that row, not a crash.
    huge = items.add("alice", str(image_dir / "blue.jpg"), metadata={"n": 3})
    items.execute("DELETE FROM {ns}.enrich_answer_cache")
    too_small = submit(store, settings, max_bytes=1000)
    assert too_small.parts == [] and too_small.direct.failed == 1
    assert ledger(store)[huge][:2] == ("request_too_large", True)


def test_the_server_line_limit_and_a_refused_batch_give_the_rows_back(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "red", "green")]
    server.batch_max_lines = 2  # the server's 50,000-line check, made small
    settings = fresh_settings(server)

    with pytest.raises(BatchRejected, match="at most 2"):
        submit(store, settings, max_lines=3)

    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == ids
    assert store.items.failures("alice") == []  # not the rows' fault
    (row,) = items.execute("SELECT state, error FROM {ns}.enrich_batches")
    assert row[0] == "rejected" and "at most 2" in row[1]
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]


def test_unsupported_model_or_region_is_a_clear_error(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "red")]
    settings = fresh_settings(server, vision_model="qwen-vl-ocr-latest")
    server.batch_unsupported_models = {"qwen-vl-ocr-latest"}

    with pytest.raises(BatchUnsupported) as refused:
        submit(store, settings)

    message = str(refused.value)
    assert "'qwen-vl-ocr-latest'" in message and server.base_url in message
    assert "not supported by the Batch API" in message and "online path" in message
    assert API_KEY not in message
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == ids
    assert items.execute("SELECT state FROM {ns}.enrich_batches") == [("rejected",)]

    # A server (or region) without the Batch API at all.
    server.batch_unsupported_models = set()
    server.batch_enabled = False
    with pytest.raises(BatchUnsupported, match="no Files API|HTTP 404") as missing:
        submit(store, fresh_settings(server))
    assert server.base_url in str(missing.value)
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == ids


def test_a_lost_submitter_is_resolved_by_the_poll(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "red")]
    settings = fresh_settings(server)
    result = submit(store, settings)
    (part,) = result.parts
    # The submitter died after creating the batch, before recording it.
    items.execute(
        "UPDATE {ns}.enrich_batches SET state = 'submitting', batch_id = NULL, status = NULL"
    )

    poll_batches(store, settings, submit_grace_seconds=0)

    (found,) = open_batches(store)
    assert (found.state, found.batch_id) == ("open", part.batch_id)  # found by its metadata

    # Died before the batch was created: nothing at the provider, the rows come back.
    items.execute("UPDATE {ns}.enrich_batches SET state = 'submitting', batch_id = NULL")
    server.batches.clear()
    poll_batches(store, settings, submit_grace_seconds=0)
    assert items.execute("SELECT state FROM {ns}.enrich_batches") == [("abandoned",)]
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == ids
    assert store.items.failures("alice") == []


def test_dagster_submit_job_poll_sensor_and_collect_job(
    env: pytest.MonkeyPatch, items: Items, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "green")]
    other = items.add("bob", str(image_dir / "red.jpg"))
    assert set(BATCH_JOBS) == {batch_submit_job, batch_collect_job}
    assert BATCH_SENSORS == [batch_poll_sensor]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])
    resources = {
        "adbpg": AdbpgResource(),
        "dashscope": DashScopeResource(),
        "heartbeat": HeartbeatResource(),
    }

    def tick() -> SensorResult | SkipReason:
        with build_sensor_context(
            instance=instance, resources={"adbpg": AdbpgResource()}
        ) as context:
            return batch_poll_sensor(context)

    assert isinstance(tick(), SkipReason)  # nothing open yet
    submitted = batch_submit_job.execute_in_process(
        instance=instance, partition_key="alice", resources=resources
    )
    assert submitted.success
    summary = submitted.output_for_node("batch_submit")
    assert summary["queued"] == 2 and len(summary["batches"]) == 1

    deadline = time.monotonic() + 10
    while not isinstance(result := tick(), SensorResult):
        assert time.monotonic() < deadline, result
        time.sleep(0.05)
    (request,) = result.run_requests
    assert isinstance(request, RunRequest)
    assert request.run_key == summary["batches"][0]["batch"]
    # A collect run that failed is requested again (run keys are remembered forever) ...
    create_run_for_test(
        instance, job_name="batch_collect_job", status=DagsterRunStatus.FAILURE, tags=request.tags
    )
    retried = tick()
    assert isinstance(retried, SensorResult)
    assert [r.run_key for r in retried.run_requests] == [f"{request.run_key}|retry-1"]
    # ... and one in flight is left alone.
    create_run_for_test(
        instance, job_name="batch_collect_job", status=DagsterRunStatus.STARTED, tags=request.tags
    )
    waiting = tick()
    assert isinstance(waiting, SkipReason) and "already requested" in waiting.skip_message

    collected = batch_collect_job.execute_in_process(
        run_config=request.run_config, tags=request.tags, instance=instance, resources=resources
    )

    assert collected.success
    out = collected.output_for_node("batch_collect")
    assert (out["total"], out["succeeded"], out["state"]) == (2, 2, "collected")
    assert all(items.row(i)["metadata"]["caption"] for i in ids)
    assert "caption" not in items.row(other)["metadata"]
    skip = tick()
    assert isinstance(skip, SkipReason) and skip.skip_message == "no open batch"


def test_command_line(
    env: pytest.MonkeyPatch, items: Items, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "green", "cyan")]
    out = io.StringIO()
    assert batch_mode.main(["submit", "--user-id", "alice", "--max-items", "2"], out=out) == 0
    assert "2 item(s) in 1 batch(es)" in out.getvalue()
    deadline = time.monotonic() + 10
    while True:
        out = io.StringIO()
        assert batch_mode.main(["collect"], out=out) == 0
        if "succeeded 2" in out.getvalue():
            break
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.05)
    assert [bool(items.row(i)["metadata"].get("caption")) for i in ids] == [True, True, False]
    out = io.StringIO()
    assert batch_mode.main(["status"], out=out) == 0 and "no open batch" in out.getvalue()

    env.setenv("DASHSCOPE_VISION_MODEL", "qwen-vl-ocr-latest")
    server.batch_unsupported_models = {"qwen-vl-ocr-latest"}
    assert batch_mode.main(["submit", "--user-id", "alice"], out=io.StringIO()) == 2


def test_answer_lines_read_like_online_answers() -> None:
    url = "http://127.0.0.1:1/v1/chat/completions"
    ok = {
        "custom_id": "1",
        "response": {
            "status_code": 200,
            "body": {
                "choices": [{"message": {"content": "  A blue\nchair. "}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3},
            },
        },
    }
    assert wire.parse_line(ok, url) == wire.LineResult(Answer.plain("A blue chair."), None, 7, 3)
    # An error line with only DashScope's code (no response) is classified as online.
    moderated = wire.parse_line(
        {"custom_id": "2", "error": {"code": "DataInspectionFailed", "message": "no"}}, url
    )
    assert moderated.error is not None and moderated.error.code == "moderation"
    assert moderated.error.permanent
    limited = wire.parse_line(
        {"custom_id": "3", "response": {"status_code": 429, "body": {"error": {}}}}, url
    )
    assert limited.error is not None and not limited.error.permanent
    empty = {"custom_id": "4", "response": {"status_code": 200, "body": {"choices": []}}}
    assert wire.parse_line(empty, url).error.code == "empty_caption"  # type: ignore[union-attr]
    # A batch that failed validation because the model is not offered in batch mode.
    failed = BatchRecord(
        "x-0",
        "alice",
        "x",
        0,
        "batch:x",
        "qwen-vl-ocr",
        "v1",
        url,
        True,
        1,
        1,
        "open",
        status="failed",
        error="model_not_found: The provided model 'qwen-vl-ocr' is not supported",
    )
    message = collect_mode._unsupported_failure(failed)
    assert message and "'qwen-vl-ocr'" in message and url in message
    assert collect_mode._unsupported_failure(replace(failed, error="batch_failed: no")) is None


# ---------------------------------------------------------------------------------------------
# The region/model matrix and the free test model


def test_a_region_without_batch_for_the_model_is_refused_before_anything_is_uploaded(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "red")]
    # Singapore's Batch API takes text models only: a caption batch is refused here, before a
    # row is claimed or a byte sent (the host is not even reachable from these machines).
    singapore = fresh_settings(
        server, base_url="https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
    )
    with pytest.raises(BatchUnsupported) as refused:
        submit(store, singapore)
    message = str(refused.value)
    assert "\n" not in message and "Singapore" in message and "'qwen3-vl-plus'" in message
    assert "text models only" in message and API_KEY not in message
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == ids
    assert items.execute("SELECT count(*) FROM {ns}.enrich_batches") == [(0,)]
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]
    assert not server.requests and not server.files


def test_batch_test_model_lines_go_to_its_own_endpoint(
    items: Items, store: Store, server: StandIn, image_dir: Path
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "red")]
    settings = fresh_settings(server, vision_model="batch-test-model")
    result = submit(store, settings, caption_embedding=False)
    (part,) = result.parts
    upload = next(f for f in server.files.values() if f["purpose"] == "batch")
    lines = [json.loads(x) for x in upload["_content"].decode().splitlines()]
    assert {x["url"] for x in lines} == {"/v1/chat/ds-test"}
    assert items.execute("SELECT endpoint FROM {ns}.enrich_batches") == [("/v1/chat/ds-test",)]
    (ended,) = poll_until_ended(store, settings)
    collected = collect(store, settings, ended)
    assert collected.stats.succeeded == len(ids)
