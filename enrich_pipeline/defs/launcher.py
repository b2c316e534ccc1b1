"""``enrich-dagster``: the Dagster UI (webserver and daemon) for this code location.

On the embedded default it starts the embedded PostgreSQL with its sample items, points
Dagster's run and event storage at a ``dagster`` database in that same server, and starts
``dagster dev``; the sensor then launches runs without a click. Against a real deployment it
only needs ``DAGSTER_PG_URL`` (and the ``ADBPG_*`` and ``DASHSCOPE_*`` variables).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from enrich_pipeline.bootstrap import open_store
from enrich_pipeline.db import embedded
from enrich_pipeline.enrichment.images import redact_source
from enrich_pipeline.settings import (
    AutomationSettings,
    ConfigError,
    DbSettings,
    RunSettings,
    Settings,
)

# The instance configuration ships with the package, so an installed code location has it too.
INSTANCE_YAML = Path(__file__).with_name("dagster.yaml")
WORKSPACE_YAML = Path(__file__).resolve().parents[2] / "workspace.yaml"


def dagster_url_for(conninfo: str, dbname: str = "dagster") -> str:
    """A SQLAlchemy URL with the psycopg2 scheme (dagster-postgres needs it, see dagster.yaml)."""
    params = conninfo_to_dict(conninfo)
    user = quote(str(params.get("user") or "postgres"))
    password = quote(str(params.get("password") or ""))
    host = str(params.get("host") or "localhost")
    port = params.get("port")
    if host.startswith("/"):
        return f"postgresql+psycopg2://{user}:{password}@/{dbname}?host={quote(host)}"
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port or 5432}/{dbname}"


def ensure_database(conninfo: str, dbname: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{dbname}"')  # constant name, not user input


def prepare_environment(env: dict[str, str]) -> dict[str, str]:
    """Fill in DAGSTER_HOME, DAGSTER_PG_URL and the limits; start the embedded DB if needed."""
    home = embedded.home()
    env.setdefault("ENRICH_HOME", str(home))
    db = DbSettings.from_env(env)
    if db.embedded:
        resolved = embedded.resolve(db, root=home)
        if not env.get("DAGSTER_PG_URL"):
            ensure_database(resolved.conninfo, "dagster")
            env["DAGSTER_PG_URL"] = dagster_url_for(resolved.conninfo)
    elif not env.get("DAGSTER_PG_URL"):
        raise ConfigError(
            "DAGSTER_PG_URL is not set: Dagster's run storage needs a PostgreSQL URL "
            "(postgresql+psycopg2://user:password@host:5432/dagster)"
        )
    dagster_home = Path(env.get("DAGSTER_HOME") or home / "dagster_home")
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        shutil.copy(INSTANCE_YAML, dagster_home / "dagster.yaml")
    env["DAGSTER_HOME"] = str(dagster_home)
    # dagster.yaml reads the run limit from the environment: give it the setting's value.
    automation = AutomationSettings.from_env(env)
    env["ENRICH_MAX_CONCURRENT_RUNS"] = str(automation.max_concurrent_runs)
    return env


def set_pool_limits(env: dict[str, str]) -> None:
    """Slots of the op concurrency pools: how many caption / database steps run at once."""
    from dagster import DagsterInstance

    automation = AutomationSettings.from_env(env)
    slots = {"dashscope": automation.dashscope_pool_slots, "adbpg": automation.adbpg_pool_slots}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with DagsterInstance.get() as instance:
            for pool, n in slots.items():
                instance.event_log_storage.set_concurrency_slots(pool, n)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_ui(env: dict[str, str], host: str, port: int) -> int:
    cmd = [sys.executable, "-m", "dagster", "dev", *_target(), "-h", host, "-p", str(port)]
    print(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={env['DAGSTER_HOME']})", flush=True)
    # Started from DAGSTER_HOME: from the checkout, Dagster would warn about the dagster.yaml
    # it finds there on every start.
    proc = subprocess.Popen(cmd, env=env, cwd=env["DAGSTER_HOME"])
    # A service manager stops us with SIGTERM: pass it on so webserver and daemon stop too.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _target() -> list[str]:
    if WORKSPACE_YAML.exists():
        return ["-w", str(WORKSPACE_YAML)]
    return ["-m", "enrich_pipeline.defs.definitions"]


def backfill(env: dict[str, str], users: list[str] | None) -> int:
    """Add the users' partitions and submit one backfill of their partitions (one run each).

    The daemon of ``enrich-dagster`` (or of any deployment on the same instance) runs it.
    """
    from dagster import DagsterInstance

    from enrich_pipeline.defs.partitions import user_to_key, users_partitions

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        if users is None:
            with open_store(Settings.from_env()) as store:
                max_attempts = RunSettings.from_env().max_attempts
                users = [u for u, _ in store.items.users_with_pending(max_attempts)]
        if not users:
            print("No user has pending rows: nothing to backfill.")
            return 0
        keys = [user_to_key(u) for u in users]
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(users_partitions.name, keys)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "backfill",
        *_target(),
        "-j",
        "enrich_job",
        "--partitions",
        ",".join(keys),
        "--noprompt",
    ]
    print(f"Backfilling {len(keys)} user partition(s): {', '.join(keys)}", flush=True)
    return subprocess.call(cmd, env=env, cwd=env["DAGSTER_HOME"])


def check_args(args: argparse.Namespace) -> list[str] | None:
    """Every flag within its bounds, or one line naming it; the users to backfill, if any."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: must be a port number from 1 to 65535, got {args.port}")
    if not args.host or any(ch.isspace() or not ch.isprintable() for ch in args.host):
        raise ConfigError(f"--host: must be a host name or address, got {args.host!r}")
    if args.command != "backfill" or args.all_pending:
        return None
    users = args.users.split(",")
    if any(not u for u in users):
        raise ConfigError(f"--users: an empty user id in {args.users!r} (comma-separated ids)")
    return list(dict.fromkeys(users))


def _storage_error(env: dict[str, str], exc: Exception) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        reason += f" ({str(cause).strip().splitlines()[0]})"
    where = redact_source(env.get("DAGSTER_PG_URL", ""))
    return f"DAGSTER_PG_URL: cannot open Dagster's run storage at {where}: {reason}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="enrich-dagster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    ui = sub.add_parser("ui", help="start the webserver and daemon (the default)")
    for parser in (p, ui):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=3000, help="1 to 65535 (default 3000)")
    bf = sub.add_parser("backfill", help="backfill user partitions (one run per user)")
    who = bf.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="comma-separated user ids")
    who.add_argument("--all-pending", action="store_true", help="every user with pending rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        users = check_args(args)
        env = prepare_environment(dict(os.environ))
        try:
            set_pool_limits(env)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - dagster-postgres and SQLAlchemy errors alike
            raise ConfigError(_storage_error(env, exc)) from None
        if args.command == "backfill":
            return backfill(env, users)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return start_ui(env, args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
