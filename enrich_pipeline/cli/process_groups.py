"""Process groups of the topology's processes: whether one still runs, stopping one, and telling
a recorded process from a later one that reuses its pid (``enrich-dagster up``, ``down``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping

from enrich_pipeline.cli.dagster import _signal_group
from enrich_pipeline.db import embedded


def stop_groups(groups: list[int], grace: float, reap: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to each group; whatever is left after ``grace`` is killed, and waited for (a
    killed process runs until the kernel has torn it down); ``reap``, our child, is reaped."""
    for g in groups:
        _signal_group(g, signal.SIGTERM)
    for limit, sig in ((grace, signal.SIGKILL), (10.0, None)):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(group_alive(g) for g in groups):
            time.sleep(0.1)
        if not any(group_alive(g) for g in groups):
            break
        if sig is not None:
            for g in groups:
                _signal_group(g, sig)
    if reap is not None:
        try:
            reap.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs: zombies do not count (an orphan whose new
    parent does not reap it stays one, and would hold a stop for its whole grace)."""
    if not _signal_group(pgid, 0):
        return False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def start_ticks(pid: int | None) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, who it is (a pid is
    reused, this pair is not)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def same_process(entry: Mapping[str, object] | None) -> bool:
    if not entry or not isinstance(entry.get("pid"), int):
        return False
    pid = int(entry["pid"])  # type: ignore[arg-type]
    return embedded.process_alive(pid) and start_ticks(pid) == entry.get("started")
