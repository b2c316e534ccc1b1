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

The package, one idea a module:

- ``plan``: the flags as sizes (``Plan``)
- ``harness``: PostgreSQL, the stand-in server's process, images, worker processes
- ``throughput``: one throughput run and its figures from the stand-in's request log
- ``deployment``: the ``users`` scenario (``enrich-dagster`` on many users)
- ``scenarios``: which runs each scenario makes
- ``records``: the results as typed records (``Results``)
- ``report`` and ``table``: the figures with their targets, and the printed table
- ``cli`` (``__main__``): the command line and ``artifacts/bench.json``

The scenarios run in ``benchmarks.worker`` processes.
"""
