"""Running the servers as an unprivileged system user when the tests run as root.

PostgreSQL refuses to run as root, so as root the servers run as ``$ENRICH_PG_USER`` (default
``enrichpg``, created as a system user on first use) through ``setpriv`` (keeping only the
capability to read and traverse any path) or, failing that, ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from enrich_pipeline_tests.servers.binaries import file_lock
from enrich_pipeline_tests.servers.process import child_env

DEFAULT_RUN_AS_USER = "enrichpg"

# Where binaries are mirrored when the cache is not reachable by the unprivileged server user.
_ROOT_MIRROR_DIR = Path("/var/cache/enrich-pipeline/pg12-runtime")


@dataclass(frozen=True)
class RunAs:
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


_RUN_AS_CACHE: list[RunAs] = []
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


def server_user() -> RunAs:
    """Who the servers run as: this user, or the system user when this is root."""
    with _RUN_AS_LOCK:
        if _RUN_AS_CACHE:
            return _RUN_AS_CACHE[0]
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            result = RunAs(me.pw_name, me.pw_uid, os.getegid(), (), False)
        else:
            result = _root_run_as()
        _RUN_AS_CACHE.append(result)
        return result


def _root_run_as() -> RunAs:
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
            env=child_env(),
            timeout=30,
        )
        if probe.returncode == 0:
            return RunAs(user.pw_name, user.pw_uid, user.pw_gid, with_caps, False)
        return RunAs(user.pw_name, user.pw_uid, user.pw_gid, base, True)
    runuser = shutil.which("runuser")
    if runuser:
        return RunAs(user.pw_name, user.pw_uid, user.pw_gid, (runuser, "-u", user.pw_name), True)
    raise RuntimeError("running as root but neither setpriv nor runuser is available")


def make_reachable(path: Path) -> None:
    # Fallback for when capabilities are unavailable: add o+x on every ancestor so the server
    # user can reach path. This changes permissions outside our directories, so warn about it.
    path = path.resolve()
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            warnings.warn(
                f"test servers: adding o+x to {p} so the server user can reach it", stacklevel=3
            )
            os.chmod(p, mode | 0o001)


def _world_reachable(path: Path) -> bool:
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def reachable_pg_root(pg_root: Path) -> Path:
    # initdb and postgres find their own binaries and share/ with access(), which drops
    # capabilities when the real uid is not root; a cache under e.g. /root therefore needs a
    # copy elsewhere. Hard links make that copy nearly free on the same filesystem.
    if _world_reachable(pg_root / "bin"):
        return pg_root
    install = pg_root.parent
    mirror = _ROOT_MIRROR_DIR / install.name
    marker = mirror / ".complete"
    if not marker.is_file():
        with file_lock(_ROOT_MIRROR_DIR / ".lock"):
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


def chown_tree(path: Path, run_as: RunAs) -> None:
    if os.geteuid() != 0:
        return
    os.chown(path, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), run_as.uid, run_as.gid)
