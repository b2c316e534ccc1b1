"""A batch whose answer format the model refuses (or answers mostly malformed) makes the
model's next batch submission one format lower, and says so in one line; the refused lines'
rows are given back uncharged and end captioned by the next batch. ENRICH_ANSWER_FORMAT set
explicitly still wins.

The settings name DashScope's Beijing host (so that ``auto`` picks the documented json_object
for qwen3-vl-plus, and the batch records that base URL) while the Batch API client given to
submit, poll and collect talks to the stand-in, which refuses json_object for the model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from enrich_pipeline.bootstrap import build_provider
from enrich_pipeline.db.batches import BatchRecord
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline.batch.collect import CollectResult, collect_batch
from enrich_pipeline.pipeline.batch.poll import open_batches, poll_batches
from enrich_pipeline.pipeline.batch.state import TERMINAL
from enrich_pipeline.pipeline.batch.submit import SubmitResult, submit_batch
from enrich_pipeline.providers.batch_api import BatchApi
from enrich_pipeline.providers.dashscope import openai_client
from enrich_pipeline.settings import BatchSettings, DashScopeSettings, RunSettings
from enrich_pipeline_tests.helpers import Items, standin_settings
from enrich_pipeline_tests.standin import StandIn

POLICY = ImagePolicy(allow_local_files=True)
BEIJING = "https://dashscope.aliyuncs.com/compatible-mode/v1"
MODEL = "qwen3-vl-plus"


@pytest.fixture
def server(standin: StandIn) -> Any:
    standin.reset_batches()
    yield standin
    standin.reset_batches()


@pytest.fixture
def beijing(server: StandIn) -> DashScopeSettings:
    return standin_settings(server, base_url=BEIJING, vision_model=MODEL)


@pytest.fixture
def api(server: StandIn, beijing: DashScopeSettings) -> BatchApi:
    """The Batch API as the Beijing settings see it, reached at the stand-in."""
    return BatchApi(beijing, client=openai_client(standin_settings(server)))


def submit(store: Store, settings: DashScopeSettings, api: BatchApi) -> SubmitResult:
    return submit_batch(
        store,
        settings,
        "alice",
        provider=build_provider(settings, embedded_db=False),
        policy=POLICY,
        batch=BatchSettings(),
        run=RunSettings(caption_embedding=False),
        api=api,
    )


def collect_ended(store: Store, settings: DashScopeSettings, api: BatchApi) -> CollectResult:
    deadline = time.monotonic() + 20
    while True:
        ready = poll_batches(store, settings, api=api)
        if ready and all(b.status in TERMINAL for b in open_batches(store)):
            break
        assert time.monotonic() < deadline, [(b.ref, b.status) for b in open_batches(store)]
        time.sleep(0.05)
    (batch,) = ready
    return collect_batch(
        store, settings, batch, provider=build_provider(settings, embedded_db=False), api=api
    )


def uploaded_bodies(server: StandIn) -> list[dict[str, Any]]:
    """The request bodies of the last batch file uploaded."""
    upload = [f for f in server.files.values() if f["purpose"] == "batch"][-1]
    return [json.loads(x)["body"] for x in upload["_content"].decode().splitlines()]


def next_formats(store: Store) -> list[tuple[str, str | None]]:
    return [
        (b.answer_format, b.next_format)
        for b in (store.batches.get(r.local_id) for r in store.batches.list())
        if isinstance(b, BatchRecord)
    ]


def test_a_json_object_refusal_makes_the_next_submission_text_and_charges_no_row(
    monkeypatch: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    image_dir: Path,
    server: StandIn,
    beijing: DashScopeSettings,
    api: BatchApi,
) -> None:
    monkeypatch.setitem(server.response_formats, MODEL, ())  # text only, for this test
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "green", "red")]

    first = submit(store, beijing, api)

    assert (first.answer_format, first.format_note, first.queued) == ("json_object", None, 3)
    assert all(b["response_format"] == {"type": "json_object"} for b in uploaded_bodies(server))
    refused = collect_ended(store, beijing, api)

    # Every line refused for its response_format: the rows are given back, not charged.
    assert refused.released == 3 and refused.stats.total == 0
    assert store.items.failures("alice") == []
    assert store.items.pending_ids("alice", limit=None, max_attempts=3) == sorted(ids)
    step = refused.format_step
    assert step is not None and "\n" not in step
    assert refused.batch.ref in step and "json_object" in step and "use text" in step
    assert next_formats(store) == [("json_object", "text")]

    second = submit(store, beijing, api)

    assert (second.answer_format, second.queued) == ("text", 3)
    note = second.format_note
    assert note is not None and "\n" not in note
    assert note.startswith("answer format text for model 'qwen3-vl-plus', not json_object")
    assert refused.batch.ref in note
    assert all("response_format" not in b for b in uploaded_bodies(server))
    answered = collect_ended(store, beijing, api)

    assert (answered.stats.succeeded, answered.stats.failed, answered.released) == (3, 0, 0)
    assert answered.format_step is None
    for item in ids:
        md = items.row(item)["metadata"]
        assert md["caption"] and (md["answer_format"], md["tags_source"]) == ("text", "rules")
    assert store.items.failures("alice") == []

    # The next one stays at text; ENRICH_ANSWER_FORMAT set explicitly wins, and says what
    # the model's batches showed.
    items.add("alice", str(image_dir / "cyan.jpg"))
    assert submit(store, beijing, api).answer_format == "text"
    items.add("alice", str(image_dir / "magenta.jpg"))
    explicit = submit(store, beijing.with_(answer_format="json_object"), api)
    assert explicit.answer_format == "json_object"
    assert explicit.format_note and "as ENRICH_ANSWER_FORMAT says" in explicit.format_note


def test_mostly_malformed_answers_in_a_batch_make_the_next_submission_text(
    items: Items,
    store: Store,
    image_dir: Path,
    server: StandIn,
    beijing: DashScopeSettings,
    api: BatchApi,
) -> None:
    ids = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "green", "red")]
    server.inject("malformed_answer", times=2, endpoint="batch")  # two lines of the three

    first = submit(store, beijing, api)
    malformed = collect_ended(store, beijing, api)

    assert first.answer_format == "json_object"
    # A malformed answer is its row's error (charged, retried like any row error).
    assert (malformed.stats.succeeded, malformed.stats.failed) == (1, 2)
    assert malformed.stats.errors == {"malformed_answer": 2}
    assert malformed.format_step and "2 of 3 answers were malformed" in malformed.format_step
    charged = {f.item_id: (f.error_code, f.attempts) for f in store.items.failures("alice")}
    assert sorted(charged.values()) == [("malformed_answer", 1)] * 2

    second = submit(store, beijing, api)
    answered = collect_ended(store, beijing, api)

    assert (second.answer_format, second.queued) == ("text", 2) and second.format_note
    assert answered.stats.succeeded == 2 and store.items.failures("alice") == []
    assert all(items.row(i)["metadata"].get("caption") for i in ids)
