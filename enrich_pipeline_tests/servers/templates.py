"""Data directory templates: initdb (and the gp6 strip) once per profile, copied per server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from enrich_pipeline_tests.servers import gp6
from enrich_pipeline_tests.servers.binaries import PG12_VERSION, file_lock
from enrich_pipeline_tests.servers.process import run_checked
from enrich_pipeline_tests.servers.system_user import RunAs, make_reachable

SUPERUSER = "postgres"
# Trust on loopback: the servers are throw-away and only the test run reaches them.
_INITDB_ARGS = ("-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")


def _template_key(profile: str, run_as: RunAs) -> str:
    strip = gp6.strip_sql() if profile == "gp6" else ""
    payload = json.dumps([PG12_VERSION, _INITDB_ARGS, strip, run_as.name, run_as.uid])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_template(
    profile: str, pg_root: Path, cache_dir: Path, run_as: RunAs, timings: dict[str, float]
) -> Path:
    # initdb (~1-2 s) and the strip are the slow part of a start and their result never changes
    # for a given profile, so they run once and each server gets a copy.
    templates = cache_dir / "templates"
    template = templates / f"{profile}-{_template_key(profile, run_as)}"
    marker = template.with_name(template.name + ".complete")
    if marker.is_file():
        timings["template_cached"] = 1.0
        return template
    with file_lock(cache_dir / ".template.lock"):
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
                    make_reachable(data)
                    make_reachable(pg_root / "bin" / "postgres")
            t0 = time.monotonic()
            run_checked(
                run_as.command([str(pg_root / "bin" / "initdb"), "-D", str(data), *_INITDB_ARGS]),
                "initdb",
            )
            timings["initdb"] = time.monotonic() - t0
            if profile == "gp6":
                t0 = time.monotonic()
                gp6.strip_catalog(pg_root, data, run_as)
                timings["strip"] = time.monotonic() - t0
            os.rename(data, template)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        marker.write_text(profile + "\n")
    return template
