"""Starting and stopping a throw-away PostgreSQL 12 server (profiles ``pg12`` and ``gp6``).

A server gets a copy of its profile's template data directory, a free port on 127.0.0.1, a
socket folder and ``postgres.log``, which logs every statement (``statement_log`` reads it).
Servers left running are stopped at exit, and die with the process that started them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from enrich_pipeline.db.embedded import process_alive
from enrich_pipeline_tests.servers.binaries import default_cache_dir, ensure_pg12
from enrich_pipeline_tests.servers.process import child_env
from enrich_pipeline_tests.servers.system_user import (
    chown_tree,
    make_reachable,
    reachable_pg_root,
    server_user,
)
from enrich_pipeline_tests.servers.templates import SUPERUSER, ensure_template

PROFILES = ("pg12", "gp6")

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

# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

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
    run_as = server_user()
    if run_as.wrapper:
        pg_root = reachable_pg_root(pg_root)
    timings["fetch"] = time.monotonic() - t0

    base_dir = Path(base_dir).absolute()
    base_dir.mkdir(parents=True, exist_ok=True)
    template = ensure_template(profile, pg_root, cache_dir, run_as, timings)

    t0 = time.monotonic()
    data = base_dir / "data"
    if os.path.lexists(data):
        _clear_stale_data_dir(data)
    shutil.copytree(template, data, symlinks=True)
    chown_tree(data, run_as)
    os.chmod(data, 0o700)  # postgres refuses group/other-accessible data dirs
    sock = _socket_dir(base_dir)
    if run_as.wrapper:
        os.chown(sock, run_as.uid, run_as.gid)
        if run_as.needs_reachable_paths:
            make_reachable(data)
            make_reachable(sock)
            make_reachable(pg_root / "bin" / "postgres")
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
            env=child_env(),
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
