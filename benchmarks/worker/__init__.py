"""One benchmark scenario, run in a process of its own: ``python -m benchmarks.worker SPEC``.

``SPEC`` is a JSON object with ``kind`` (``cli``, ``dagster``, ``legacy``, ``local``,
``sensor``) and its parameters (``contract``). The database and the stand-in server are given in
the environment exactly as a user would give them (``ADBPG_URL``, ``DASHSCOPE_BASE_URL``, ...).
The answer is printed as one line ``BENCH_RESULT <json>`` on stdout.

- ``contract``: the specs and the typed answers, both sides of the process boundary
- ``measure``: CPU time, memory, and the diagnostic instrumentation
- ``pipeline``: ``enrich-captions``, the legacy algorithm and the Dagster job
- ``local``: local CPU per photo and image tokens
- ``sensor``: the sensor's tick on a large table
- ``dispatch``: a spec to its worker, in a fresh process or forked from a preloaded one
"""
