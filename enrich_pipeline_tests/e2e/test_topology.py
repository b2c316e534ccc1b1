"""End to end, the production topology: ``enrich-dagster up`` starts the code server
(``dagster api grpc``), the webserver and the daemon as processes of their own, reading a
workspace that points at the code server, with Dagster's storage in PostgreSQL; the sensor
launches a run through the code server, and the code server is killed (``kill -9``) in the
middle of it.

What the user sees: ``up`` says in one line that the code server exited and is restarted,
``status`` shows it healthy again with one restart, the run (whose worker outlives the code
server that started it) succeeds, and the sensor's next run goes through the new code server.
What is left in the database: every row captioned, each paid once (one caption call per row),
no claim held, no failure charged. ``down`` then stops everything, the orphaned run worker's
group included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from psycopg import sql

from enrich_pipeline.defs.heartbeat import liveness_of
from enrich_pipeline_tests.helpers import Items, deployment_env, free_port, hues, paint
from enrich_pipeline_tests.standin import StandIn

# Deadlines, not expectations: three Dagster processes start in tens of seconds on a busy
# 2-core machine.
STARTUP_TIMEOUT = 300.0
RUN_TIMEOUT = 150.0
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
COLORS = ["blue", "red", "green", "yellow", "magenta", "cyan"]


@dataclass
class Up:
    """A running ``enrich-dagster up`` and what the test reads it through."""

    proc: subprocess.Popen[bytes]
    output: Path
    home: Path
    env: dict[str, str]
    items: Items
    instance: DagsterInstance

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def logs(self) -> str:
        parts = [f"===== up =====\n{self.text()}"]
        for path in sorted((self.home / "topology-logs").glob("*.log")):
            parts.append(f"===== {path.name} =====\n{path.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)

    def state(self) -> dict:
        return json.loads((self.home / "topology.json").read_text())

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "enrich_pipeline.cli.dagster", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
            cwd=str(self.home.parent),
        )

    def wait_for_line(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            assert self.proc.poll() is None, f"up exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"no {marker!r} within {timeout:.0f} s"
            time.sleep(0.3)

    def runs_of(self, user: str) -> list:
        return self.instance.get_runs(filters=RunsFilter(tags={"dagster/partition": user}))


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def up(pg_conninfo: str, _standin_server: StandIn, image_dir: Path, tmp_path: Path) -> Iterator[Up]:
    standin = _standin_server
    standin.clear_faults()
    standin.reset_log()
    standin.rpm_limit = None
    # Each call takes seconds: the run is surely in its captions when the code server dies.
    standin.latency = 3.0
    namespace = f"t_{uuid.uuid4().hex[:10]}"
    items = Items(pg_conninfo, namespace)
    dbname = f"dagster_{uuid.uuid4().hex[:10]}"
    env = deployment_env(
        items,
        standin,
        pg_conninfo,
        tmp_path / "dagster_home",
        dbname,
        ENRICH_CODE_SERVER_PORT=str(free_port()),
        # Seconds, doubled for a second exit in a row: long enough for sensor ticks to miss
        # the code server.
        ENRICH_RESTART_BACKOFF="2",
    )
    home = Path(env["DAGSTER_HOME"])
    # Rows before the topology starts: the sensor's first ticks find them.
    for n, color in enumerate(COLORS):
        items.add("quinn", str(image_dir / f"{color}.jpg"), metadata={"sku": f"q-{n}"})
    output = tmp_path / "up.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enrich_pipeline.cli.dagster", "up"]
            + ["--port", str(free_port())],
            env=env,
            cwd=str(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    mp = pytest.MonkeyPatch()
    seen: set[int] = set()
    instance = None
    try:
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL", "ENRICH_MAX_CONCURRENT_RUNS"):
            mp.setenv(name, env[name])
        instance = DagsterInstance.from_config(str(home))
        stack = Up(proc, output, home, env, items, instance)
        started = time.monotonic()
        try:
            stack.wait_for_line("all three healthy", STARTUP_TIMEOUT)
            print(f"up: all three healthy after {time.monotonic() - started:.1f} s")
        except AssertionError:
            print(stack.logs()[-60_000:])
            raise
        seen |= {s["pid"] for s in stack.state()["services"].values()}
        yield stack
    finally:
        standin.latency = 0.0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        _kill_all(seen)
        if instance is not None:
            instance.dispose()
        mp.undo()
        with psycopg.connect(pg_conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


def _started_run(up: Up, user: str, timeout: float) -> tuple[object, int]:
    """The user's run once its worker beats: the run and the worker's pid."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in up.runs_of(user) if r.status == DagsterRunStatus.STARTED]
        live = liveness_of(runs[0].run_id, runs[0].tags) if runs else None
        if live is not None and live.pid is not None:
            return runs[0], live.pid
        finished = [r.status.value for r in up.runs_of(user) if r.status in TERMINAL]
        assert not finished, f"{user}'s run ended before it could be caught: {finished}"
        assert time.monotonic() < deadline, f"no started run for {user}"
        time.sleep(0.2)


def _final_status(up: Up, run_id: str, timeout: float) -> DagsterRunStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = up.instance.get_run_by_id(run_id).status
        if status in TERMINAL:
            return status
        assert time.monotonic() < deadline, f"run {run_id} still {status.value}"
        time.sleep(0.5)


def _wait_captioned(up: Up, user: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in up.items.all().values() if r["user_id"] == user]
        if rows and all(r["metadata"].get("caption") for r in rows):
            return rows
        assert time.monotonic() < deadline, f"{user}'s rows still without a caption"
        time.sleep(0.5)


def _claims_and_failures(up: Up) -> tuple[int, int]:
    (claims,) = up.items.execute(
        "SELECT count(*) FROM {ns}.enrich_claims WHERE expires_at > now()"
    )[0]
    (failures,) = up.items.execute("SELECT count(*) FROM {ns}.enrich_failures")[0]
    return claims, failures


def test_a_killed_code_server_is_restarted_and_its_run_finishes_every_row_paid_once(
    up: Up, _standin_server: StandIn, tmp_path: Path
) -> None:
    standin = _standin_server
    try:
        # The sensor launched the run through the code server: its worker is the server's child.
        run, worker_pid = _started_run(up, "quinn", RUN_TIMEOUT)
        code = up.state()["services"]["code-server"]["pid"]
        worker = psutil.Process(worker_pid)
        assert code in {p.pid for p in worker.parents()}, (code, worker.parents())
        os.kill(code, signal.SIGKILL)
        killed = time.monotonic()
        done_at_kill = standin.count("chat")
        assert done_at_kill < len(COLORS), "the run had finished its captions before the kill"

        # What the user sees: one line, a restart, and the code server healthy again.
        up.wait_for_line("code-server restarted", 60)
        print(f"code server restarted {time.monotonic() - killed:.1f} s after kill -9")
        text = up.text()
        assert f"code-server (pid {code}) exited (killed by SIGKILL)" in text, text
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (status := up.command("status")).returncode != 0:
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(1)
        line = next(x for x in status.stdout.splitlines() if x.startswith("code-server"))
        assert "alive" in line and "healthy" in line and "(1 restart(s))" in line, status.stdout
        assert "restarting it in 2.0 s (exit 1 in a row)" in text, text
        assert up.state()["services"]["code-server"]["pid"] != code
        # The webserver reloads the code location from the new server on its own.
        deadline = time.monotonic() + 60
        while "LOCATION_UPDATED" not in (up.home / "topology-logs" / "webserver.log").read_text():
            assert time.monotonic() < deadline, "the webserver did not reload the code location"
            time.sleep(0.5)

        # The run worker outlived its code server: the run finishes, every row paid once.
        assert _final_status(up, run.run_id, RUN_TIMEOUT) == DagsterRunStatus.SUCCESS
        rows = _wait_captioned(up, "quinn", RUN_TIMEOUT)
        assert len(rows) == len(COLORS)
        assert standin.count("chat") == standin.count("chat", status=200) == len(COLORS)

        # Killed again, idle, while new rows arrive: the sensor's ticks miss the code server
        # for the doubled back-off; the rows wait, and the next run goes through the new one.
        standin.latency = 0.0
        code = up.state()["services"]["code-server"]["pid"]
        os.kill(code, signal.SIGKILL)
        # Images of their own: a caption the cache holds would cost no call.
        for path in paint(tmp_path, hues(2), prefix="rita"):
            up.items.add("rita", str(path))
        up.wait_for_line("restart 2)", 60)
        assert f"code-server (pid {code}) exited (killed by SIGKILL)" in up.text()
        assert "restarting it in 4.0 s (exit 2 in a row)" in up.text(), up.text()
        _wait_captioned(up, "rita", RUN_TIMEOUT)
        (later,) = up.runs_of("rita")
        assert _final_status(up, later.run_id, RUN_TIMEOUT) == DagsterRunStatus.SUCCESS
        assert [r.run_id for r in up.runs_of("quinn")] == [run.run_id]
        assert standin.count("chat") == len(COLORS) + 2
        assert _claims_and_failures(up) == (0, 0)
    except BaseException:
        print(up.logs()[-60_000:])
        raise

    # ``down``: everything ``up`` started stops, in order, and says so.
    pids = {s["pid"] for s in up.state()["services"].values()} | {up.proc.pid, worker_pid}
    sent = time.monotonic()
    stopped = up.command("down")
    print(f"down took {time.monotonic() - sent:.1f} s")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.startswith("stopped: daemon (pid"), stopped.stdout
    assert f"supervisor (pid {up.proc.pid})" in stopped.stdout
    assert up.proc.wait(timeout=30) == 0
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not (up.home / "topology.json").exists()
    lines = up.text().splitlines()
    order = [
        next(n for n, x in enumerate(lines) if x.startswith(marker))
        for marker in (
            "SIGTERM received",
            "daemon stopped",
            "webserver stopped",
            "code-server stopped",
        )
    ]
    assert order == sorted(order), lines
