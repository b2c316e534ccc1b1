"""The supervisor of ``enrich-dagster up`` with stand-in processes in place of Dagster's (what it
does to a process does not depend on which program it is): an exit is one line and a restart
after a back-off that doubles; the state file follows; a stop goes daemon, webserver, code
server, and takes with it what a killed code server left running (its run workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from enrich_pipeline.cli import process_groups, topology
from enrich_pipeline.cli.topology import CODE, DAEMON, WEB, Service, Topology
from enrich_pipeline.settings.topology import TopologySettings

SLEEP = "import time; time.sleep(120)"
# A code server whose run worker is its child in its process group, as multiprocessing's spawn
# makes it: the child's pid is printed first.
WITH_WORKER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _topology(tmp_path: Path, code_script: str = SLEEP) -> Topology:
    env = {
        "DAGSTER_HOME": str(tmp_path),
        "ENRICH_CODE_SERVER_HOST": "127.0.0.1",
        "ENRICH_CODE_SERVER_PORT": "4266",
    }
    settings = TopologySettings(restart_backoff=0.2, restart_backoff_max=30)
    scripts = {CODE: code_script, WEB: SLEEP, DAEMON: SLEEP}
    services = [
        Service(name, [sys.executable, "-c", scripts[name]], tmp_path / f"{name}.log", lambda: True)
        for name in topology.START_ORDER
    ]
    return Topology(env, settings, services, "http://127.0.0.1:3000")


def _start(top: Topology) -> None:
    for s in top.services.values():
        s.start(top.env, str(top.home))
    top.write_state()


def _until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def top(tmp_path: Path) -> Iterator[Topology]:
    t = _topology(tmp_path)
    yield t
    t.stop()


def test_an_exit_is_one_line_and_a_restart_after_a_doubling_back_off(
    top: Topology, capsys: pytest.CaptureFixture[str]
) -> None:
    _start(top)
    web = top.services[WEB]
    waits = []
    for n in (1, 2):
        old = web.pid
        os.kill(old, signal.SIGKILL)
        _until(lambda: web.proc.poll() is not None)  # noqa: B023
        killed = time.monotonic()
        top.supervise_once(killed)
        assert web.restart_at is not None
        waits.append(round(web.restart_at - killed, 3))
        assert not web.alive()
        top.supervise_once(web.restart_at)
        assert web.alive() and web.pid != old and web.restarts == n
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"webserver (pid {old}) exited (killed by SIGKILL) after "), out
        assert out[0].endswith(f"(exit {n} in a row)"), out
        assert out[1] == f"webserver restarted (pid {web.pid}, restart {n})"
        state = json.loads((top.home / topology.STATE_FILE).read_text())
        assert state["services"][WEB]["pid"] == web.pid
        assert state["services"][WEB]["restarts"] == n
    assert waits == [0.2, 0.4]
    # The others were left alone.
    assert top.services[CODE].restarts == top.services[DAEMON].restarts == 0


def test_a_stop_goes_daemon_webserver_code_server_with_a_killed_servers_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    top = _topology(tmp_path, WITH_WORKER)
    try:
        _start(top)
        code = top.services[CODE]
        log = code.log
        _until(lambda: log.exists() and log.read_text().strip() != "")
        worker = psutil.Process(int(log.read_text().split()[0]))
        os.kill(code.pid, signal.SIGKILL)
        _until(lambda: code.proc.poll() is not None)
        top.supervise_once(time.monotonic())
        assert code.old_groups == [code.proc.pid] and worker.is_running()
        top.supervise_once(code.restart_at)
        assert code.alive()
        capsys.readouterr()
        pids = [s.pid for s in top.services.values()]
    finally:
        top.stop()
    lines = capsys.readouterr().out.splitlines()
    assert [x.split(" stopped")[0] for x in lines] == [DAEMON, WEB, CODE], lines
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not (top.home / topology.STATE_FILE).exists()


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SLEEP], process_group=0)


def test_down_after_up_was_killed_stops_what_it_left_and_up_refuses_a_second_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kill -9`` of ``up`` leaves its state file (the parent-death signal has stopped its
    processes; here they are left running, the worst case): ``down`` stops them from it. While
    an ``up`` lives, a second one on the same DAGSTER_HOME is refused."""
    env = {"DAGSTER_HOME": str(tmp_path)}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    procs = {name: _sleeper() for name in topology.START_ORDER}
    state = {
        "supervisor": {"pid": gone.pid, "started": 1},
        "services": {
            name: {"pid": p.pid, "started": process_groups.start_ticks(p.pid), "old_groups": []}
            for name, p in procs.items()
        },
    }
    (tmp_path / topology.STATE_FILE).write_text(json.dumps(state))
    try:
        assert topology.already_running(env) is None
        assert topology.down(env) == 0
        out = capsys.readouterr().out
        assert out.strip() == "stopped: " + ", ".join(
            f"{name} (pid {procs[name].pid})" for name in topology.STOP_ORDER
        )
        assert all(p.wait(timeout=10) == -signal.SIGTERM for p in procs.values())
        assert not (tmp_path / topology.STATE_FILE).exists()

        # A live supervisor (this process stands in for it): a second ``up`` is refused.
        state["supervisor"] = {
            "pid": os.getpid(),
            "started": process_groups.start_ticks(os.getpid()),
        }
        (tmp_path / topology.STATE_FILE).write_text(json.dumps(state))
        reason = topology.already_running(env)
        assert reason == f"enrich-dagster up already runs (pid {os.getpid()}) on {tmp_path}"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
