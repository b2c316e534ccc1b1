"""``enrich-dagster``: the Dagster UI (webserver and daemon) for this code location.

On the embedded default it starts the embedded PostgreSQL with its sample items, points
Dagster's run and event storage at a ``dagster`` database in that same server, and starts
``dagster dev``; the sensor then launches runs without a click. Against a real deployment it
only needs ``DAGSTER_PG_URL`` (and the ``ADBPG_*`` and ``DASHSCOPE_*`` variables).

Stopping: ``kill PID`` (SIGTERM), Ctrl-C (SIGINT) and a closed terminal (SIGHUP) all stop, in
this order, the webserver, the daemon (``dagster dev`` shuts both down) and then the embedded
database, within seconds, however it was started. A background job starts with SIGINT
ignored, which Python and ``dagster dev`` would inherit and which made ``kill`` do nothing:
``dagster dev`` therefore runs with default signal dispositions, in a process group of its
own (a terminal's Ctrl-C reaches only this process, which stops the rest in order), and with
Linux's parent-death signal, so that even ``kill -9`` of this process stops ``dagster dev``
and with it the webserver and daemon instead of leaving them orphaned.

``up`` starts the production topology instead (code server, webserver and daemon, each a
process of its own, supervised; ``down`` stops it, ``status`` shows it): ``cli/topology.py``.

Other commands: ``backfill`` (user partitions, validated against the table), ``partitions``
(list them, or remove typos), ``db-url`` and ``psql`` (reach the embedded database).

The webserver and the daemon are ``dagster`` processes; what the command changes in Dagster's
instance (pool slots, user partitions) goes through ``enrich_pipeline.defs`` (the only layer that
imports Dagster), imported by the subcommands that need it, so that ``db-url`` and ``psql``
start without loading Dagster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from enrich_pipeline.bootstrap import open_store
from enrich_pipeline.cli.flags import Parser
from enrich_pipeline.cli.stopping import StopRequested, stops_cleanly, supervisor_signals
from enrich_pipeline.db import embedded
from enrich_pipeline.redaction import redact_source, register_secrets, scrub_secrets, url_secrets
from enrich_pipeline.settings import (
    AutomationSettings,
    ConfigError,
    DbSettings,
    RunSettings,
    Settings,
)

WORKSPACE_YAML = Path(__file__).resolve().parents[2] / "workspace.yaml"
# Seconds ``dagster dev`` gets to stop the webserver and the daemon before it is killed.
STOP_GRACE = 30.0

# Run as ``python -c`` in the child before it becomes ``dagster dev``: default dispositions for
# the stop signals (a background job's SIGINT is ignored, and exec keeps "ignored"), and
# SIGTERM when this launcher dies, however it dies (PR_SET_PDEATHSIG survives exec).
CHILD_PRELUDE = (
    "import ctypes, os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
    "    signal.signal(s, signal.SIG_DFL)\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


# ``dagster dev`` warns at every start that it is superseded by ``dg dev`` (dagster-dg-cli, a
# separate tool that needs a dg project layout, which this code location does not have);
# Dagster 1.13 still ships and supports ``dagster dev``. The filter is this one message, in the
# ``dagster dev`` process only (``-W`` is not inherited by its children).
_QUIET = ("-W", "ignore:Function `dev_command` is superseded:FutureWarning")


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
            ensure_database(resolved.conninfo.get_secret_value(), "dagster")
            env["DAGSTER_PG_URL"] = dagster_url_for(resolved.conninfo.get_secret_value())
    elif not env.get("DAGSTER_PG_URL"):
        raise ConfigError(
            "DAGSTER_PG_URL is not set: Dagster's run storage needs a PostgreSQL URL "
            "(postgresql+psycopg2://user:password@host:5432/dagster)"
        )
    dagster_home = Path(env.get("DAGSTER_HOME") or home / "dagster_home")
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        from enrich_pipeline.defs.instance import INSTANCE_YAML

        shutil.copy(INSTANCE_YAML, dagster_home / "dagster.yaml")
    env["DAGSTER_HOME"] = str(dagster_home)
    # dagster.yaml reads the run limit from the environment: give it the setting's value.
    automation = AutomationSettings.from_env(env)
    env["ENRICH_MAX_CONCURRENT_RUNS"] = str(automation.max_concurrent_runs)
    return env


@contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment while the block runs (Dagster's instance and the
    pipeline's settings read it)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def set_pool_limits(env: dict[str, str]) -> None:
    """Slots of the op concurrency pools: how many caption / database steps run at once."""
    from enrich_pipeline.defs.instance import admin

    automation = AutomationSettings.from_env(env)
    slots = {"dashscope": automation.dashscope_pool_slots, "adbpg": automation.adbpg_pool_slots}
    with environ(env):
        admin.set_pool_slots(slots)


# --- the UI --------------------------------------------------------------------------------


def stop_embedded(env: Mapping[str, str]) -> None:
    """Stop the embedded database if this command's settings use it (and no one else does)."""
    if DbSettings.from_env(env).embedded:
        stopped = embedded.stop(Path(env["ENRICH_HOME"]))
        print(
            "embedded PostgreSQL stopped"
            if stopped
            else "embedded PostgreSQL left running: another process still uses it",
            flush=True,
        )


def start_ui(env: dict[str, str], host: str, port: int) -> int:
    """``dagster dev`` until a stop signal; then webserver, daemon, embedded database."""
    dev = [sys.executable, *_QUIET, "-m", "dagster", "dev", *_target(), "-h", host, "-p", str(port)]
    cmd = [sys.executable, "-c", CHILD_PRELUDE, str(os.getpid()), *dev[1:]]
    print(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={env['DAGSTER_HOME']})", flush=True)
    proc: subprocess.Popen[bytes] | None = None
    # Installed before the child starts, so no signal is missed.
    try:
        with supervisor_signals() as received:
            try:
                # Started from DAGSTER_HOME: from the checkout, Dagster would warn about the
                # dagster.yaml it finds there on every start.
                proc = subprocess.Popen(cmd, env=env, cwd=env["DAGSTER_HOME"], process_group=0)
                code = proc.wait()
                print(f"dagster dev exited with {code}", file=sys.stderr, flush=True)
                return code
            except StopRequested:
                name = signal.Signals(received[0]).name
                print(f"{name} received: stopping the webserver and the daemon", flush=True)
                if proc is not None:
                    return _stop_dev(proc)
                return 0
            finally:
                if proc is not None and proc.poll() is None:
                    _stop_dev(proc)
    finally:
        stop_embedded(env)


def _stop_dev(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM to ``dagster dev`` (it stops the webserver, then the daemon); whatever is left of
    its process group after the grace period is killed."""
    started = time.monotonic()
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = started + STOP_GRACE
    while True:
        try:
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                print("dagster dev did not stop in time: killing it", file=sys.stderr)
                _signal_group(proc.pid, signal.SIGKILL)
                code = proc.wait()
                break
        except StopRequested:  # a second signal while stopping: keep stopping
            continue
    print(f"dagster dev exited ({time.monotonic() - started:.1f} s)", flush=True)
    # Run workers, code servers: nothing of the group may outlive us.
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    # A killed process runs until the kernel has torn it down (seconds, on a busy machine): wait,
    # or the embedded database would count it as a user still and be left running.
    deadline = time.monotonic() + 10
    while _signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"webserver and daemon stopped ({time.monotonic() - started:.1f} s)", flush=True)
    return 0 if code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else code


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _target() -> list[str]:
    """The code location as Dagster's commands are given it (``dagster dev``, and the
    backfill loaded in process): the checkout's workspace file, else the installed module."""
    if WORKSPACE_YAML.exists():
        return ["-w", str(WORKSPACE_YAML)]
    return ["-m", "enrich_pipeline.defs.definitions"]


# --- user partitions -------------------------------------------------------------------------


def parse_users(text: str) -> list[str]:
    """Comma-separated user ids, each trimmed; empty ones dropped, duplicates once."""
    seen: list[str] = []
    for part in text.split(","):
        user = part.strip()
        if user and user not in seen:
            seen.append(user)
    return seen


def check_users(users: list[str], *, allow_unknown: bool) -> list[str]:
    """The users, once each of them has rows in the items table (or ``allow_unknown``)."""
    with open_store(Settings.from_env()) as store:
        known = store.summary.existing_users(users)
        table = store.source_table
        unknown = [u for u in users if u not in known]
        # A typo of a real id with spaces around it: say which one exists.
        hints = []
        for u in unknown:
            near = store.summary.existing_users([f" {u}", f"{u} ", f" {u} "])
            hints += [f"{u!r}: did you mean {n!r}? (pass it with --user, verbatim)" for n in near]
    if unknown and not allow_unknown:
        listed = ", ".join(repr(u) for u in unknown)
        more = ("; " + "; ".join(hints)) if hints else ""
        raise ConfigError(
            f"no row of {table} has user_id {listed}: no partition added{more}. Check the "
            "spelling, or pass --allow-unknown to add the partition(s) anyway"
        )
    return users


def backfill(env: dict[str, str], users: list[str] | None, *, allow_unknown: bool = False) -> int:
    """Add the users' partitions and submit one backfill of their partitions (one run each).

    The daemon of ``enrich-dagster`` (or of any deployment on the same instance) runs it.
    """
    from enrich_pipeline.defs.instance import admin
    from enrich_pipeline.defs.partitions import user_to_key

    with environ(env):
        if users is None:
            with open_store(Settings.from_env()) as store:
                run = RunSettings.from_env()
                users = [
                    u
                    for u, _ in store.items.users_with_pending(
                        run.max_attempts, stale=run.on_image_change
                    )
                ]
        else:
            users = check_users(users, allow_unknown=allow_unknown)
        if not users:
            print("No user has pending rows: nothing to backfill.")
            return 0
        keys = [user_to_key(u) for u in users]
        print(f"Backfilling {len(keys)} user partition(s): {', '.join(keys)}", flush=True)
        # In this process, not through ``dagster job backfill`` and the code server it starts.
        backfill_id = admin.backfill_partitions("enrich_job", keys, _target())
    print(f"Launched backfill {backfill_id}: {len(keys)} run(s) queued", flush=True)
    return 0


def check_args(args: argparse.Namespace) -> list[str] | None:
    """Every flag within its bounds, or one line naming it; the users to backfill, if any."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: must be a port number from 1 to 65535, got {args.port}")
    if not args.host or any(ch.isspace() or not ch.isprintable() for ch in args.host):
        raise ConfigError(f"--host: must be a host name or address, got {args.host!r}")
    if args.command != "backfill" or args.all_pending:
        return None
    if args.user:
        return list(dict.fromkeys(args.user))
    users = parse_users(args.users)
    if not users:
        raise ConfigError(f"--users: no user id in {args.users!r} (comma-separated ids)")
    return users


def _storage_error(env: dict[str, str], exc: Exception) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        reason += f" ({str(cause).strip().splitlines()[0]})"
    # The driver's words may quote the storage URL's password, which no settings object holds.
    register_secrets(url_secrets(env.get("DAGSTER_PG_URL", "")))
    where = redact_source(env.get("DAGSTER_PG_URL", ""))
    return f"DAGSTER_PG_URL: cannot open Dagster's run storage at {where}: {scrub_secrets(reason)}"


def partitions(env: dict[str, str], remove: list[str] | None, *, force: bool = False) -> int:
    """List the user partitions (flagging those no row has), or remove some."""
    from enrich_pipeline.defs.instance import admin
    from enrich_pipeline.defs.partitions import key_to_user, user_to_key

    with environ(env):
        keys = admin.user_partition_keys()
        with open_store(Settings.from_env()) as store:
            known = store.summary.existing_users(key_to_user(k) for k in keys)
        if not remove:
            for key in keys:
                user = key_to_user(key)
                note = "" if user in known else "   (no row has this user id)"
                shown = key if key == user else f"{key} = {user!r}"
                print(f"{shown}{note}")
            return 0
        wanted = [r if r in keys else user_to_key(r) for r in remove]
        missing = [r for r, k in zip(remove, wanted, strict=True) if k not in keys]
        if missing:
            print(f"error: no such partition: {', '.join(map(repr, missing))}", file=sys.stderr)
            return 2
        used = [k for k in wanted if key_to_user(k) in known]
        if used and not force:
            print(
                f"error: user(s) {', '.join(repr(key_to_user(k)) for k in used)} have rows: "
                "their partitions are kept (pass --force to remove them anyway)",
                file=sys.stderr,
            )
            return 2
        for key in wanted:
            admin.remove_user_partitions([key])
            print(f"removed partition {key}")
    return 0


# --- the embedded database ---------------------------------------------------------------------


def embedded_url(env: dict[str, str]) -> str | None:
    return embedded.conninfo(Path(env.get("ENRICH_HOME") or embedded.home()))


def db_url(env: dict[str, str]) -> int:
    if not DbSettings.from_env(env).embedded:
        print("error: ADBPG_HOST/ADBPG_URL is set: not the embedded database", file=sys.stderr)
        return 2
    url = embedded_url(env)
    if url is None:
        print(
            "error: the embedded database is not running (it runs while enrich-dagster or "
            "enrich-captions does); `enrich-dagster psql` starts it for a session",
            file=sys.stderr,
        )
        return 1
    print(url)
    return 0


# libpq's environment variables for the conninfo keys the embedded server's URL has.
_LIBPQ_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
}


def libpq_env(url: str) -> dict[str, str]:
    """The server of ``url`` as libpq's defaults: psql's own ``-d dagster`` (or ``-U``, or a
    ``dbname`` argument) then picks another database of that same server, where a URL given as
    psql's first argument would have been overridden whole by ``-d`` (libpq's default socket)."""
    params = conninfo_to_dict(url)
    return {var: str(params[key]) for key, var in _LIBPQ_ENV.items() if params.get(key)}


def psql(env: dict[str, str], args: list[str]) -> int:
    if not DbSettings.from_env(env).embedded:
        print("error: ADBPG_HOST/ADBPG_URL is set: not the embedded database", file=sys.stderr)
        return 2
    exe = embedded.psql_path() or shutil.which("psql")
    if exe is None:
        print("error: no psql found (the embedded server ships one)", file=sys.stderr)
        return 1
    # Started (or joined) for the session, and left as it was found when psql exits.
    url = embedded.start(Path(env.get("ENRICH_HOME") or embedded.home()))
    # A terminal's Ctrl-C reaches psql too, which cancels its query: it must not end the session
    # here. A handler (not SIG_IGN, which psql would inherit) lets this process wait on.
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    try:
        return subprocess.call([str(exe), *args], env={**env, **libpq_env(url)})
    finally:
        signal.signal(signal.SIGINT, previous)


# --- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="enrich-dagster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    ui = sub.add_parser("ui", help="start the webserver and daemon (the default)")
    up = sub.add_parser(
        "up", help="start the code server, webserver and daemon as processes of their own"
    )
    sub.add_parser("down", help="stop a running `enrich-dagster up`")
    sub.add_parser("status", help="the processes of a running `enrich-dagster up`")
    for parser in (p, ui, up):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=3000, help="1 to 65535 (default 3000)")
    bf = sub.add_parser("backfill", help="backfill user partitions (one run per user)")
    who = bf.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="comma-separated user ids (each trimmed of spaces)")
    who.add_argument(
        "--user", action="append", help="one user id, verbatim (repeatable; for odd ids)"
    )
    who.add_argument("--all-pending", action="store_true", help="every user with pending rows")
    bf.add_argument(
        "--allow-unknown",
        action="store_true",
        help="add partitions for user ids that no row has (yet)",
    )
    parts = sub.add_parser("partitions", help="list user partitions, or remove typos")
    parts.add_argument("--remove", nargs="+", metavar="USER", help="partitions to remove")
    parts.add_argument("--force", action="store_true", help="remove even users that have rows")
    sub.add_parser("db-url", help="print the running embedded database's URL")
    sub.add_parser("psql", help="open psql on the embedded database (arguments go to psql)")
    return p.parse_args(argv)


@stops_cleanly
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    if argv[:1] == ["psql"]:  # everything after it is psql's, options included
        try:
            return psql(env, argv[1:])
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parse_args(argv)
    try:
        users = check_args(args)
        if args.command == "db-url":
            return db_url(env)
        if args.command in ("up", "down", "status"):
            from enrich_pipeline.cli import topology

            if args.command == "down":
                return topology.down(env)
            if args.command == "status":
                return topology.status(env)
            env = topology.ready_to_start(env, args.host, args.port)
        env = prepare_environment(env)
        try:
            set_pool_limits(env)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - dagster-postgres and SQLAlchemy errors alike
            raise ConfigError(_storage_error(env, exc)) from None
        if args.command == "backfill":
            return backfill(env, users, allow_unknown=args.allow_unknown)
        if args.command == "partitions":
            return partitions(env, args.remove, force=args.force)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        return topology.up(env, args.host, args.port)
    return start_ui(env, args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
