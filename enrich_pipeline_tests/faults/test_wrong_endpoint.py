"""A base URL that reaches another server, not an OpenAI-compatible API: a web server refusing
the POST (501, 405 with an HTML page), its welcome page (HTML 200), another API's JSON. The
stand-in serves these as faults (``standin/foreign.py``).

The first call is the probe: its answer stops the run as a setup error naming
``DASHSCOPE_BASE_URL`` (CLI exit 3, one line; Dagster's run fails with the same words), with no
retry, no row charged and every claim released. Once the endpoint has answered properly, the
same web page is a gateway's hiccup, retried like any unreadable answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.db.store import Store
from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.checks import embedding_dimensions
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.partitions import user_to_key
from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.providers.base import FatalProviderError, ProviderError, ProviderUnavailable
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.providers.health import GIVE_UP_AFTER
from enrich_pipeline_tests.helpers import (
    API_KEY,
    Items,
    data_url,
    hues,
    paint,
    png,
    run_cli,
    standin_settings,
)
from enrich_pipeline_tests.standin import StandIn

FOREVER = 1_000_000
FOREIGN = ["not_implemented", "not_allowed", "html_page", "foreign_json"]


def seed(items: Items, paths: list[Path], user: str = "alice") -> list[str]:
    return [items.add(user, str(p), metadata={"title": p.stem}) for p in paths]


def untouched_and_pending(items: Items, store: Store, ids: list[str]) -> None:
    for i in ids:
        assert items.row(i)["metadata"] == {"title": items.row(i)["metadata"]["title"]}
    assert items.execute("SELECT count(*) FROM {ns}.enrich_failures")[0][0] == 0
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims")[0][0] == 0
    assert store.items.count_pending("alice", max_attempts=1) == len(ids)


def requests(server: StandIn, fault: str) -> int:
    return sum(1 for r in list(server.requests) if r["fault"] == fault)


def image() -> VisionImage:
    return VisionImage(data_url=data_url(png((120, 40, 200))), width=48, height=32, tokens=64)


@pytest.mark.parametrize("fault", FOREIGN)
def test_a_base_url_of_another_server_is_a_setup_error_after_one_probe(
    fault: str,
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(4)))
    standin.inject(fault, times=FOREVER, endpoint="any")

    code, report = run_cli(["--user-id", "alice", "--batch-size", "2", "--concurrent", "1"])

    err = capsys.readouterr().err.strip()
    assert code == 3, report
    assert err.count("\n") == 0 and err.startswith("error: run stopped: "), err
    assert f"DASHSCOPE_BASE_URL ({standin.base_url})" in err
    assert "no OpenAI-compatible vision endpoint" in err and "mistyped" in err
    assert "run again later" not in err and API_KEY not in err + report
    assert requests(standin, fault) == 1, "one probe, no retry, no other row tried"
    untouched_and_pending(items, store, ids)


def test_dagster_run_fails_naming_the_base_url(
    env: pytest.MonkeyPatch, items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject("not_implemented", times=FOREVER, endpoint="any")
    instance = DagsterInstance.ephemeral()
    key = user_to_key("alice")
    instance.add_dynamic_partitions("users", [key])
    resources = {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }

    result = materialize(
        [enriched_items, embedding_dimensions],
        partition_key=key,
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )

    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failures[0].step_failure_data.error.message
    assert f"DASHSCOPE_BASE_URL ({standin.base_url})" in message and "mistyped" in message
    assert requests(standin, "not_implemented") == 1
    untouched_and_pending(items, store, ids)


def test_the_embedding_endpoint_is_probed_on_its_own(standin: StandIn) -> None:
    provider = DashScopeProvider(standin_settings(standin))
    try:
        assert provider.caption(image())  # the chat endpoint answered
        standin.inject("html_page", times=FOREVER, endpoint="embeddings")
        with pytest.raises(FatalProviderError) as info:
            provider.embed(["a caption"])
    finally:
        provider.close()
    assert info.value.code == "wrong_base_url" and info.value.kind == "embedding"
    assert "no OpenAI-compatible embedding endpoint" in str(info.value)
    assert requests(standin, "html_page") == 1


@pytest.mark.parametrize("fault", ["html_page", "foreign_json"])
def test_a_web_page_from_an_endpoint_that_answered_is_retried(fault: str, standin: StandIn) -> None:
    provider = DashScopeProvider(standin_settings(standin))
    try:
        assert provider.caption(image())
        standin.inject(fault, times=1, endpoint="chat")
        assert provider.caption(image()), "retried, then answered"
        # Past the retries, on call after call, it is an outage ("run again later").
        standin.inject(fault, times=FOREVER, endpoint="chat")
        failed: list[ProviderError] = []
        for _ in range(GIVE_UP_AFTER):
            try:
                provider.caption(image())
            except ProviderError as exc:
                failed.append(exc)
    finally:
        provider.close()
    assert [e.code for e in failed[:-1]] == ["malformed_response"] * (GIVE_UP_AFTER - 1)
    assert isinstance(failed[-1], ProviderUnavailable)
    assert "answering unreadably" in str(failed[-1]) and "run again later" in str(failed[-1])
