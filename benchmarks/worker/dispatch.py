"""A spec to its worker: in a fresh process (``main``) or forked from a preloaded one."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from benchmarks.worker.contract import (
    RESULT_PREFIX,
    Answer,
    CliSpec,
    DagsterSpec,
    LegacySpec,
    LocalSpec,
    Spec,
    parse_spec,
    to_json,
)


def run(spec: Spec) -> Answer:
    # Imported here: a worker loads only what its own scenario needs.
    if isinstance(spec, CliSpec):
        from benchmarks.worker.pipeline import run_cli

        return run_cli(spec)
    if isinstance(spec, LegacySpec):
        from benchmarks.worker.pipeline import run_legacy

        return run_legacy(spec)
    if isinstance(spec, DagsterSpec):
        from benchmarks.worker.pipeline import run_dagster

        return run_dagster(spec)
    if isinstance(spec, LocalSpec):
        from benchmarks.worker.local import run_local

        return run_local(spec)
    from benchmarks.worker.sensor import run_sensor

    return run_sensor(spec)


def forked(spec: str, env: dict[str, str], conn: Any) -> None:
    """Entry point of a worker forked from a preloaded server (``bench --preload``)."""
    os.environ.clear()
    os.environ.update(env)
    # As quiet as a subprocess whose output is captured: Dagster logs every step event.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        conn.send(("ok", to_json(run(parse_spec(spec)))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        import traceback

        conn.send(("error", traceback.format_exc()[-4000:]))
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    answer = run(parse_spec(argv[0]))
    print(RESULT_PREFIX + json.dumps(to_json(answer)), flush=True)
    return 0
