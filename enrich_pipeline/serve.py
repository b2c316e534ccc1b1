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

from enrich_pipeline import embedded
from enrich_pipeline.settings import ConfigError, DbSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Defaults for the variables dagster.yaml reads; an exported value wins.
INSTANCE_DEFAULTS = {
    "ENRICH_MAX_CONCURRENT_RUNS": "4",
}
POOL_DEFAULTS = {
    "dashscope": ("ENRICH_DASHSCOPE_POOL_SLOTS", 4),
    "adbpg": ("ENRICH_ADBPG_POOL_SLOTS", 8),
}


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
        source = PROJECT_ROOT / "dagster.yaml"
        if not source.exists():
            raise ConfigError("dagster.yaml not found: run from a checkout or set DAGSTER_HOME")
        shutil.copy(source, dagster_home / "dagster.yaml")
    env["DAGSTER_HOME"] = str(dagster_home)
    for name, value in INSTANCE_DEFAULTS.items():
        env.setdefault(name, value)
    return env


def set_pool_limits(env: dict[str, str]) -> None:
    """Slots of the op concurrency pools: how many caption / database steps run at once."""
    from dagster import DagsterInstance

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with DagsterInstance.get() as instance:
            for pool, (variable, default) in POOL_DEFAULTS.items():
                instance.event_log_storage.set_concurrency_slots(
                    pool, int(env.get(variable) or default)
                )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="enrich-dagster", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    args = p.parse_args(argv)
    try:
        env = prepare_environment(dict(os.environ))
        set_pool_limits(env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workspace = PROJECT_ROOT / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.exists() else ["-m", "enrich_pipeline.definitions"]
    print(
        f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={env['DAGSTER_HOME']})",
        flush=True,
    )
    cmd = [sys.executable, "-m", "dagster", "dev", *target, "-h", args.host, "-p", str(args.port)]
    proc = subprocess.Popen(cmd, env=env, cwd=str(PROJECT_ROOT))
    # A service manager stops us with SIGTERM: pass it on so webserver and daemon stop too.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
