"""Running PostgreSQL's programs (initdb, postgres) with a clean environment and checked output."""

from __future__ import annotations

import os
import re
import subprocess


def child_env() -> dict[str, str]:
    # PG* variables from the caller (PGPORT, PGDATA, ...) would silently change what initdb and
    # postgres do, and a non-C locale changes messages tests match on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", TZ="UTC")
    return env


def run_checked(argv: list[str], what: str, *, stdin: str | None = None) -> str:
    proc = subprocess.run(
        argv,
        check=False,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    # Single-user mode keeps going (exit 0) after an ERROR, hence the text check.
    if proc.returncode != 0 or re.search(r"^\S.*\b(ERROR|FATAL|PANIC):", output, re.MULTILINE):
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{output[-4000:]}")
    return output
