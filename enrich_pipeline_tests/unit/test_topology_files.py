"""The production topology's files and rules, without starting Dagster: the workspace the
webserver and the daemon read, the Procfile's three commands, the restart back-off, where the
state and logs go, and health checks that say "no" (not hang) when nothing listens."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from enrich_pipeline.cli import topology, topology_health
from enrich_pipeline.settings import ConfigError
from enrich_pipeline.settings.topology import TopologySettings

REPO = Path(__file__).resolve().parents[2]
PROCFILE = REPO / "deploy" / "Procfile"


def test_the_checkout_workspace_is_the_one_written_for_an_installed_package() -> None:
    assert yaml.safe_load(topology.CHECKOUT_WORKSPACE.read_text()) == topology.WORKSPACE
    (entry,) = topology.WORKSPACE["load_from"]
    assert entry["grpc_server"]["location_name"] == "enrich_pipeline"


def test_an_installed_package_writes_the_workspace_into_dagster_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "CHECKOUT_WORKSPACE", tmp_path / "absent.yaml")
    path = topology.workspace_file(tmp_path)
    assert path == tmp_path / "workspace.yaml"
    assert yaml.safe_load(path.read_text()) == topology.WORKSPACE


def _procfile() -> dict[str, str]:
    entries = {}
    for line in PROCFILE.read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)  # honcho's and foreman's rule
        if found:
            entries[found[1]] = found[2]
    return entries


def test_the_procfile_runs_the_same_three_commands_as_up() -> None:
    env = {"ENRICH_CODE_SERVER_HOST": "$ENRICH_CODE_SERVER_HOST"}
    env["ENRICH_CODE_SERVER_PORT"] = "$ENRICH_CODE_SERVER_PORT"
    lines = topology.command_lines(env, Path("deploy/workspace.yaml"), "127.0.0.1", 3000)
    procfile = _procfile()
    assert set(procfile) == {"code", "webserver", "daemon"}
    scripts = {
        topology.CODE: procfile["code"],
        topology.WEB: procfile["webserver"],
        topology.DAEMON: procfile["daemon"],
    }
    entry_points = {
        topology.CODE: "dagster",
        topology.WEB: "dagster-webserver",
        topology.DAEMON: "dagster-daemon",
    }
    for name, argv in lines.items():
        # ``python -m dagster_webserver ARGS`` is the entry point ``dagster-webserver ARGS``.
        words = shlex.split(scripts[name].rsplit("exec ", 1)[1])
        assert words == [entry_points[name], *argv[3:]], (name, words, argv)


def test_the_webserver_and_daemon_lines_wait_for_the_code_server() -> None:
    procfile = _procfile()
    for name in ("webserver", "daemon"):
        assert procfile[name].startswith("until dagster api grpc-health-check"), procfile[name]


def test_restarts_back_off_doubling_up_to_the_maximum() -> None:
    settings = TopologySettings(restart_backoff=1.0, restart_backoff_max=10.0)
    assert [settings.restart_wait(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert settings.restart_wait(10_000) == 10


def test_bad_topology_settings_are_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="ENRICH_CODE_SERVER_PORT"):
        TopologySettings.from_env({"ENRICH_CODE_SERVER_PORT": "70000"})
    env = topology.topology_env({})
    assert (env["ENRICH_CODE_SERVER_HOST"], env["ENRICH_CODE_SERVER_PORT"]) == (
        "127.0.0.1",
        "4266",
    )


def test_dagster_home_is_found_as_up_fills_it_in(tmp_path: Path) -> None:
    assert topology.dagster_home_of({"DAGSTER_HOME": str(tmp_path)}) == tmp_path
    home = topology.dagster_home_of({"ENRICH_HOME": str(tmp_path)})
    assert home == tmp_path.resolve() / "dagster_home"


def test_down_and_status_without_a_running_up_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"DAGSTER_HOME": str(tmp_path)}
    assert topology.down(env) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert topology.status(env) == 3
    assert "not running" in capsys.readouterr().out
    assert topology.already_running(env) is None


def test_health_checks_say_no_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        assert topology_health.code_server_healthy("127.0.0.1", port, timeout=2) is False
        assert topology_health.webserver_healthy(f"http://127.0.0.1:{port}") is False
        assert topology_health.daemon_healthy(f"http://127.0.0.1:{port}") is None


def test_up_refuses_ports_something_already_listens_on(tmp_path: Path) -> None:
    """A server already on the code server's port would answer the health check in place of
    ours: ``up`` refuses to start, in one line naming the setting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"DAGSTER_HOME": str(tmp_path), "ENRICH_CODE_SERVER_PORT": str(port)}
        with pytest.raises(ConfigError, match=rf"^ENRICH_CODE_SERVER_PORT: 127.0.0.1:{port} is in"):
            topology.ready_to_start(dict(env), "127.0.0.1", 3000)
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            code_port = free.getsockname()[1]
        env["ENRICH_CODE_SERVER_PORT"] = str(code_port)
        with pytest.raises(ConfigError, match=rf"^--port: 127.0.0.1:{port} is in use"):
            topology.ready_to_start(dict(env), "127.0.0.1", port)
        ready = topology.ready_to_start(dict(env), "127.0.0.1", 0)
        assert ready["ENRICH_CODE_SERVER_PORT"] == str(code_port)
