"""One call, one structured answer, against the stand-in DashScope (which takes response_format
as DashScope documents it): model tags and captions in every configured language written to
the row; a refused format stepped down once, charging no row; malformed answers the row's
error, a streak of them the format's; text answers tagged by the keyword rules; batch lines
sent and read the same way."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from enrich_pipeline.bootstrap import build_provider
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment import synthetic
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.pipeline.batch.collect import collect_batch
from enrich_pipeline.pipeline.batch.poll import open_batches, poll_batches
from enrich_pipeline.pipeline.batch.state import TERMINAL
from enrich_pipeline.pipeline.batch.submit import submit_batch
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import BatchSettings, DashScopeSettings, RunSettings
from enrich_pipeline_tests.helpers import Items
from enrich_pipeline_tests.standin import StandIn

LOCAL = ImagePolicy(allow_local_files=True)
SUBJECTS = ("chair", "lamp", "sofa")


@pytest.fixture(scope="module")
def drawings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The demo's drawings, whose subject the stand-in's model 'sees'."""
    folder = tmp_path_factory.mktemp("drawings")
    paths = {}
    for n, subject in enumerate(SUBJECTS):
        path = folder / f"{subject}.png"
        synthetic.draw_sample(subject, (40, 80, 200 - 40 * n), (245, 245, 245)).save(path)
        paths[subject] = str(path)
    return paths


def run(store: Store, api: DashScopeSettings, **run: object) -> tuple[Engine, object]:
    engine = Engine(store, DashScopeProvider(api), api, RunSettings(**run), image_policy=LOCAL)
    return engine, engine.enrich("alice")


def test_a_json_object_run_writes_the_models_tags_and_a_caption_per_language(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
) -> None:
    api = api_settings.with_(answer_format="json_object", caption_languages="zh,en")
    ids = {s: items.add("alice", drawings[s], metadata={"sku": s}) for s in SUBJECTS}

    _, stats = run(store, api)

    assert (stats.succeeded, stats.failed) == (3, 0)
    assert standin.count("chat") == 3
    for subject, item in ids.items():
        md = items.row(item)["metadata"]
        assert md["sku"] == subject
        assert (md["tags_source"], md["answer_format"]) == ("model", "json_object")
        assert set(md["caption_i18n"]) == {"zh", "en"}
        assert md["caption"] == md["caption_i18n"]["zh"]
        assert any("\u4e00" <= ch <= "\u9fff" for ch in md["caption"])
        # What the picture shows, as the model chose it from the vocabulary.
        assert subject in md["object_tags"]
    keys = items.execute("SELECT DISTINCT answer_format, languages FROM {ns}.enrich_answer_cache")
    assert keys == [("json_object", "zh,en")]


def test_a_model_refusing_json_schema_steps_the_run_down_once_and_charges_no_row(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # qwen3-vl-plus is not on the structured-output page's json_schema list: refused.
    api = api_settings.with_(answer_format="json_schema")
    ids = [items.add("alice", drawings[s]) for s in SUBJECTS]

    with caplog.at_level(logging.WARNING, logger="enrich_pipeline.providers.formats"):
        engine, stats = run(store, api, concurrent=3)

    assert (stats.succeeded, stats.failed, stats.skipped) == (3, 0, 0)
    assert store.items.failures("alice") == []
    steps = [r.getMessage() for r in caplog.records if "stepped down" in r.getMessage()]
    assert len(steps) == 1 and "json_schema to json_object" in steps[0]
    assert engine.usage.format_step_downs == 1
    refused = standin.count("chat", status=400)
    assert 1 <= refused <= 3  # the calls sent before the first refusal was known
    assert standin.count("chat", status=200) == 3
    for item in ids:
        md = items.row(item)["metadata"]
        assert (md["answer_format"], md["tags_source"]) == ("json_object", "model")


def test_a_malformed_answer_is_retried_as_the_rows_error(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
) -> None:
    api = api_settings.with_(answer_format="json_object")
    item = items.add("alice", drawings["lamp"])
    standin.inject("malformed_answer", times=1, endpoint="chat")

    engine, stats = run(store, api)

    assert (stats.succeeded, stats.failed) == (1, 0)
    assert standin.count("chat") == 2  # the malformed answer, then the good one
    assert engine.usage.retries == 1 and engine.usage.format_step_downs == 0
    assert items.row(item)["metadata"]["answer_format"] == "json_object"


def test_malformed_answers_for_several_images_step_the_format_down(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = api_settings.with_(answer_format="json_object")
    ids = [items.add("alice", drawings[s]) for s in SUBJECTS]
    # Every structured answer malformed (a text answer is served unchanged).
    standin.inject("malformed_answer", times=1000, endpoint="chat")

    with caplog.at_level(logging.WARNING, logger="enrich_pipeline.providers.formats"):
        engine, stats = run(store, api, concurrent=1)

    # The first image's four tries are its own error (charged, retried by later runs); the
    # second image's malformed answer makes a streak across images: the run steps down to text
    # and every image after is captioned, tagged by the rules.
    assert (stats.succeeded, stats.failed) == (2, 1)
    assert stats.errors == {"malformed_answer": 1}
    ((code, permanent),) = [(f.error_code, f.permanent) for f in store.items.failures("alice")]
    assert (code, permanent) == ("malformed_answer", False)
    assert engine.usage.format_step_downs == 1
    assert sum("json_object to text" in r.getMessage() for r in caplog.records) == 1
    written = [items.row(i)["metadata"] for i in ids]
    done = [md for md in written if "caption" in md]
    assert [(md["answer_format"], md["tags_source"]) for md in done] == [("text", "rules")] * 2


def test_unknown_tags_are_dropped_and_counted(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
) -> None:
    api = api_settings.with_(answer_format="json_object")
    item = items.add("alice", drawings["chair"])
    standin.inject("unknown_tags", times=1, endpoint="chat")

    _, stats = run(store, api)

    assert stats.succeeded == 1 and stats.tags_dropped == 2
    assert ("Tags dropped", "2 (the model's, not in the vocabulary)") in stats.report_rows()
    md = items.row(item)["metadata"]
    assert "chair" in md["object_tags"] and md["tags_source"] == "model"


def test_text_answers_keep_the_keyword_rules_in_every_language(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    image_dir: Path,
    standin: StandIn,
) -> None:
    # auto on a server that is not DashScope (the stand-in at 127.0.0.1): text.
    api = api_settings.with_(caption_languages="zh,en")
    item = items.add("alice", str(image_dir / "blue.jpg"))

    _, stats = run(store, api)

    assert stats.succeeded == 1
    md = items.row(item)["metadata"]
    assert (md["answer_format"], md["tags_source"]) == ("text", "rules")
    assert set(md["caption_i18n"]) == {"zh", "en"}
    # The rules found the English caption's words (and the Chinese one's, where the vocabulary
    # has Chinese aliases).
    assert md["object_tags"] and md["style_tags"]


def test_a_thinking_model_answers_structured_with_thinking_off(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
) -> None:
    # Qwen3.5 thinks by default; the stand-in refuses a response_format while thinking.
    api = api_settings.with_(vision_model="qwen3.5-plus", answer_format="json_object")
    item = items.add("alice", drawings["sofa"])

    _, stats = run(store, api)

    assert stats.succeeded == 1 and standin.count("chat", status=400) == 0
    assert items.row(item)["metadata"]["tags_source"] == "model"


def test_batch_lines_carry_the_structured_request_and_are_read_the_same_way(
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    drawings: dict[str, str],
    standin: StandIn,
) -> None:
    standin.reset_batches()
    api = api_settings.with_(answer_format="json_object", caption_languages="zh,en")
    ids = {s: items.add("alice", drawings[s]) for s in SUBJECTS}
    provider = build_provider(api, embedded_db=False)
    standin.inject("malformed_answer", times=1, endpoint="batch")  # one line of the three

    submitted = submit_batch(
        store,
        api,
        "alice",
        provider=provider,
        policy=LOCAL,
        batch=BatchSettings(),
        run=RunSettings(caption_embedding=False),
    )
    assert submitted.lines == 3
    deadline = time.monotonic() + 20
    while True:
        poll_batches(store, api)
        if all(b.status in TERMINAL for b in open_batches(store)):
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (batch,) = open_batches(store)
    assert (batch.answer_format, batch.languages) == ("json_object", "zh,en")

    result = collect_batch(store, api, batch, provider=provider)

    assert (result.stats.succeeded, result.stats.failed) == (2, 1)
    assert result.stats.errors == {"malformed_answer": 1}
    written = {s: items.row(i)["metadata"] for s, i in ids.items()}
    done = {s: md for s, md in written.items() if "caption" in md}
    assert len(done) == 2
    for subject, md in done.items():
        assert (md["answer_format"], md["tags_source"]) == ("json_object", "model")
        assert set(md["caption_i18n"]) == {"zh", "en"} and subject in md["object_tags"]
    cached = items.execute("SELECT answer_format, languages FROM {ns}.enrich_answer_cache")
    assert sorted(cached) == [("json_object", "zh,en")] * 2
    standin.reset_batches()
