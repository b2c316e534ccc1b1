"""``enrich-dagster up``, ``down`` and ``status``: the production topology, on one machine.

Where ``enrich-dagster ui`` runs ``dagster dev`` (which loads the code in processes of its own
making), ``up`` starts what a deployment runs, each as a process of its own:

- the code server, ``dagster api grpc`` on ``ENRICH_CODE_SERVER_HOST:ENRICH_CODE_SERVER_PORT``
  (127.0.0.1:4266): the same command the Helm chart's user code deployment runs, so the run
  workers it launches are its children, as in a pod. ``dagster code-server start`` would add a
  proxy process that restarts its own gRPC server, a second supervisor under this one;
- the webserver (``dagster-webserver -w``) and the daemon (``dagster-daemon run -w``), which
  load no code but reach it through a workspace of one ``grpc_server`` (``deploy/workspace.yaml``),
  with run and event storage in PostgreSQL (``DAGSTER_PG_URL``; the embedded database's
  ``dagster`` database when nothing is configured, as ``ui`` does).

Each runs in a process group of its own, logs to ``$DAGSTER_HOME/topology-logs/<name>.log``
(not ``$DAGSTER_HOME/logs``: Dagster's telemetry moves that folder's files away, to upload
them) and gets a parent-death signal, so that even ``kill -9`` of ``up`` stops it. ``up`` waits
until the three are healthy (the code server answers gRPC's health check, the webserver
``/server_info``, the daemon's threads beat, as the webserver reports them), records the pids
and ports in ``$DAGSTER_HOME/topology.json`` and supervises in the foreground: a process that
exits is started again after a back-off (``ENRICH_RESTART_BACKOFF``, doubled for each exit in a
row up to ``ENRICH_RESTART_BACKOFF_MAX``, as Kubernetes restarts a pod), with one line saying
so. SIGTERM, SIGINT or SIGHUP stop the daemon, the webserver and the code server, in that order
(the code server's run workers with it, as ``ui`` stops them: Dagster takes SIGTERM as an
interrupt, the run is marked failed, and the next run of its user takes its rows), then the
embedded database. ``down`` does that to a running ``up`` from ``topology.json``.

A run worker outlives a code server that is killed (found by experiment, and tested: the worker
is a ``spawn`` child that writes its events to the run storage itself and beats its own
heartbeat), so a run in flight finishes; the webserver and the daemon reload the location from
the new server on their own, and sensor ticks while it is away fail and resume. The process
group of a dead code server is remembered and stopped with the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from enrich_pipeline.cli.dagster import CHILD_PRELUDE, STOP_GRACE, stop_embedded
from enrich_pipeline.cli.process_groups import group_alive, same_process, start_ticks, stop_groups
from enrich_pipeline.cli.stopping import StopRequested, supervisor_signals
from enrich_pipeline.cli.topology_health import (
    code_server_healthy,
    daemon_healthy,
    port_in_use,
    webserver_healthy,
)
from enrich_pipeline.db import embedded
from enrich_pipeline.settings import ConfigError
from enrich_pipeline.settings.topology import TopologySettings

CODE, WEB, DAEMON = "code-server", "webserver", "daemon"
START_ORDER = (CODE, WEB, DAEMON)
STOP_ORDER = (DAEMON, WEB, CODE)
LOCATION = "enrich_pipeline"
CHECKOUT_WORKSPACE = Path(__file__).resolve().parents[2] / "deploy" / "workspace.yaml"
# deploy/workspace.yaml, for an installed package without the checkout (JSON is YAML).
WORKSPACE = {
    "load_from": [
        {
            "grpc_server": {
                "host": {"env": "ENRICH_CODE_SERVER_HOST"},
                "port": {"env": "ENRICH_CODE_SERVER_PORT"},
                "location_name": LOCATION,
            }
        }
    ]
}
STATE_FILE = "topology.json"
LOG_DIR = "topology-logs"
POLL = 0.5


def command_lines(env: Mapping[str, str], workspace: Path, host: str, port: int) -> dict:
    """The three commands, by service name (``python -m``: the entry points need not be on
    PATH, and the run workers start with this interpreter)."""
    py = sys.executable
    return {
        CODE: [
            py,
            "-m",
            "dagster",
            "api",
            "grpc",
            "-m",
            "enrich_pipeline.defs.definitions",
            "--location-name",
            LOCATION,
            "-h",
            env["ENRICH_CODE_SERVER_HOST"],
            "-p",
            env["ENRICH_CODE_SERVER_PORT"],
            "--use-python-environment-entry-point",
        ],  # fmt: skip
        WEB: [py, "-m", "dagster_webserver", "-w", str(workspace), "-h", host, "-p", str(port)],
        DAEMON: [py, "-m", "dagster._daemon", "run", "-w", str(workspace)],
    }


def workspace_file(dagster_home: Path) -> Path:
    """deploy/workspace.yaml of the checkout, else the same workspace written to DAGSTER_HOME."""
    if CHECKOUT_WORKSPACE.exists():
        return CHECKOUT_WORKSPACE
    path = dagster_home / "workspace.yaml"
    path.write_text(json.dumps(WORKSPACE, indent=2) + "\n")
    return path


def dagster_home_of(env: Mapping[str, str]) -> Path:
    """DAGSTER_HOME as ``prepare_environment`` fills it in, without starting anything."""
    if env.get("DAGSTER_HOME"):
        return Path(env["DAGSTER_HOME"])
    enrich_home = Path(env["ENRICH_HOME"]).resolve() if env.get("ENRICH_HOME") else embedded.home()
    return enrich_home / "dagster_home"


def already_running(env: Mapping[str, str]) -> str | None:
    """Why ``up`` must not start (another ``up`` supervises this DAGSTER_HOME), if it must not."""
    home = dagster_home_of(env)
    state = read_state(home)
    if state is not None and same_process(state.get("supervisor")):
        return f"enrich-dagster up already runs (pid {state['supervisor']['pid']}) on {home}"
    return None


def ready_to_start(env: dict[str, str], host: str, port: int) -> dict[str, str]:
    """The environment ``up`` starts with, or a ``ConfigError`` saying why it must not start:
    another ``up`` on this DAGSTER_HOME, or a port taken (a server already listening there
    would answer the health checks in place of ours)."""
    if reason := already_running(env):
        raise ConfigError(reason)
    env = topology_env(env)
    code_host, code_port = env["ENRICH_CODE_SERVER_HOST"], int(env["ENRICH_CODE_SERVER_PORT"])
    if port_in_use(code_host, code_port):
        raise ConfigError(
            f"ENRICH_CODE_SERVER_PORT: {code_host}:{code_port} is in use (another code server?): "
            "stop it or choose another port"
        )
    if port_in_use(host, port):
        raise ConfigError(
            f"--port: {host}:{port} is in use: stop what listens there or choose another port"
        )
    return env


def topology_env(env: dict[str, str]) -> dict[str, str]:
    """The code server's address in the environment the workspace file reads it from."""
    settings = TopologySettings.from_env(env)
    env["ENRICH_CODE_SERVER_HOST"] = settings.code_server_host
    env["ENRICH_CODE_SERVER_PORT"] = str(settings.code_server_port)
    return env


# --- the processes -----------------------------------------------------------------------


@dataclass
class Service:
    """One process of the topology, started again whenever it exits."""

    name: str
    argv: list[str]
    log: Path
    healthy: Callable[[], bool]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    exits_in_a_row: int = 0
    restart_at: float | None = None
    restarts: int = 0
    # Process groups of earlier incarnations whose members may still run (a killed code
    # server's run workers): stopped with the rest.
    old_groups: list[int] = field(default_factory=list)

    def start(self, env: Mapping[str, str], cwd: str) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", CHILD_PRELUDE, str(os.getpid()), *self.argv[1:]]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        self.started = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Topology:
    """The three services, their state file, and the supervision loop."""

    def __init__(
        self,
        env: dict[str, str],
        settings: TopologySettings,
        services: list[Service],
        url: str,
    ) -> None:
        self.env = env
        self.settings = settings
        self.home = Path(env["DAGSTER_HOME"])
        self.url = url
        self.code_addr = (env["ENRICH_CODE_SERVER_HOST"], int(env["ENRICH_CODE_SERVER_PORT"]))
        self.services = {s.name: s for s in services}

    @classmethod
    def of(cls, env: dict[str, str], host: str, port: int, settings: TopologySettings) -> Topology:
        """The Dagster processes, for the environment ``prepare_environment`` made."""
        home = Path(env["DAGSTER_HOME"])
        url = f"http://{host}:{port}"
        code_addr = (env["ENRICH_CODE_SERVER_HOST"], int(env["ENRICH_CODE_SERVER_PORT"]))
        argv = command_lines(env, workspace_file(home), host, port)
        checks: dict[str, Callable[[], bool]] = {
            CODE: lambda: code_server_healthy(*code_addr),
            WEB: lambda: webserver_healthy(url),
            DAEMON: lambda: bool(daemon_healthy(url)),
        }
        services = [
            Service(name, argv[name], home / LOG_DIR / f"{name}.log", checks[name])
            for name in START_ORDER
        ]
        return cls(env, settings, services, url)

    # -- state file --

    def write_state(self) -> None:
        state = {
            "supervisor": {"pid": os.getpid(), "started": start_ticks(os.getpid())},
            "dagster_home": str(self.home),
            "webserver_url": self.url,
            "code_server": f"{self.code_addr[0]}:{self.code_addr[1]}",
            "services": {
                s.name: {
                    "pid": s.pid,
                    "started": start_ticks(s.pid) if s.pid else None,
                    "log": str(s.log),
                    "restarts": s.restarts,
                    "old_groups": s.old_groups,
                }
                for s in self.services.values()
            },
        }
        tmp = self.home / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.home / STATE_FILE)

    # -- start --

    def start(self) -> None:
        """Code server first (the others load the code location from it), then the rest;
        returns once all three are healthy."""
        cwd = str(self.home)  # not the checkout: Dagster would warn about its dagster.yaml
        code = self.services[CODE]
        code.start(self.env, cwd)
        self.write_state()
        self._wait_healthy([code])
        for name in (WEB, DAEMON):
            self.services[name].start(self.env, cwd)
        self.write_state()
        self._wait_healthy([self.services[WEB], self.services[DAEMON]], also_alive=(code,))

    def _wait_healthy(self, services: list[Service], also_alive: tuple[Service, ...] = ()) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout
        waiting = list(services)
        while waiting:
            for s in [*also_alive, *waiting]:
                if not s.alive():
                    code = s.proc.returncode if s.proc else None
                    raise RuntimeError(
                        f"{s.name} exited ({exit_reason(code or 0)}) before it was healthy; "
                        f"its log: {s.log}\n{_tail(s.log)}"
                    )
                if s in waiting and s.healthy():
                    print(f"{s.name} healthy (pid {s.pid})", flush=True)
                    waiting.remove(s)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.name for s in waiting)
                raise RuntimeError(
                    f"not healthy within {self.settings.startup_timeout:.0f} s "
                    f"(ENRICH_STARTUP_TIMEOUT): {names}; logs in {self.home / LOG_DIR}"
                )
            if waiting:
                time.sleep(POLL)

    # -- supervise --

    def supervise_once(self, now: float) -> None:
        """Notice an exit (one line, a back-off), or start a service whose back-off is over."""
        for s in self.services.values():
            if s.restart_at is None and s.proc is not None and s.proc.poll() is not None:
                ran = now - s.started
                s.exits_in_a_row = (
                    1 if ran >= self.settings.restart_backoff_max else (s.exits_in_a_row + 1)
                )
                wait = self.settings.restart_wait(s.exits_in_a_row)
                s.restart_at = now + wait
                if group_alive(s.proc.pid):
                    s.old_groups.append(s.proc.pid)  # its children live on
                print(
                    f"{s.name} (pid {s.proc.pid}) exited ({exit_reason(s.proc.returncode)}) "
                    f"after {ran:.0f} s: restarting it in {wait:.1f} s "
                    f"(exit {s.exits_in_a_row} in a row)",
                    flush=True,
                )
            elif s.restart_at is not None and now >= s.restart_at:
                s.start(self.env, str(self.home))
                s.restarts += 1
                print(f"{s.name} restarted (pid {s.pid}, restart {s.restarts})", flush=True)
                self.write_state()

    def run(self) -> None:
        while True:
            self.supervise_once(time.monotonic())
            time.sleep(POLL)

    # -- stop --

    def stop(self) -> None:
        """Daemon, webserver, code server (with its run workers), each given STOP_GRACE."""
        for name in STOP_ORDER:
            s = self.services[name]
            groups = [g for g in [*s.old_groups, s.pid] if g is not None]
            if not any(group_alive(g) for g in groups):
                continue
            started = time.monotonic()
            stop_groups(groups, STOP_GRACE, reap=s.proc)
            print(f"{name} stopped ({time.monotonic() - started:.1f} s)", flush=True)
        (self.home / STATE_FILE).unlink(missing_ok=True)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- the commands --------------------------------------------------------------------------


def up(env: dict[str, str], host: str, port: int) -> int:
    """Start the topology and supervise it until a stop signal."""
    settings = TopologySettings.from_env(env)
    topology = Topology.of(env, host, port, settings)
    code = 0
    try:
        with supervisor_signals() as received:
            print(
                f"Dagster topology: code server {topology.code_addr[0]}:{topology.code_addr[1]}, "
                f"webserver {topology.url}, daemon (DAGSTER_HOME={topology.home})",
                flush=True,
            )
            try:
                topology.start()
                print(f"all three healthy: {topology.home / STATE_FILE}", flush=True)
                topology.write_state()
                topology.run()
            except StopRequested:
                name = signal.Signals(received[0]).name
                print(f"{name} received: stopping the daemon, the webserver, the code server",
                      flush=True)  # fmt: skip
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                code = 1
            finally:
                received.append(0)  # a signal from now on must not cut the stop short
                topology.stop()
    finally:
        stop_embedded(env)
    return code


def read_state(home: Path) -> dict | None:
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def down(env: Mapping[str, str], timeout: float = STOP_GRACE * 3 + 30) -> int:
    """Stop a running ``up``: SIGTERM to it (it stops the rest in order), or, if it is gone,
    to what it left."""
    home = dagster_home_of(env)
    state = read_state(home)
    if state is None:
        print(f"nothing to stop: no {STATE_FILE} in {home} (enrich-dagster up is not running)")
        return 0
    sup = state["supervisor"]
    services = state.get("services", {})
    stopped = [
        f"{name} (pid {services[name]['pid']})"
        for name in STOP_ORDER
        if same_process(services.get(name))
    ]
    if same_process(sup):
        os.kill(sup["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while embedded.process_alive(sup["pid"]):
            if time.monotonic() > deadline:
                print(f"error: enrich-dagster up (pid {sup['pid']}) did not stop within "
                      f"{timeout:.0f} s", file=sys.stderr)  # fmt: skip
                return 1
            time.sleep(0.2)
        stopped.append(f"supervisor (pid {sup['pid']})")
    else:
        # ``up`` died without stopping them (kill -9): the parent-death signal did; what is
        # left of their groups goes now.
        groups = [
            g
            for name in STOP_ORDER
            for g in [
                *services.get(name, {}).get("old_groups", []),
                services.get(name, {}).get("pid"),
            ]
            if isinstance(g, int)
        ]
        stop_groups(groups, STOP_GRACE, reap=None)
        (home / STATE_FILE).unlink(missing_ok=True)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def status(env: Mapping[str, str]) -> int:
    """Each process of a running ``up``: pid, alive, healthy. 0 when all three are healthy."""
    home = dagster_home_of(env)
    state = read_state(home)
    if state is None:
        print(f"not running: no {STATE_FILE} in {home}")
        return 3
    services = state.get("services", {})
    url = state.get("webserver_url", "")
    host, _, port = str(state.get("code_server", ":")).rpartition(":")
    checks = {
        CODE: lambda: code_server_healthy(host, int(port or 0)),
        WEB: lambda: webserver_healthy(url),
        DAEMON: lambda: daemon_healthy(url),
    }
    sup = state["supervisor"]
    print(f"supervisor  pid {sup['pid']:<8} {'alive' if same_process(sup) else 'gone'}")
    ok = same_process(sup)
    for name in START_ORDER:
        entry = services.get(name, {})
        alive = same_process(entry)
        health = checks[name]() if alive else False
        shown = "unknown" if health is None else ("healthy" if health else "unhealthy")
        restarts = entry.get("restarts", 0)
        print(
            f"{name:<11} pid {entry.get('pid')!s:<8} {'alive' if alive else 'gone':<6} {shown}"
            + (f"  ({restarts} restart(s))" if restarts else "")
        )
        ok = ok and alive and bool(health)
    return 0 if ok else 1
