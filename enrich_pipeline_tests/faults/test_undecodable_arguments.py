"""Arguments that are not UTF-8 text, as Linux hands them to a program: bytes in ``argv``.

Python keeps each undecodable byte as a lone surrogate, which used to fail later, wherever the
text was encoded (a traceback and exit 1 for a ``--user-id``, "an unreadable DashScope answer"
for a search text). Every command refuses them while parsing: one line naming the argument,
exit 2, nothing opened, claimed or paid for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from enrich_pipeline_tests.helpers import API_KEY, Items
from enrich_pipeline_tests.standin import StandIn

BAD = b"al\xffice"  # "alice" with a byte that starts no UTF-8 sequence

CASES = {
    "captions": (b"captions", [b"--user-id", BAD], b"--user-id"),
    "captions-retry-failed": (b"captions", [b"--retry-failed", b"--user-id", BAD], b"--user-id"),
    "batch-submit": (b"batch", [b"submit", b"--user-id", BAD], b"--user-id"),
    "batch-status": (b"batch", [b"status", b"--user-id=" + BAD], b"--user-id"),
    "dagster-backfill-users": (b"dagster", [b"backfill", b"--users", b"bob," + BAD], b"--users"),
    "dagster-backfill-user": (b"dagster", [b"backfill", b"--user", BAD], b"--user"),
    "search-user": (b"search", [b"red shoes", b"--user-id", BAD], b"--user-id"),
    "search-text": (b"search", [b"red \xe9 shoes", b"--user-id", b"alice"], b"query"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_non_utf8_argument_is_one_line_naming_it_and_exit_2_with_nothing_touched(
    case: str, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    module, args, flag = CASES[case]
    item = items.add("alice", "/nowhere/a.png", metadata={"title": "a"})
    standin.reset_log()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADBPG_", "DASHSCOPE_"))}
    env.update(
        ADBPG_URL=items.conninfo,
        ADBPG_NAMESPACE=items.namespace,
        DASHSCOPE_API_KEY=API_KEY,
        DASHSCOPE_BASE_URL=standin.base_url,
        DAGSTER_HOME=str(tmp_path),
        ENRICH_HOME=str(tmp_path),
    )
    argv = [os.fsencode(sys.executable), b"-m", b"enrich_pipeline.cli." + module, *args]
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, timeout=120)

    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == b""
    lines = proc.stderr.decode("ascii").splitlines()  # the bytes are shown escaped
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {flag.decode()}: not valid UTF-8"), lines
    assert "Traceback" not in lines[0]
    # Refused before anything was opened: the row as it was, no pipeline table created, no call.
    assert items.row(item)["metadata"] == {"title": "a"}
    assert items.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s"
        " AND table_name LIKE 'enrich%%'",
        (items.namespace,),
    ) == [(0,)]
    assert list(standin.requests) == []
