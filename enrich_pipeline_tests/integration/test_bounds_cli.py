"""Bounds, with the real commands against the test database and the stand-in: a
flag or variable out of bounds stops the command at once with one line naming it, before a
row is claimed or a call is paid; a database that is down is one line, never a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enrich_pipeline.cli import batch as batch_cli
from enrich_pipeline.cli import dagster as enrich_dagster
from enrich_pipeline.cli import search as search_cli
from enrich_pipeline_tests.helpers import Items, data_url, png, run_cli
from enrich_pipeline_tests.standin import StandIn


def one_error_line(err: str, starts: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(starts), err
    assert "Traceback" not in err, err
    return lines[0]


def pipeline_tables(items: Items) -> set[str]:
    rows = items.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        (items.namespace,),
    )
    return {r[0] for r in rows}


def nothing_happened(items: Items, standin: StandIn, ids: list[str]) -> None:
    """No call was made, no row changed, nothing claimed or recorded."""
    assert list(standin.requests) == []
    for item_id in ids:
        assert "caption" not in items.row(item_id)["metadata"]
    tables = pipeline_tables(items)
    for table in ("enrich_claims", "enrich_failures", "enrich_batches"):
        if table in tables:
            assert items.execute(f"SELECT count(*) FROM {{ns}}.{table}") == [(0,)], table


@pytest.fixture
def rows(items: Items) -> list[str]:
    return [items.add("alice", data_url(png(c))) for c in ((40, 80, 200), (200, 40, 40))]


@pytest.mark.parametrize("value", ["0", "-5", str(10**20)])
def test_lease_seconds_out_of_bounds_stops_before_a_row_is_claimed(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    rows: list[str],
    capfd: pytest.CaptureFixture[str],
    value: str,
) -> None:
    code, report = run_cli(["--user-id", "alice", "--lease-seconds", value])
    assert code == 2, report
    one_error_line(capfd.readouterr().err, "error: --lease-seconds: ")
    env.setenv("ENRICH_LEASE_SECONDS", value)
    code, report = run_cli(["--user-id", "alice"])
    assert code == 2, report
    one_error_line(capfd.readouterr().err, "error: ENRICH_LEASE_SECONDS: ")
    nothing_happened(items, standin, rows)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-items", "-1"],
        ["--max-items", str(10**20)],
        ["--max-lines", "0"],
        ["--max-bytes", str(10**20)],
        ["--concurrent", "0"],
        ["--max-attempts", "0"],
    ],
)
def test_enrich_batch_flags_out_of_bounds_stop_before_anything(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    rows: list[str],
    capfd: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    standin.reset_batches()
    out = io.StringIO()
    assert batch_cli.main(["submit", "--user-id", "alice", *argv], out=out) == 2
    one_error_line(capfd.readouterr().err, f"error: {argv[0]}: ")
    assert out.getvalue() == ""
    nothing_happened(items, standin, rows)


def test_enrich_search_top_k_out_of_bounds(
    env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for value in ("-1", "0", str(10**20)):
        assert search_cli.main(["--user-id", "alice", "chair", "--top-k", value]) == 2
        one_error_line(capfd.readouterr().err, "error: --top-k: ")


@pytest.fixture
def database_down(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("ADBPG_URL")
    env.setenv("ADBPG_HOST", str(tmp_path / "no-server-here"))
    env.setenv("ADBPG_USER", "enrich")
    env.setenv("ADBPG_CONNECT_TIMEOUT", "1")


def test_enrich_search_with_the_database_down_is_one_line(
    database_down: None, capfd: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert search_cli.main(["--user-id", "alice", "chair", "--offline"]) == 2
    line = one_error_line(capfd.readouterr().err, "error: cannot reach the database enrich@")
    assert "no-server-here" in line and "last error" in line  # says which and why
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["poll"],
        ["collect"],
        ["cancel", "--batch", "batch-x"],
        ["submit", "--user-id", "alice"],
    ],
)
def test_enrich_batch_with_the_database_down_is_one_line(
    database_down: None, capfd: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert batch_cli.main(argv, out=io.StringIO()) == 2
    line = one_error_line(capfd.readouterr().err, "error: cannot connect to enrich@")
    assert "no-server-here" in line


def test_adbpg_port_abc_is_one_line_naming_it_at_once(
    env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    env.delenv("ADBPG_URL")
    env.setenv("ADBPG_HOST", "127.0.0.1")
    env.setenv("ADBPG_PORT", "abc")
    commands = {
        "enrich-captions": lambda: run_cli(["--user-id", "alice"])[0],
        "enrich-search": lambda: search_cli.main(["--user-id", "alice", "chair"]),
        "enrich-batch": lambda: batch_cli.main(["status"], out=io.StringIO()),
        "enrich-dagster": lambda: enrich_dagster.main(["backfill", "--users", "alice"]),
    }
    for name, command in commands.items():
        started = time.monotonic()
        assert command() == 2, name
        one_error_line(capfd.readouterr().err, "error: ADBPG_PORT: ")
        # Not a 10 s connection attempt (half of it: room for a busy machine).
        assert time.monotonic() - started < 5, name


def test_enrich_dagster_flags_out_of_bounds_stop_before_the_instance(
    env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    for argv, flag in (
        (["--port", "99999"], "--port"),
        (["ui", "--port", "0"], "--port"),
        (["--host", ""], "--host"),
        (["backfill", "--users", ""], "--users"),
        (["backfill", "--users", " , "], "--users"),
    ):
        assert enrich_dagster.main(argv) == 2, argv
        one_error_line(capfd.readouterr().err, f"error: {flag}: ")
    assert not (tmp_path / "dagster_home").exists()  # nothing was set up


def test_junk_price_table_stops_the_run_before_any_call(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    rows: list[str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Read before the run: read after it, every row would be paid for, then exit 2 without a
    report."""
    for junk in ("{", '{"qwen3-vl-plus": [-1, 2]}'):
        env.setenv("ENRICH_PRICES", junk)
        code, report = run_cli(["--user-id", "alice"])
        assert code == 2, report
        one_error_line(capfd.readouterr().err, "error: ENRICH_PRICES: ")
    nothing_happened(items, standin, rows)


def test_code_location_loads_with_junk_intervals_and_names_each() -> None:
    script = (
        "from enrich_pipeline.defs.definitions import defs\n"
        "for s in sorted(defs.sensors, key=lambda s: s.name):\n"
        "    print(s.name, s.minimum_interval_seconds)\n"
    )
    for sensor_interval, poll_interval in (("1.5", "-1"), ("-30", "0"), ("abc", str(10**20))):
        env = {
            **os.environ,
            "ENRICH_SENSOR_INTERVAL": sensor_interval,
            "ENRICH_BATCH_POLL_INTERVAL": poll_interval,
        }
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "batch_poll_sensor 60" in done.stdout and "pending_rows_sensor 30" in done.stdout
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, done.stderr  # one line, naming both
        assert "ENRICH_SENSOR_INTERVAL: " in errors[0], errors
        assert "ENRICH_BATCH_POLL_INTERVAL: " in errors[0], errors


def test_database_down_in_a_terminal_prints_one_line_not_the_pools_warnings(
    tmp_path: Path,
) -> None:
    """Without logging set up, Python would print each of the pool's connection attempts
    (libpq's message, two lines each) to stderr before the command's error line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADBPG_", "DASHSCOPE_"))}
    env.update(
        ADBPG_HOST=str(tmp_path / "no-server-here"),
        ADBPG_USER="enrich",
        ADBPG_CONNECT_TIMEOUT="1",
        DASHSCOPE_API_KEY="sk-unused",
    )
    for module, argv in (
        ("enrich_pipeline.cli.search", ["--user-id", "alice", "chair"]),
        ("enrich_pipeline.cli.batch", ["status"]),
        ("enrich_pipeline.cli.captions", ["--user-id", "alice"]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, (module, done.stderr)
        line = one_error_line(done.stderr, "error: ")
        assert "no-server-here" in line and "enrich@" in line, (module, line)
