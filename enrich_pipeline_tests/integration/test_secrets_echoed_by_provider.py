"""A provider that repeats the request's credentials in its errors leaves them nowhere.

The stand-in's ``echo_key`` puts the Authorization header it received (whole, cut short, JSON-
escaped), the key URL-encoded and masked the way providers print keys (``sk-...abcd``,
``sk-****abcdef``, its last 8 characters) and the request URL into the message of every error
it sends: each documented shape (400, 401, 403, 404, 429, 500, 503), a malformed body and the
Batch API's error lines. Whatever the pipeline builds from them (the report, the stderr line,
``enrich_failures.last_error``, log records, exceptions and their causes, Dagster's event log
and the run worker's stderr, ``enrich-search``'s and ``enrich-batch``'s output) is searched for
every 8-character piece of each secret, decoded and unescaped, and for its masked tail.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from dagster import DagsterInstance

from enrich_pipeline.cli import batch as batch_cli
from enrich_pipeline.cli import search as search_cli
from enrich_pipeline.defs.partitions import user_to_key
from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.providers.base import ProviderError
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings
from enrich_pipeline_tests.helpers import (
    Items,
    data_url,
    exception_texts,
    log_texts,
    png,
    run_cli,
    table_texts,
)
from enrich_pipeline_tests.standin import StandIn

_CORES = [uuid.uuid4().hex for _ in range(4)]
# Keys with characters that URL-encoding and JSON escaping change, so those spellings differ.
API_KEY = f"sk-{_CORES[0][:14]}/{_CORES[0][14:]}+{_CORES[1][:6]}="
WRONG_KEY = f"sk-{_CORES[2][:20]}/{_CORES[2][20:]}"
GATEWAY_PASSWORD = f"gw-{_CORES[3]}"
SECRETS = {"api_key": API_KEY, "wrong_key": WRONG_KEY, "gateway_password": GATEWAY_PASSWORD}
PIECE = 8

BLUE, GREEN, MAGENTA, YELLOW, CYAN, RED = (
    (40, 80, 200),
    (50, 160, 70),
    (255, 0, 255),
    (235, 215, 50),
    (0, 255, 255),
    (200, 40, 40),
)


def _readable(text: str) -> str:
    """``text`` with URL-encoding and JSON escapes undone, so every spelling is searched."""
    return unquote(text.replace("\\/", "/").replace('\\"', '"'))


def leaks(texts: Iterable[tuple[str, str]]) -> list[str]:
    """``where: which secret`` for every text holding an 8-character piece of a secret (as
    written, decoded or unescaped) or its last 4 characters after an elision ("...abcd")."""
    found = []
    for where, raw in texts:
        for text in {raw, _readable(raw)}:
            for name, secret in SECRETS.items():
                pieces = [secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)]
                hit = next((p for p in pieces if p in text), None)
                tail = re.search(rf"(\.\.|…|\*\*)\S*{re.escape(secret[-4:])}", text)
                if hit is not None or tail is not None:
                    at = text.find(hit) if hit is not None else tail.start()  # type: ignore[union-attr]
                    found.append(f"{where}: {name} in ...{text[max(0, at - 60) : at + 30]!r}")
                    break
    return found


@pytest.fixture(scope="module")
def _echo_server() -> Iterator[StandIn]:
    with StandIn(api_key=API_KEY, echo_key=True, hang_seconds=2.0) as server:
        yield server


@pytest.fixture
def echo(_echo_server: StandIn) -> Iterator[StandIn]:
    _echo_server.clear_faults()
    _echo_server.reset_log()
    _echo_server.reset_batches()
    yield _echo_server
    _echo_server.clear_faults()


@pytest.fixture
def echo_env(env: pytest.MonkeyPatch, echo: StandIn) -> pytest.MonkeyPatch:
    env.setenv("DASHSCOPE_API_KEY", API_KEY)
    env.setenv("DASHSCOPE_BASE_URL", echo.base_url)
    env.setenv("DASHSCOPE_MAX_RETRIES", "1")
    return env


# ---------------------------------------------------------------------------------------------
# Each error shape, at the provider: the error, its cause, its traceback


SHAPES = {
    # fault: (endpoint, error code the pipeline gives it)
    "bad_image": ("chat", "bad_image"),  # 400, the row's
    "moderation": ("chat", "moderation"),  # 400, the row's
    "bad_request": ("chat", "request_refused"),  # 400, stops the run
    "unauthorized": ("chat", "invalid_api_key"),  # 401
    "model_access_denied": ("chat", "model_access_denied"),  # 403
    "model_not_found": ("chat", "model_not_found"),  # 404
    "429": ("chat", "rate_limited"),
    "500": ("chat", "server_error"),
    "503": ("embeddings", "server_error"),
    "malformed": ("chat", "malformed_response"),
}


@pytest.mark.parametrize("fault", sorted(SHAPES))
def test_every_error_shape_is_masked_in_the_error_its_cause_and_its_traceback(
    echo: StandIn, fault: str
) -> None:
    endpoint, code = SHAPES[fault]
    settings = DashScopeSettings(
        api_key=API_KEY, base_url=echo.base_url, max_retries=0, backoff_initial=0.01, timeout=5
    )
    provider = DashScopeProvider(settings)
    echo.inject(fault, endpoint=endpoint)
    with pytest.raises(ProviderError) as info:
        if endpoint == "chat":
            provider.caption(VisionImage(data_url(png(BLUE, (64, 64))), 64, 64, 16))
        else:
            provider.embed(["a blue chair"])
    provider.close()
    error = info.value
    assert error.code == code, (error.code, str(error))
    texts = exception_texts(fault, error)
    texts.append((f"{fault} format", "".join(traceback.format_exception(error))))
    assert not leaks(texts), "\n".join(leaks(texts))
    if fault != "malformed":  # what the provider said is still quoted, the key masked
        assert "Bearer ***" in str(error) or "***" in str(error), str(error)


# ---------------------------------------------------------------------------------------------
# The command line: the report, the stderr line, the failure ledger, the logs


def test_enrich_captions_report_stderr_and_ledger_show_no_echoed_key(
    echo_env: pytest.MonkeyPatch,
    items: Items,
    echo: StandIn,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo_env.setenv("DASHSCOPE_MAX_RETRIES", "3")
    # Answered rows first, so that the provider is seen answering and the 500 is the row's.
    answered = [items.add("u1", data_url(png((20 + 30 * n,) * 3))) for n in range(6)]
    failing = {
        "moderation": items.add("u1", data_url(png(MAGENTA))),  # 400, the row's
        "bad_image": items.add("u1", data_url(png(GREEN))),  # 400, the row's
        "500": items.add("u1", data_url(png(YELLOW))),  # the row's: the others are answered
    }
    for fault, color in (("moderation", MAGENTA), ("bad_image", GREEN), ("500", YELLOW)):
        echo.add_rule(fault, color=color, tolerance=12)
    # Retried and then answered: a throttled call, a 503 and a malformed answer.
    for fault in ("429", "503", "malformed"):
        echo.inject(fault, endpoint="chat")
    texts: list[tuple[str, str]] = []

    code, report = run_cli(["--user-id", "u1", "--concurrent", "1"])
    texts.append(("report", report))
    assert code == 0, report
    assert "Succeeded:        6" in report and "Failed:           3" in report, report
    # The user still reads what the provider said, with the key masked.
    assert "Input data may contain inappropriate content." in report, report
    assert "Authorization: Bearer ***" in report, report
    ledger = dict(items.execute("SELECT item_id, last_error FROM {ns}.enrich_failures"))
    assert set(ledger) == {str(i) for i in failing.values()}, ledger
    assert all("Bearer ***" in message for message in ledger.values()), ledger
    assert all(items.row(i)["metadata"].get("caption") for i in answered)

    # The stops, one run each on a new row: 401 (a wrong key, echoed), 403, 404, a 400 about
    # the request itself; each is the stderr line and exit 3, the row untouched.
    waiting = items.add("u2", data_url(png(RED)))
    for fault in ("unauthorized", "model_access_denied", "model_not_found", "bad_request"):
        echo_env.setenv("DASHSCOPE_API_KEY", WRONG_KEY if fault == "unauthorized" else API_KEY)
        if fault != "unauthorized":
            echo.inject(fault, endpoint="chat")
        code, report = run_cli(["--user-id", "u2"])
        err = capfd.readouterr().err
        texts += [(f"report {fault}", report), (f"stderr {fault}", err)]
        assert code == 3, (fault, report, err)
        assert "error: run stopped:" in err and "***" in err, err
    assert str(waiting) not in {
        k for k, _ in items.execute("SELECT item_id, 1 FROM {ns}.enrich_failures")
    }

    # The base URL's own credentials: sent as Basic, refused and echoed (401, exit 3).
    host = echo.base_url.removeprefix("http://")
    echo_env.setenv("DASHSCOPE_BASE_URL", f"http://gw:{GATEWAY_PASSWORD}@{host}")
    code, report = run_cli(["--user-id", "u2"])
    err = capfd.readouterr().err
    texts += [("report gateway", report), ("stderr gateway", err)]
    assert code == 3, (report, err)
    assert "Basic ***" in err, err

    texts += log_texts(caplog) + table_texts(items.conninfo, items.namespace)
    assert not leaks(texts), "\n".join(leaks(texts))
    assert echo.count("chat", 429) == 1 and echo.count("chat", 503) == 1, echo.requests
    assert echo.count("chat", 401) >= 2, echo.requests


# ---------------------------------------------------------------------------------------------
# enrich-search and enrich-batch


def test_enrich_search_stderr_shows_no_echoed_key(
    echo_env: pytest.MonkeyPatch,
    items: Items,
    echo: StandIn,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[tuple[str, str]] = []
    for fault in ("unauthorized", "503", "bad_request"):
        echo_env.setenv("DASHSCOPE_API_KEY", WRONG_KEY if fault == "unauthorized" else API_KEY)
        if fault != "unauthorized":
            echo.add_rule(fault, text_contains="chair")
        code = search_cli.main(["--user-id", "u1", "a blue chair"])
        echo.clear_faults()
        captured = capfd.readouterr()
        texts += [(f"stdout {fault}", captured.out), (f"stderr {fault}", captured.err)]
        assert code == 2, (fault, captured.err)
        assert captured.err.startswith("error: ") and "***" in captured.err, captured.err
    texts += log_texts(caplog)
    assert not leaks(texts), "\n".join(leaks(texts))


def test_enrich_batch_error_lines_and_refusals_show_no_echoed_key(
    echo_env: pytest.MonkeyPatch,
    items: Items,
    echo: StandIn,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = items.add("u1", data_url(png(BLUE)))
    refused = items.add("u1", data_url(png(MAGENTA)))
    echo.add_rule("moderation", color=MAGENTA, tolerance=12)  # an error line of the batch
    texts: list[tuple[str, str]] = []
    out = io.StringIO()
    assert batch_cli.main(["submit", "--user-id", "u1"], out=out) == 0, capfd.readouterr()
    texts.append(("submit", out.getvalue()))
    deadline = time.monotonic() + 30
    while True:
        out = io.StringIO()
        assert batch_cli.main(["collect"], out=out) == 0
        texts.append(("collect", out.getvalue()))
        if "succeeded" in out.getvalue():
            break
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.05)
    assert items.row(ok)["metadata"].get("caption")
    (message,) = [
        m
        for i, m in items.execute("SELECT item_id, last_error FROM {ns}.enrich_failures")
        if i == str(refused)
    ]
    assert "inappropriate content" in message and "Bearer ***" in message, message

    # A refused submit (401 with a wrong key): the stderr line.
    items.add("u1", data_url(png(GREEN)))
    echo_env.setenv("DASHSCOPE_API_KEY", WRONG_KEY)
    assert batch_cli.main(["submit", "--user-id", "u1"], out=io.StringIO()) != 0
    captured = capfd.readouterr()
    texts += [("stdout", captured.out), ("stderr", captured.err)]
    assert "***" in captured.err, captured.err
    texts += log_texts(caplog) + table_texts(items.conninfo, items.namespace)
    assert not leaks(texts), "\n".join(leaks(texts))


# ---------------------------------------------------------------------------------------------
# Dagster: the process that runs the job (its stderr) and the event log in Dagster's storage

REPO = Path(__file__).resolve().parents[2]
# A Dagster process start takes seconds, minutes on a loaded two-core machine.
DAGSTER_DEADLINE = 600


def _event_log_rows(home: Path) -> list[tuple[str, str]]:
    """Every row of every ``event_logs`` table in the instance's SQLite storage, as stored."""
    rows = []
    for db in sorted(home.rglob("*.db")):
        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "event_logs" in tables:
                rows += [
                    (f"event_logs {db.name}", r[0])
                    for r in conn.execute("SELECT event FROM event_logs")
                ]
    return rows


def test_dagster_run_stderr_and_event_log_show_no_echoed_key(
    echo_env: pytest.MonkeyPatch, items: Items, echo: StandIn, tmp_path: Path
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\npython_logs:\n  python_log_level: INFO\n"
    )
    key = user_to_key("u1")
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("users", [key])
    answered = [items.add("u1", data_url(png((20 + 30 * n,) * 3))) for n in range(4)]
    refused = items.add("u1", data_url(png(MAGENTA)))
    echo.add_rule("moderation", color=MAGENTA, tolerance=12)
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m"]
    command += ["enrich_pipeline.defs.definitions", "--select", "enriched_items"]
    done = subprocess.run(
        [*command, "--partition", key],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DAGSTER_DEADLINE,
    )
    texts = [("run stdout", done.stdout), ("run stderr", done.stderr)]
    assert done.returncode == 0, done.stderr[-3000:]
    # What the run logged about the refused row, as the user reads it on the console.
    assert f"row {refused} of user 'u1' failed: moderation" in done.stderr, done.stderr[-3000:]
    assert "Bearer ***" in done.stderr, done.stderr[-3000:]
    assert all(items.row(i)["metadata"].get("caption") for i in answered)

    # A stop (401, a wrong key echoed): the step's failure, its error and its cause.
    items.add("u1", data_url(png(RED)))
    stopped = subprocess.run(
        [*command, "--partition", key],
        env={**env, "DASHSCOPE_API_KEY": WRONG_KEY},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DAGSTER_DEADLINE,
    )
    texts += [("stopped stdout", stopped.stdout), ("stopped stderr", stopped.stderr)]
    assert stopped.returncode != 0
    assert "DASHSCOPE_API_KEY" in stopped.stderr, stopped.stderr[-3000:]

    events = _event_log_rows(home)
    assert any("row " in e and "moderation" in e for _, e in events), "no row failure logged"
    assert any("STEP_FAILURE" in e for _, e in events), "no step failure stored"
    texts += events + table_texts(items.conninfo, items.namespace)
    assert not leaks(texts), "\n".join(leaks(texts))
