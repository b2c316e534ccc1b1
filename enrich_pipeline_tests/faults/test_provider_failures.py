"""Provider answers and failures, end to end: the stand-in DashScope server answers with
DashScope's documented error bodies (or misbehaves as any provider can), the real pipeline runs
through the CLI, the Engine and Dagster's ``materialize`` over a real PostgreSQL, and each test
asserts what the user sees (exit code, the one ``error:`` line, the report, the run's failure)
and what is left in the database (captions, vectors, ledger rows and attempts, claims).

- Account, key, model and request problems stop the run at once naming what to fix (exit 3,
  Dagster ``Failure``), with no ledger row and every claim released.
- Throttling, an unreachable or failing provider, and timeouts on most calls never cost a row:
  the run slows down, then stops with one line (exit 4) and the rows stay pending with their
  attempts unchanged; the next run (once the provider answers) captions them.
- Hostile answers are one row's problem: captions are cleaned or capped (or the row fails
  alone), non-finite or short vectors are refused per row, a trickling answer times out after
  ``DASHSCOPE_TIMEOUT`` in total, and captions already paid are written when the embedding model
  stops the run.

Backoffs are kept short (``DASHSCOPE_BACKOFF_INITIAL=0.01``); "long" storms are faults injected
for far more requests than three runs make, cleared before the run that must succeed.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.db.store import Store
from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.checks import embedding_dimensions
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.partitions import user_to_key
from enrich_pipeline.enrichment.images import (
    ImagePolicy,
    VisionImage,
    load_image,
    prepare_for_vision,
)
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.enrichment.structured import Answer, Question
from enrich_pipeline.enrichment.text import CAPTION_MAX_CHARS, ELLIPSIS
from enrich_pipeline.pipeline import stages
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.base import ProviderError, ProviderUnavailable, Usage
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
FOREVER = 1_000_000  # injected for far more requests than any of these runs makes


# --- helpers ---------------------------------------------------------------------------------


def seed(items: Items, paths: list[Path], user: str = "alice") -> list[str]:
    return [items.add(user, str(p), metadata={"title": p.stem}) for p in paths]


def engine_for(store: Store, api: DashScopeSettings, **run: Any) -> Engine:
    return Engine(store, DashScopeProvider(api), api, RunSettings(**run), image_policy=LOCAL)


def ledger(items: Items) -> list[tuple]:
    return items.execute(
        "SELECT item_id, attempts, permanent, error_code FROM {ns}.enrich_failures ORDER BY 1"
    )


def claims(items: Items) -> int:
    return items.execute("SELECT count(*) FROM {ns}.enrich_claims")[0][0]


def vectors(items: Items) -> dict[str, tuple[int, bool]]:
    """item -> (length, every component finite) of the stored embeddings."""
    rows = items.execute(
        "SELECT item_id, array_length(embedding, 1),"
        " NOT EXISTS (SELECT 1 FROM unnest(embedding) v"
        "  WHERE v = 'NaN'::real OR v IN ('Infinity'::real, '-Infinity'::real))"
        " FROM {ns}.enrich_embeddings"
    )
    return {r[0]: (r[1], r[2]) for r in rows}


def captions(items: Items, ids: list[str]) -> dict[str, str | None]:
    return {i: (items.row(i)["metadata"] or {}).get("caption") for i in ids}


def chat(server: StandIn, *, ok: bool = False) -> int:
    log = list(server.requests)
    return sum(
        1
        for r in log
        if r["endpoint"] == "chat" and (not ok or (r["fault"] is None and r["status"] == 200))
    )


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run stopped: "), err
    return lines[0]


def untouched_and_pending(items: Items, store: Store, ids: list[str]) -> None:
    """Each row exactly as seeded, none in the ledger, none claimed, all pending."""
    for i in ids:
        assert items.row(i)["metadata"] == {"title": items.row(i)["metadata"]["title"]}
    assert ledger(items) == []
    assert claims(items) == 0
    assert store.items.count_pending("alice", max_attempts=1) == len(ids)  # zero attempts


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def materialize_user(user: str = "alice", **config: object) -> Any:
    instance = DagsterInstance.ephemeral()
    key = user_to_key(user)
    instance.add_dynamic_partitions("users", [key])
    resources = {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }
    return materialize(
        [enriched_items, embedding_dimensions],
        partition_key=key,
        instance=instance,
        resources=resources,
        run_config={"ops": {"enriched_items": {"ops": {"pending_rows": {"config": config}}}}}
        if config
        else None,
        raise_on_error=False,
    )


def step_failure(result: Any) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "no step failed"
    return failures[0].step_failure_data.error.message


# A trickled caption takes about a minute (a byte every 0.2 s): a call ended well before this
# was ended by its deadline, whatever the machine's load.
TRICKLE_ENDS = 20.0


@pytest.fixture
def private_server() -> Iterator[StandIn]:
    """A server of the test's own, for faults that keep requests open (hangs, trickles):
    stopping it at the end of the test ends them, so they never reach another test's log."""
    server = StandIn(api_key=API_KEY, hang_seconds=5.0, trickle_interval=0.2).start()
    yield server
    server.stop()


# --- account, key, model and request problems stop the run at once ---------------------------

STOPS = [
    # fault, words the one line must hold, words it must not hold
    ("arrearage", ("account", "arrears", "Top up", "billing"), ("DASHSCOPE_API_KEY",)),
    ("unauthorized", ("DASHSCOPE_API_KEY", "DASHSCOPE_BASE_URL", "region"), ()),
    (
        "model_access_denied",
        ("vision model 'qwen3-vl-plus'", "DASHSCOPE_VISION_MODEL"),
        ("DASHSCOPE_API_KEY",),
    ),
    (
        "model_not_found",
        ("vision model 'qwen3-vl-plus'", "does not exist", "DASHSCOPE_VISION_MODEL"),
        ("DASHSCOPE_API_KEY",),
    ),
    ("bad_request", ("whatever the image", "max_tokens", "DASHSCOPE_VISION_MODEL"), ()),
    ("no_image_support", ("does not take images", "DASHSCOPE_VISION_MODEL"), ()),
]


@pytest.mark.parametrize(("fault", "words", "absent"), STOPS, ids=[s[0] for s in STOPS])
def test_cli_stops_at_once_on_account_key_model_and_request_problems(
    fault: str,
    words: tuple[str, ...],
    absent: tuple[str, ...],
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(4)))
    standin.inject(fault, times=FOREVER, endpoint="chat")

    code, report = run_cli(["--user-id", "alice", "--batch-size", "2", "--concurrent", "1"])

    line = one_error_line(capsys.readouterr().err)
    assert code == 3, report
    for word in words:
        assert word in line, (word, line)
    for word in absent:
        assert word not in line, (word, line)
    assert API_KEY not in line + report
    assert chat(standin) == 1, "the first such answer stops the run; no other row is tried"
    # The report still counts the call that was made (and failed).
    assert re.search(r"^  API calls:\s+1 vision, 0 embedding, 0 retries$", report, re.M), report
    assert re.search(r"^  Failed calls:\s+1 vision", report, re.M), report
    untouched_and_pending(items, store, ids)


def test_a_text_only_model_stops_the_run_naming_it(
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server itself refuses images for a text-only model (no injected fault)."""
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.text_only_models = {"qwen-plus"}
    env.setenv("DASHSCOPE_VISION_MODEL", "qwen-plus")
    try:
        code, _ = run_cli(["--user-id", "alice", "--concurrent", "1"])
    finally:
        standin.text_only_models = set()
    line = one_error_line(capsys.readouterr().err)
    assert code == 3
    assert "vision model 'qwen-plus'" in line and "does not take images" in line
    untouched_and_pending(items, store, ids)


def test_a_mistyped_base_url_path_stops_the_run_naming_the_variable(
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(2)))
    env.setenv("DASHSCOPE_BASE_URL", standin.base_url.replace("/v1", "/compatible-mode/v2"))
    code, _ = run_cli(["--user-id", "alice"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 3
    assert "DASHSCOPE_BASE_URL" in line and "mistyped" in line and "/compatible-mode/v2" in line
    untouched_and_pending(items, store, ids)


@pytest.mark.parametrize(
    ("fault", "words"),
    [("arrearage", "arrears"), ("model_access_denied", "DASHSCOPE_VISION_MODEL")],
)
def test_dagster_run_fails_on_account_and_model_problems_and_leaves_rows_pending(
    fault: str,
    words: str,
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject(fault, times=FOREVER, endpoint="chat")
    result = materialize_user(concurrent=1)
    assert not result.success
    assert words in step_failure(result)
    assert not result.asset_materializations_for_node("enriched_items")
    untouched_and_pending(items, store, ids)


# --- the rows' own rejections stay permanent, throttling stays transient ----------------------


@pytest.mark.parametrize(
    ("fault", "code"), [("image_download_failed", "bad_image"), ("output_moderation", "moderation")]
)
def test_a_rejected_image_is_permanent_for_that_row_alone(
    fault: str, code: str, items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    paths = paint(tmp_path, hues(3))
    ids = seed(items, paths)
    standin.add_rule(fault, color=mean_of(paths[1]), tolerance=8)
    eng = engine_for(store, standin_settings(standin))
    stats = eng.enrich("alice")
    assert (stats.succeeded, stats.failed, stats.errors) == (2, 1, {code: 1})
    assert ledger(items) == [(ids[1], 1, True, code)]
    assert eng.usage.retries == 0 and claims(items) == 0
    assert all(captions(items, [ids[0], ids[2]]).values())


@pytest.mark.parametrize("fault", ["429", "tpm_throttle"])
def test_throttling_that_clears_is_retried_and_captions_every_row(
    fault: str, items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject(fault, times=2, endpoint="chat")
    eng = engine_for(store, standin_settings(standin))
    stats = eng.enrich("alice")
    assert (stats.succeeded, stats.failed, stats.skipped) == (3, 0, 0)
    assert eng.usage.retries == 2 and eng.usage.failed_vision_calls == 2
    assert all(captions(items, ids).values()) and ledger(items) == []


@pytest.mark.parametrize("fault", ["429", "tpm_throttle"])
def test_throttling_on_one_row_past_the_retries_costs_it_nothing(
    fault: str, items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    paths = paint(tmp_path, hues(3))
    ids = seed(items, paths)
    target = ids[0]
    standin.add_rule(fault, color=mean_of(paths[0]), tolerance=8)  # forever
    eng = engine_for(store, standin_settings(standin, max_retries=2))

    for run in (1, 2):
        stats = eng.enrich("alice")
        expected = (3, 2, 0, 1, 1) if run == 1 else (1, 0, 0, 1, 1)
        got = (stats.total, stats.succeeded, stats.failed, stats.skipped, stats.deferred)
        assert got == expected, run
        # Not the row's fault: no ledger row, attempts unchanged, still pending, not claimed.
        assert ledger(items) == [] and claims(items) == 0
        assert store.items.count_pending("alice", max_attempts=1) == 1
        assert items.row(target)["metadata"] == {"title": paths[0].stem}
    assert all(captions(items, ids[1:]).values())


# --- run-wide failures never cost a row ---------------------------------------------------------


def test_a_429_storm_across_three_runs_costs_no_row_and_the_next_run_captions_them_all(
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every vision call is throttled for longer than three runs retry (the storm is injected
    for a million requests and cleared before the fourth run): each run slows down, gives up
    with one line and exit 4, and charges no row; the fourth run captions every row."""
    ids = seed(items, paint(tmp_path, hues(12)))
    standin.inject("429", times=FOREVER, endpoint="chat")
    argv = ["--user-id", "alice", "--batch-size", "4", "--concurrent", "4"]

    for run in range(3):
        before = chat(standin)
        code, report = run_cli(argv)
        line = one_error_line(capsys.readouterr().err)
        assert code == 4, (run, report)
        assert "throttling every call" in line and "429" in line
        assert "no row was charged an attempt" in line
        # The run slowed down and gave up: a few calls, far fewer than 12 rows x 4 tries.
        assert 3 <= chat(standin) - before <= 24, run
        untouched_and_pending(items, store, ids)

    standin.clear_faults()  # the storm is over
    code, report = run_cli(argv)
    assert code == 0, report
    assert all(captions(items, ids).values())
    assert ledger(items) == [] and claims(items) == 0
    assert re.search(r"^  Succeeded:\s+12$", report, re.M), report


def test_an_unreachable_base_url_three_times_leaves_every_row_pending_with_zero_attempts(
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(8)))
    port = closed_port()
    env.setenv("DASHSCOPE_BASE_URL", f"http://127.0.0.1:{port}/v1")

    for run in range(3):
        started = time.monotonic()
        code, report = run_cli(["--user-id", "alice", "--batch-size", "3"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 4, (run, report)
        assert f"unreachable at DASHSCOPE_BASE_URL (http://127.0.0.1:{port}/v1)" in line
        assert "refused" in line.lower() and "no row was charged an attempt" in line
        assert API_KEY not in line + report
        # Every try is counted, though none was answered.
        calls = int(re.search(r"^  API calls:\s+(\d+) vision", report, re.M).group(1))  # type: ignore[union-attr]
        assert calls >= 3 and f"Failed calls:     {calls} vision" in report, report
        assert time.monotonic() - started < 20
        untouched_and_pending(items, store, ids)


def test_dagster_run_fails_when_the_provider_is_unreachable_and_charges_no_row(
    env: pytest.MonkeyPatch, items: Items, store: Store, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(4)))
    env.setenv("DASHSCOPE_BASE_URL", f"http://127.0.0.1:{closed_port()}/v1")
    for _ in range(2):
        result = materialize_user(batch_size=2)
        assert not result.success
        message = step_failure(result)
        assert "unreachable" in message and "no row was charged an attempt" in message
        untouched_and_pending(items, store, ids)


def test_fewer_failed_calls_than_a_stop_still_charge_no_row_in_a_dagster_run(
    env: pytest.MonkeyPatch, items: Items, store: Store, tmp_path: Path
) -> None:
    """Two rows, two calls refused: too few to stop the run, and no success to blame the rows
    by. The captions step (its calls made by the run's lookahead) gives them back uncharged."""
    ids = seed(items, paint(tmp_path, hues(2)))
    env.setenv("DASHSCOPE_BASE_URL", f"http://127.0.0.1:{closed_port()}/v1")
    result = materialize_user(batch_size=2)
    failed = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert not failed or "no row was charged an attempt" in step_failure(result)
    untouched_and_pending(items, store, ids)


def test_a_5xx_outage_slows_the_run_down_then_stops_it_without_charging_rows(
    items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(10)))
    standin.inject("503", times=FOREVER, endpoint="chat")
    eng = engine_for(store, standin_settings(standin), concurrent=8, batch_size=5)

    with pytest.raises(ProviderUnavailable, match="DashScope failing") as info:
        eng.enrich("alice")

    vision = eng.provider.governors["vision"]  # type: ignore[attr-defined]
    assert vision.lowest_limit < 8 and vision.pauses > 0  # fewer in flight, shared pauses
    assert "HTTP 503" in str(info.value)
    untouched_and_pending(items, store, ids)
    # The stop ends the run for every call: nothing more is sent.
    sent = chat(standin)
    with pytest.raises(ProviderUnavailable):
        eng.provider.caption(VisionImage("data:image/png;base64,AA==", 1, 1, 4))
    assert chat(standin) == sent


def test_timeouts_on_most_calls_charge_no_row(
    items: Items, store: Store, private_server: StandIn, tmp_path: Path
) -> None:
    paths = paint(tmp_path, hues(6))
    ids = seed(items, paths)
    for path in paths[1:]:  # five of six images never get an answer in time
        private_server.add_rule("timeout", color=mean_of(path), tolerance=8)
    api = standin_settings(private_server, timeout=0.3, max_retries=1)
    eng = engine_for(store, api, concurrent=3, batch_size=3)

    try:
        stats = eng.enrich("alice")
        assert stats.failed == 0
    except ProviderUnavailable as stop:
        assert "not answering in time" in str(stop)

    assert ledger(items) == [], "a timeout on most calls is never the rows' fault"
    assert claims(items) == 0
    # Every row is captioned (the one that answers, if its chunk was written) or pending.
    pending = store.items.count_pending("alice", max_attempts=1)
    assert pending + sum(1 for c in captions(items, ids).values() if c) == len(ids)
    assert pending >= 5


# --- a trickling answer times out after DASHSCOPE_TIMEOUT in total ------------------------------


def test_a_trickling_answer_times_out_after_the_total_deadline_and_is_retried(
    items: Items, store: Store, private_server: StandIn, tmp_path: Path
) -> None:
    """The stand-in sends a complete 200 one byte every 0.2 s (about a minute for a caption):
    each byte arrives well within any per-read timeout, so only a total deadline ends it."""
    ids = seed(items, paint(tmp_path, hues(1)))
    private_server.inject("trickle", times=1, endpoint="chat")
    eng = engine_for(store, standin_settings(private_server, timeout=1.0))

    started = time.monotonic()
    stats = eng.enrich("alice")
    elapsed = time.monotonic() - started

    assert stats.succeeded == 1 and ledger(items) == []
    assert eng.usage.retries == 1 and eng.usage.failed_vision_calls == 1
    # Not before the 1 s deadline, and long before the trickle's minute: room for a busy machine.
    assert 1.0 <= elapsed < TRICKLE_ENDS, elapsed
    assert captions(items, ids)[ids[0]]


def test_a_call_that_trickles_forever_fails_as_a_transient_timeout_at_the_deadline(
    private_server: StandIn, tmp_path: Path
) -> None:
    (path,) = paint(tmp_path, hues(1))
    private_server.add_rule("trickle", color=mean_of(path), tolerance=8)
    # 5 s: 25 times the gap between two bytes, so that only the total deadline can end the call
    # (the client's own per-read timeout would need a 5 s gap, even on a starved machine).
    provider = DashScopeProvider(standin_settings(private_server, timeout=5.0, max_retries=0))
    image = prepare_for_vision(load_image(str(path), LOCAL))
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        provider.caption(image)
    elapsed = time.monotonic() - started
    assert (info.value.code, info.value.permanent) == ("timeout", False)
    assert "DASHSCOPE_TIMEOUT=5 s in total" in str(info.value)
    assert 4.95 <= elapsed < TRICKLE_ENDS, elapsed
    # The abandoned call ends by itself at its first byte past the deadline (0.2 s later), not
    # when the trickle would have ended.
    deadline = time.monotonic() + TRICKLE_ENDS
    while any(t.name == "dashscope-call" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the abandoned call is still running"
        time.sleep(0.05)
    provider.close()


# --- hostile captions: cleaned, capped, or the row fails alone ----------------------------------

HOSTILE = ["nul_caption", "surrogate_caption", "huge_caption", "control_caption", "blank_caption"]


def _hostile_rows(items: Items, server: StandIn, tmp_path: Path) -> dict[str, str]:
    paths = paint(tmp_path, hues(len(HOSTILE) + 1))
    ids = seed(items, paths)
    for fault, path in zip(HOSTILE, paths, strict=False):
        server.add_rule(fault, color=mean_of(path), tolerance=8)  # forever
    return dict(zip([*HOSTILE, "plain"], ids, strict=True))


def _assert_hostile_outcome(items: Items, rows: dict[str, str]) -> None:
    for fault, item in rows.items():
        md = items.row(item)["metadata"]
        if fault == "blank_caption":
            assert "caption" not in md, md  # no caption is no caption: that row fails alone
            continue
        caption = md["caption"]
        assert PATCH_KEYS <= set(md) and caption
        assert caption.isprintable() and "\x00" not in caption
        caption.encode("utf-8")
        if fault == "huge_caption":
            assert len(caption) <= CAPTION_MAX_CHARS and caption.endswith(ELLIPSIS)
            assert md["caption_truncated"] is True
        else:
            assert len(caption) < 300 and "caption_truncated" not in md
    # The blank answer is transient, retried, then the row's own failure (the others answer).
    assert ledger(items) == [(rows["blank_caption"], 1, False, "empty_caption")]
    assert claims(items) == 0
    assert set(vectors(items)) == set(rows.values()) - {rows["blank_caption"]}


def test_cli_writes_hostile_captions_clean_and_fails_only_the_blank_one(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    rows = _hostile_rows(items, standin, tmp_path)
    code, report = run_cli(["--user-id", "alice"])  # one chunk of six
    assert code == 0, report
    assert "\x1b" not in report and "\x00" not in report
    assert re.search(r"^  Succeeded:\s+5$", report, re.M), report
    # Five answered calls, and the blank one's four tries (1 + 3 retries), failed calls all.
    assert re.search(r"^  API calls:\s+9 vision, 1 embedding, 3 retries$", report, re.M), report
    assert re.search(r"^  Failed calls:\s+4 vision, 0 embedding", report, re.M), report
    _assert_hostile_outcome(items, rows)


def test_dagster_writes_hostile_captions_clean_and_fails_only_the_blank_one(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    rows = _hostile_rows(items, standin, tmp_path)
    result = materialize_user()
    assert result.success
    (mat,) = result.asset_materializations_for_node("enriched_items")
    assert (mat.metadata["succeeded"].value, mat.metadata["failed"].value) == (5, 1)
    _assert_hostile_outcome(items, rows)


class _Explodes:
    """A provider (the protocol, not a project module) that breaks on its second caption."""

    model_label = "exploding"
    offline = False
    answer_format = "text"

    def __init__(self) -> None:
        self.usage = Usage()
        self.calls = 0

    def answer(self, image: VisionImage, question: Question) -> Answer:
        self.calls += 1
        if self.calls == 2:
            raise KeyError("choices")
        return Answer({"en": "A plain chair."})

    def embed(self, texts: Any) -> list[list[float]]:
        return [[0.5] * 4 for _ in texts]

    def close(self) -> None:
        pass


def test_anything_one_row_causes_fails_that_row_alone_in_the_stages(
    items: Items, store: Store, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    provider = _Explodes()
    chunk = stages.claim_chunk(store, "alice", ids, worker="w", lease_seconds=60, max_attempts=3)
    stages.visual_attributes(chunk, policy=LOCAL, max_image_side=256, concurrent=1)
    stages.caption_chunk(chunk, provider, concurrent=1, cache=store.cache)
    result = stages.write_chunk(
        store, chunk, provenance=Provenance("exploding", "v1"), embedding_model=None
    )
    assert (result.stats.succeeded, result.stats.failed) == (2, 1)
    (entry,) = ledger(items)
    assert entry[1:] == (1, False, "internal_error")
    assert claims(items) == 0


# --- vectors: refused per row -------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan_embedding", "inf_embedding", "short_embedding"])
def test_cli_refuses_a_non_finite_or_short_vector_for_its_row_alone(
    fault: str, env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject(fault, times=1, endpoint="embeddings")  # the first embedding request
    code, report = run_cli(["--user-id", "alice", "--batch-size", "1", "--concurrent", "1"])
    assert code == 0, report
    assert all(captions(items, ids).values()), "the caption is written without its vector"
    stored = vectors(items)
    assert len(stored) == 2 and set(stored.values()) == {(1024, True)}
    assert re.search(r"^  Embedded:\s+2 \(1 without embedding\)$", report, re.M), report
    assert ledger(items) == []


def test_dagster_refuses_a_nan_vector_for_its_row_alone(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject("nan_embedding", times=1, endpoint="embeddings")
    result = materialize_user(batch_size=1, concurrent=1)
    assert result.success
    (mat,) = result.asset_materializations_for_node("enriched_items")
    assert (mat.metadata["succeeded"].value, mat.metadata["embedded"].value) == (3, 2)
    assert all(captions(items, ids).values())
    assert set(vectors(items).values()) == {(1024, True)}
    (check,) = result.get_asset_check_evaluations()
    assert check.passed


# --- the embedding model stops the run: paid captions are written first -----------------------


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        (
            "model_access_denied",
            ("embedding model 'text-embedding-v4'", "DASHSCOPE_EMBEDDING_MODEL"),
        ),
        ("unauthorized", ("DASHSCOPE_API_KEY",)),
    ],
)
def test_cli_writes_paid_captions_without_vectors_when_the_embedding_model_stops_the_run(
    fault: str,
    words: tuple[str, ...],
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(4)))
    standin.inject(fault, times=FOREVER, endpoint="embeddings")

    code, report = run_cli(["--user-id", "alice", "--batch-size", "2", "--concurrent", "1"])

    line = one_error_line(capsys.readouterr().err)
    assert code == 3, report
    for word in words:
        assert word in line, (word, line)
    written = [i for i, c in captions(items, ids).items() if c]
    assert len(written) >= 2, "the first chunk's paid captions are written"
    assert vectors(items) == {}
    assert re.search(rf"^  Embedded:\s+0 \({len(written)} without embedding\)$", report, re.M)
    assert ledger(items) == [] and claims(items) == 0
    assert store.items.count_pending("alice", max_attempts=1) == len(ids) - len(written)


def test_dagster_writes_paid_captions_without_vectors_when_the_embedding_model_stops_the_run(
    env: pytest.MonkeyPatch, items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(4)))
    standin.inject("model_access_denied", times=FOREVER, endpoint="embeddings")

    result = materialize_user(batch_size=2, concurrent=1)

    assert not result.success
    assert "DASHSCOPE_EMBEDDING_MODEL" in step_failure(result)
    written = [i for i, c in captions(items, ids).items() if c]
    assert written[:2] == ids[:2], "chunk 0's paid captions are written before the run fails"
    assert vectors(items) == {}
    assert ledger(items) == [] and claims(items) == 0
    assert store.items.count_pending("alice", max_attempts=1) == len(ids) - len(written)
