"""Pay once, or stop paying: a hostile provider's answers against the real pipeline (the CLI and
Dagster's ``materialize``), over a real PostgreSQL and the stand-in server.

- An answer whose ``usage`` lies (``{}``, null, negative, 1e300, text) still delivers its paid
  caption: the row is written once, its tokens are reported as unknown and the cost as a floor.
- A model that answers no usable caption is each row's error: charged an attempt in the ledger
  (even when the run stops midway) and given up after ``max_attempts``; a run that keeps paying
  for such answers stops (exit 3) with one line naming the model. The paid calls are bounded.
- A trigger that refuses one row's write is that row's error, with the database's words (secrets
  masked), while the chunk's other rows are written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, materialize

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.io_managers import CHUNK_IO
from enrich_pipeline.defs.partitions import user_to_key
from enrich_pipeline.providers.answers import MAX_CALL_TOKENS
from enrich_pipeline_tests.helpers import API_KEY, PATCH_KEYS, Items, hues, mean_of, paint, run_cli
from enrich_pipeline_tests.standin import StandIn
from enrich_pipeline_tests.standin.faults import USAGE_FAULTS

FOREVER = 1_000_000
PRICES = '{"qwen3-vl-plus": [0.2, 1.6], "text-embedding-v4": [0.07, 0], "currency": "USD"}'


def seed(items: Items, paths: list[Path], user: str = "alice") -> list[str]:
    return [items.add(user, str(p), metadata={"title": p.stem}) for p in paths]


def ledger(items: Items) -> list[tuple[Any, ...]]:
    return items.execute(
        "SELECT item_id, attempts, permanent, error_code FROM {ns}.enrich_failures ORDER BY 1"
    )


def claims(items: Items) -> int:
    return int(items.execute("SELECT count(*) FROM {ns}.enrich_claims")[0][0])


def captions(items: Items, ids: list[str]) -> dict[str, str | None]:
    return {i: (items.row(i)["metadata"] or {}).get("caption") for i in ids}


def requests(server: StandIn, endpoint: str = "chat") -> int:
    return sum(1 for r in list(server.requests) if r["endpoint"] == endpoint)


def materialize_user(user: str = "alice", instance: DagsterInstance | None = None) -> Any:
    instance = instance or DagsterInstance.ephemeral()
    key = user_to_key(user)
    instance.add_dynamic_partitions("users", [key])
    resources = {
        k: v
        for k, v in defs.resources.items()
        if k in ("adbpg", "dashscope", "run_state", "heartbeat", CHUNK_IO)
    }
    return materialize(
        [enriched_items], partition_key=key, instance=instance, resources=resources,
        raise_on_error=False,
    )  # fmt: skip


def step_failure(result: Any) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "no step failed"
    return str(failures[0].step_failure_data.error.message)


# --- odd usage: the paid caption is kept, its tokens are unknown ------------------------------


@pytest.mark.parametrize("fault", sorted(USAGE_FAULTS))
def test_cli_keeps_every_paid_caption_whatever_its_usage_says(
    fault: str, env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    env.setenv("ENRICH_PRICES", PRICES)
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject(fault, times=FOREVER, endpoint="any")  # chat and embeddings alike

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert re.search(r"^  Succeeded:\s+3$", report, re.M), report
    assert requests(standin) == 3, "each caption paid once"
    assert re.search(r"^  Tokens unknown:\s+for 4 call\(s\)", report, re.M), report
    cost = re.search(r"^  Estimated cost:\s+at least (\d+\.\d{6}) USD", report, re.M)
    assert cost is not None, report
    assert 0 <= float(cost.group(1)) < 0.01
    tokens = re.search(r"^  Tokens used:\s+(\d+) ", report, re.M)
    assert tokens is not None and int(tokens.group(1)) < 4 * MAX_CALL_TOKENS, report
    assert all(c for c in captions(items, ids).values())
    assert all(PATCH_KEYS <= set(items.row(i)["metadata"]) for i in ids)
    assert ledger(items) == [] and claims(items) == 0
    assert items.execute("SELECT count(*) FROM {ns}.enrich_embeddings") == [(3,)]


def test_cli_counts_believable_tokens_in_full_and_says_nothing_of_unknown_ones(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    env.setenv("ENRICH_PRICES", PRICES)
    seed(items, paint(tmp_path, hues(2)))
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert "Tokens unknown" not in report and "at least" not in report
    assert re.search(r"^  Estimated cost:\s+\d+\.\d{6} USD", report, re.M), report


@pytest.mark.parametrize("fault", ["usage_huge", "usage_negative"])
def test_dagster_metadata_never_holds_an_unchecked_token_count(
    fault: str, env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    env.setenv("ENRICH_PRICES", PRICES)
    ids = seed(items, paint(tmp_path, hues(2)))
    standin.inject(fault, times=FOREVER, endpoint="chat")

    result = materialize_user()

    assert result.success
    (mat,) = result.asset_materializations_for_node("enriched_items")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["succeeded"] == 2 and md["calls_with_unknown_tokens"] == 2
    for key in ("tokens_used", "prompt_tokens", "completion_tokens"):
        assert 0 <= md[key] <= 2 * MAX_CALL_TOKENS, (key, md[key])
    assert 0 <= md["estimated_cost_usd"] < 0.01
    assert md["estimated_cost_is"].startswith("at least")
    assert all(captions(items, ids).values())
    assert requests(standin) == 2
    assert ledger(items) == [] and claims(items) == 0


# --- unusable answers: the row's error, bounded, and a stop ------------------------------------


def test_a_model_answering_only_blank_captions_stops_each_run_and_gives_every_row_up(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(6)))
    standin.inject("blank_caption", times=FOREVER, endpoint="chat")
    capsys.readouterr()
    codes: list[int] = []
    calls: list[int] = []
    report = ""
    while "No pending items" not in report:
        assert len(codes) < 10, (codes, calls)  # each run charges every row it paid for
        before = requests(standin)
        code, report = run_cli(["--user-id", "alice", "--concurrent", "3", "--max-attempts", "2"])
        err = capsys.readouterr().err
        codes.append(code)
        calls.append(requests(standin) - before)
        if code == 3:
            (line,) = err.strip().splitlines()
            assert line.startswith("error: run stopped: the vision model 'qwen3-vl-plus'"), line
            assert "DASHSCOPE_VISION_MODEL" in line and "DASHSCOPE_UNUSABLE_STOP=8" in line
            assert "without a usable caption" in line
            assert re.search(r"^  Failed:\s+[1-9]", report, re.M), report
        else:
            assert code == 0 and err == "", (code, err)
        assert claims(items) == 0
    # Every row given up after its 2 attempts, each charged as its own empty_caption.
    assert ledger(items) == [(i, 2, False, "empty_caption") for i in sorted(ids)]
    assert captions(items, ids) == dict.fromkeys(ids)
    assert codes[-1] == 0 and calls[-1] == 0, (codes, calls)  # nothing left to pay for
    assert codes[0] == 3, codes
    # A run stops after 8 unusable answers in a row (plus the calls in flight); a row pays at
    # most 1 + DASHSCOPE_MAX_RETRIES answers a run, and is charged each run it is paid for.
    assert all(n <= 8 + 3 for n in calls), calls
    assert sum(calls) <= len(ids) * 2 * 4, calls


def test_a_row_the_model_never_captions_is_given_up_after_max_attempts(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    paths = paint(tmp_path, hues(3))
    ids = seed(items, paths)
    standin.add_rule("blank_caption", color=mean_of(paths[0]), tolerance=8)  # forever
    env.setenv("DASHSCOPE_MAX_RETRIES", "1")
    for run in (1, 2):
        before = requests(standin)
        code, report = run_cli(["--user-id", "alice", "--max-attempts", "2"])
        assert code == 0, report
        assert re.search(r"^  Errors:\s+empty_caption 1$", report, re.M), report
        assert ledger(items) == [(ids[0], run, False, "empty_caption")]
        # The row's two answers (1 + DASHSCOPE_MAX_RETRIES), and the others' once.
        assert requests(standin) - before == (4 if run == 1 else 2)
    before = requests(standin)
    code, report = run_cli(["--user-id", "alice", "--max-attempts", "2"])
    assert code == 0 and "No pending items" in report, report
    assert requests(standin) == before, "a row given up is not paid for again"
    assert captions(items, ids)[ids[0]] is None and all(captions(items, ids[1:]).values())
    assert claims(items) == 0


def test_dagster_run_stops_on_a_blank_answering_model_and_charges_the_rows_it_paid_for(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(6)))
    standin.inject("blank_caption", times=FOREVER, endpoint="chat")

    result = materialize_user()

    assert not result.success
    message = step_failure(result)
    assert "the vision model 'qwen3-vl-plus'" in message and "DASHSCOPE_VISION_MODEL" in message
    charged = ledger(items)
    assert charged, "the rows whose answers were paid are charged"
    assert all(row[1:] == (1, False, "empty_caption") for row in charged), charged
    assert captions(items, ids) == dict.fromkeys(ids)
    assert claims(items) == 0
    assert requests(standin) <= 8 + 5 * 4, "the run stopped paying"


# --- a trigger refusing one row -----------------------------------------------------------------


def _refuse_one_row(items: Items, item_id: str) -> None:
    # The trigger's message quotes the API key: what the database says is shown, secrets not.
    items.execute(
        "CREATE FUNCTION {ns}.refuse() RETURNS trigger LANGUAGE plpgsql AS $f$"
        f" BEGIN IF NEW.id = {int(item_id)} THEN"
        f" RAISE EXCEPTION 'row % is frozen (asked with {API_KEY})', NEW.id;"
        " END IF; RETURN NEW; END $f$"
        ";CREATE TRIGGER refuse BEFORE UPDATE ON {items}"
        " FOR EACH ROW EXECUTE FUNCTION {ns}.refuse()"
    )


def test_cli_reports_a_row_a_trigger_refuses_as_that_rows_failure(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(4)))
    _refuse_one_row(items, ids[1])

    code, report = run_cli(["--user-id", "alice", "--batch-size", "4"])

    assert code == 0, report
    assert "written by someone else" not in report
    assert re.search(
        rf"item {ids[1]} \(user 'alice'\): FAILED\n    Reason:  the database refused the write: "
        rf"row {ids[1]} is frozen \(asked with \*\*\*\)",
        report,
    ), report
    assert re.search(r"^  Failed:\s+1$", report, re.M), report
    assert re.search(r"^  Errors:\s+write_failed 1$", report, re.M), report
    assert API_KEY not in report
    (entry,) = items.execute(
        "SELECT item_id, attempts, permanent, error_code, last_error FROM {ns}.enrich_failures"
    )
    assert entry[:4] == (ids[1], 1, True, "write_failed")
    assert f"row {ids[1]} is frozen" in entry[4] and API_KEY not in entry[4]
    written = captions(items, ids)
    assert written[ids[1]] is None and all(written[i] for i in ids if i != ids[1])
    assert claims(items) == 0
    assert requests(standin) == 4


def test_dagster_reports_a_row_a_trigger_refuses_as_that_rows_failure(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    _refuse_one_row(items, ids[0])
    instance = DagsterInstance.ephemeral()

    result = materialize_user(instance=instance)

    assert result.success
    (mat,) = result.asset_materializations_for_node("enriched_items")
    assert (mat.metadata["succeeded"].value, mat.metadata["failed"].value) == (2, 1)
    assert mat.metadata["errors"].value == {"write_failed": 1}
    assert f"row {ids[0]} is frozen (asked with ***)" in mat.metadata["failure_ledger"].value
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    refused = f"row {ids[0]} of user 'alice' failed: write_failed: the database refused the write"
    assert any(line.startswith(refused) for line in logs), logs
    assert not any(API_KEY in line for line in logs)
    assert ledger(items) == [(ids[0], 1, True, "write_failed")]
    written = captions(items, ids)
    assert written[ids[0]] is None and written[ids[1]] and written[ids[2]]
    assert claims(items) == 0


def test_a_trigger_that_silently_skips_one_rows_update_is_that_rows_failure(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    items.execute(
        "CREATE FUNCTION {ns}.skip() RETURNS trigger LANGUAGE plpgsql AS $f$"
        f" BEGIN IF NEW.id = {int(ids[2])} THEN RETURN NULL; END IF; RETURN NEW; END $f$"
        ";CREATE TRIGGER skip BEFORE UPDATE ON {items} FOR EACH ROW EXECUTE FUNCTION {ns}.skip()"
    )

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert "written by someone else" not in report
    assert re.search(
        rf"item {ids[2]} \(user 'alice'\): FAILED\n    Reason:  the database kept the row "
        "unchanged: a trigger or a rule",
        report,
    ), report
    assert ledger(items) == [(ids[2], 1, True, "write_failed")]
    written = captions(items, ids)
    assert written[ids[2]] is None and written[ids[0]] and written[ids[1]]
    assert claims(items) == 0
    # Given up (permanent): the next run neither claims nor pays for it again.
    before = requests(standin)
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0 and "No pending items" in report, report
    assert requests(standin) == before
