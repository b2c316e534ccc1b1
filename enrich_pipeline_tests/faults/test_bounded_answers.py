"""Answers too large to hold: a gzip body of ~1 MB inflating to 1 GiB and a valid 64 MiB JSON
answer (the stand-in's ``gzip_bomb`` and ``huge_answer``), end to end through the CLI over a
real PostgreSQL.

Every answer is read within ``DASHSCOPE_MAX_ANSWER_BYTES`` (4 MiB by default), counted as it
arrives and as it inflates; past it the reading stops and the call fails as a service error.
On every call, the run stops (exit 4) with no row charged, and the CLI's peak memory stays at
what a run needs anyway; on one row's calls only, that row alone is charged an attempt while
the others are captioned.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.helpers import Items, cli_env, hues, mean_of, paint, run_cli
from enrich_pipeline_tests.standin import StandIn
from enrich_pipeline_tests.standin.foreign import BOMB_INFLATED

FOREVER = 1_000_000
CLI = [sys.executable, "-m", "enrich_pipeline.cli.captions", "--user-id", "alice"]
# Room for a loaded two-core machine: a Python start and a run of a few calls.
RUN_WITHIN = 300
# A run of a few images at --concurrent 4 peaks near 200 MB (the interpreter, PIL, psycopg,
# the SDK); four bombs in flight would need 4 GiB, one alone 1 GiB.
PEAK_RSS_BOUND = 450 * 1024 * 1024


def seed(items: Items, paths: list[Path], user: str = "alice") -> list[str]:
    return [items.add(user, str(p), metadata={"title": p.stem}) for p in paths]


def ledger(items: Items) -> list[tuple]:
    return items.execute(
        "SELECT item_id, attempts, permanent, error_code FROM {ns}.enrich_failures ORDER BY 1"
    )


def claims(items: Items) -> int:
    return int(items.execute("SELECT count(*) FROM {ns}.enrich_claims")[0][0])


def untouched_and_pending(items: Items, store: Store, ids: list[str]) -> None:
    for i in ids:
        assert items.row(i)["metadata"] == {"title": items.row(i)["metadata"]["title"]}
    assert ledger(items) == []
    assert claims(items) == 0
    assert store.items.count_pending("alice", max_attempts=1) == len(ids)


# The CLI is started by a small Python process of its own, which reports its child's peak RSS.
# Started from the test process directly, the figure would include the test process's own peak:
# Linux counts the peak of the memory a process leaves at exec into the new program's ru_maxrss,
# and subprocess's vfork lends the child the parent's memory until then (hundreds of MB by the
# time this test runs in the whole suite: Dagster, the Kubernetes schemas, ...).
_MEASURE = (
    "import os, subprocess, sys\n"
    "proc = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "proc.returncode = 0\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss * 1024))\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "sys.exit(code if code >= 0 else 128 - code)\n"
)


def run_measured(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, int]:
    """Run the CLI as its own process: exit code, output, and its peak RSS in bytes (from the
    kernel's accounting of that one child, ``wait4``, in a small process that started it)."""
    peak = cwd / "cli.peak"
    with (cwd / "cli.out").open("w+") as out:
        code = subprocess.call(
            [sys.executable, "-c", _MEASURE, str(peak), *argv],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.seek(0)
        text = out.read()
    return code, text, int(peak.read_text())


def test_a_gzip_bomb_on_every_call_stops_the_run_in_bounded_memory(
    items: Items, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    ids = seed(items, paint(tmp_path, hues(6)))
    standin.inject("gzip_bomb", times=FOREVER, endpoint="chat")

    code, output, peak = run_measured(
        [*CLI, "--concurrent", "4"], cli_env(items, standin), tmp_path
    )

    assert code == 4, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "DASHSCOPE_MAX_ANSWER_BYTES" in errors[0] and "run again later" in errors[0]
    assert "Traceback" not in output and "MemoryError" not in output
    bombs = sum(1 for r in list(standin.requests) if r["fault"] == "gzip_bomb")
    assert bombs >= 3, "the run gave up after call after call was too large"
    assert peak < PEAK_RSS_BOUND < BOMB_INFLATED, f"peak RSS {peak / 2**20:.0f} MiB"
    untouched_and_pending(items, store, ids)


def test_a_huge_answer_on_every_call_stops_the_run_charging_no_row(
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = seed(items, paint(tmp_path, hues(3)))
    standin.inject("huge_answer", times=FOREVER, endpoint="chat")

    code, report = run_cli(["--user-id", "alice", "--concurrent", "1"])

    err = capsys.readouterr().err.strip()
    assert code == 4, report
    assert err.count("\n") == 0 and err.startswith("error: run stopped: "), err
    assert "sending answers over DASHSCOPE_MAX_ANSWER_BYTES" in err
    assert "more than DASHSCOPE_MAX_ANSWER_BYTES=4194304 bytes" in err
    untouched_and_pending(items, store, ids)


def test_a_huge_answer_to_one_row_charges_that_row_alone(
    env: pytest.MonkeyPatch,
    items: Items,
    store: Store,
    standin: StandIn,
    tmp_path: Path,
) -> None:
    paths = paint(tmp_path, hues(4))
    ids = seed(items, paths)
    standin.add_rule("huge_answer", color=mean_of(paths[2]), tolerance=8)
    env.setenv("DASHSCOPE_MAX_ANSWER_BYTES", str(1024 * 1024))

    code, report = run_cli(["--user-id", "alice", "--concurrent", "1"])

    assert code == 0, report
    # The provider answered the other rows: the oversized answers are that row's, one attempt.
    assert ledger(items) == [(ids[2], 1, False, "answer_too_large")]
    for n, i in enumerate(ids):
        caption = (items.row(i)["metadata"] or {}).get("caption")
        assert (caption is None) == (n == 2), (n, caption)
    assert claims(items) == 0
