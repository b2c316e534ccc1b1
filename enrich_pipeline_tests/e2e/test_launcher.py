"""``enrich-dagster`` started in the background on the embedded default, as a user would start
it from a shell script, reached through its database commands and stopped with ``kill``.

A background job of a non-interactive shell starts with SIGINT ignored: unless the launcher
restores the default dispositions, ``kill PID`` does nothing and a forced stop leaves the
webserver and daemon running against a database that is gone. Each case starts its own
launcher (its own embedded PostgreSQL, Dagster storage in it, offline provider) from a
directory that is not the checkout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import psycopg
import pytest

from enrich_pipeline.cli.dagster import STOP_GRACE
from enrich_pipeline_tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
# Deadlines with room for a busy machine (load 17 on two cores: a Dagster start takes minutes):
# what is checked is that everything stops, in order, not how fast.
STARTUP_TIMEOUT = 300.0
# What a person waits after `kill PID` before the command and everything it started are gone
# (the database too): the grace the launcher gives `dagster dev`, then room for the rest.
STOP_WITHIN = STOP_GRACE + 60.0


def _env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_", "DAGSTER_"))
    }
    env.update(ENRICH_HOME=str(home), PYTHONUNBUFFERED="1", ENRICH_SENSOR_INTERVAL="5")
    return env


def _launcher(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enrich_pipeline.cli.dagster", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=env["ENRICH_HOME"],
    )


def _postmaster(home: Path) -> int | None:
    pidfile = home / "pgdata" / "postmaster.pid"
    try:
        return int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["kill", "kill -INT"])
def test_background_start_stops_webserver_daemon_and_database_within_seconds(
    sig: signal.Signals,
) -> None:
    # Not under pytest's 0700 temp folder: as root, pgserver runs PostgreSQL as its own user.
    home = Path(tempfile.mkdtemp(prefix="enrich-launcher-"))
    home.chmod(0o755)
    elsewhere = Path(tempfile.mkdtemp(prefix="enrich-cwd-"))
    env = _env(home)
    port = free_port()
    log = home / "launcher.log"
    # As a shell script would: `enrich-dagster ... &` (job control off: SIGINT ignored).
    script = f"{sys.executable} -m enrich_pipeline.cli.dagster --port {port} > {log} 2>&1 & echo $!"
    started = subprocess.run(
        ["bash", "-c", script], env=env, cwd=elsewhere, capture_output=True, text=True
    )
    pid = int(started.stdout.strip())
    proc = psutil.Process(pid)
    try:
        ignored = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("SigIgn:")
            ),
            16,
        )
        assert ignored & (1 << (signal.SIGINT - 1)), "the background job should ignore SIGINT"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.is_running(), log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

        # No warning that ``dagster dev`` is superseded at every start.
        assert "SupersessionWarning" not in log.read_text()

        # The embedded database, as the README says to reach it.
        url = _launcher(env, "db-url")
        assert url.returncode == 0, url.stderr
        with psycopg.connect(url.stdout.strip()) as conn:
            (n,) = conn.execute("SELECT count(*) FROM cleantab.items").fetchone()
            assert n > 0
        query = _launcher(env, "psql", "-Atc", "SELECT count(DISTINCT user_id) FROM cleantab.items")
        assert query.returncode == 0, query.stderr
        assert int(query.stdout.strip()) >= 3

        family = [proc, *proc.children(recursive=True)]
        names = " ".join(" ".join(p.cmdline()) for p in family if p.is_running())
        assert "dagster_webserver" in names and "dagster._daemon" in names, names
        postmaster = _postmaster(home)
        assert postmaster is not None and psutil.pid_exists(postmaster)

        sent = time.monotonic()
        os.kill(pid, sig)
        deadline = sent + STOP_WITHIN
        gone, alive = psutil.wait_procs(family, timeout=STOP_WITHIN)
        # The pids and the log, not the command lines: one may be exiting (a zombie) by now.
        assert not alive, ([p.pid for p in alive], log.read_text()[-3000:])
        while psutil.pid_exists(postmaster) and time.monotonic() < deadline:
            time.sleep(0.2)
        took = time.monotonic() - sent
        assert not psutil.pid_exists(postmaster), log.read_text()[-3000:]  # still running
        print(f"stopped within {took:.1f} s of {sig.name}")
        output = log.read_text()
        # In order: the services (webserver, then daemon, by dagster dev), then the database.
        lines = output.splitlines()
        order = [
            next(n for n, line in enumerate(lines) if marker in line)
            for marker in (
                f"{sig.name} received",
                "Shutting down Dagster services",
                "webserver and daemon stopped",
                "embedded PostgreSQL stopped",
            )
        ]
        assert order == sorted(order), output[-3000:]
        # Nothing retried a database that was gone.
        tail = output[output.index("webserver and daemon stopped") :]
        assert not re.search(r"(?i)connection refused|could not connect", tail), tail
    finally:
        for p in [proc, *([] if not proc.is_running() else proc.children(recursive=True))]:
            try:
                p.kill()
            except psutil.Error:
                pass
        master = _postmaster(home)
        if master and psutil.pid_exists(master):
            os.kill(master, signal.SIGKILL)
