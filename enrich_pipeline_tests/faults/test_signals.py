"""Stop signals: ``enrich-captions`` stopped by SIGTERM (systemd, Kubernetes, ``timeout``) or
SIGINT (Ctrl-C) mid-run, as a real process.

The signal is sent while captions are on the wire and a chunk is already written, so the stop
has paid answers in flight, written rows to keep and claimed rows to give back. What the user
sees: the statistics, one ``stopped by`` line, exit 128 + the signal, no traceback. What is left:
the written chunks, every paid caption in the cache, no claim. The rerun pays nothing twice.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enrich_pipeline.cli import captions as cli
from enrich_pipeline_tests.faults.test_process import (
    CALL_TIMEOUT,
    InFlight,
    count,
    is_complete,
    seed,
)
from enrich_pipeline_tests.helpers import (
    API_KEY,
    Items,
    cli_env,
    good_chat_calls,
    hues,
    log_writes,
    paint,
    writes,
)
from enrich_pipeline_tests.standin import StandIn

# Room for a loaded two-core machine: a Python start and a first chunk can take tens of seconds.
SIGNAL_POINT_WITHIN = 180.0
STOP_WITHIN = 60.0
# Long: claims the stopped run left would still be held when the test looks.
LEASE = 600
IMAGES = 12


@pytest.fixture(scope="module")
def slow_server() -> Iterator[tuple[StandIn, InFlight]]:
    """A private stand-in whose captions take a second, so a signal finds some on the wire."""
    server = StandIn(api_key=API_KEY, latency=1.0, embedding_latency=0.05)
    wrapper = InFlight(server.app)
    server.app = wrapper
    with server:
        yield server, wrapper


def command(user: str = "alice") -> list[str]:
    return [
        *("--user-id", user, "--batch-size", "2", "--max-items", "0"),
        *("--concurrent", "2", "--lease-seconds", str(LEASE)),
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_mid_run_releases_claims_keeps_paid_captions_and_says_so_in_one_line(
    signum: signal.Signals,
    items: Items,
    slow_server: tuple[StandIn, InFlight],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, wire = slow_server
    server.clear_faults()
    server.reset_log()
    paths = paint(tmp_path / "img", hues(IMAGES))
    ids, before = seed(items, paths)
    log_writes(items)
    env = cli_env(items, server, DASHSCOPE_TIMEOUT=str(CALL_TIMEOUT))

    argv = [sys.executable, "-m", "enrich_pipeline.cli.captions", *command()]
    proc = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + SIGNAL_POINT_WITHIN
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never had a chunk written and calls open"
            with wire.lock:
                chat_open = wire.open["chat"]
            paid_then = good_chat_calls(server)
            if chat_open >= 1 and len(writes(items)) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=STOP_WITHIN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    # What the user sees: the statistics, then one line on stderr; the shell's exit code.
    assert proc.returncode == 128 + signum, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {signum.name}: "), stderr
    assert "claims released" in lines[0] and "run again" in lines[0]
    assert "Statistics:" in stdout

    # What is left: written rows complete, every other row untouched and free to take, nothing
    # failed, and every caption paid for (the ones in flight at the signal too) in the cache.
    written = writes(items)
    assert 2 <= len(written) < IMAGES and set(written.values()) == {1}
    for i in ids:
        md = items.row(i)["metadata"]
        assert is_complete(md, before[i]) if i in written else md == before[i], md
    assert count(items, "enrich_claims") == 0
    assert count(items, "enrich_failures") == 0
    # The calls on the wire at the signal were let finish: each is a caption in the cache.
    paid = good_chat_calls(server)
    assert paid >= paid_then + chat_open
    assert count(items, "enrich_answer_cache") == paid
    assert f"{len(written)} row(s) written" in lines[0]

    # The rerun (in-process: a second interpreter start buys nothing) pays only for the rest.
    for name in [n for n in os.environ if n.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    assert cli.main(command(), out=out) == 0, out.getvalue()
    assert writes(items) == dict.fromkeys(ids, 1)
    assert good_chat_calls(server) == IMAGES == len({p.read_bytes() for p in paths})
    assert count(items, "enrich_claims") == 0


def test_sigterm_while_a_search_waits_on_the_provider_is_one_line_and_exit_143(
    items: Items, slow_server: tuple[StandIn, InFlight], tmp_path: Path
) -> None:
    server, wire = slow_server
    server.clear_faults()
    server.inject("timeout", endpoint="embeddings")  # the query's embedding hangs
    argv = [sys.executable, "-m", "enrich_pipeline.cli.search", "red shoes", "--user-id", "alice"]
    proc = subprocess.Popen(
        argv,
        env=cli_env(items, server, DASHSCOPE_TIMEOUT=str(CALL_TIMEOUT)),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + SIGNAL_POINT_WITHIN
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the search never called the provider"
            with wire.lock:
                if wire.open["embeddings"] >= 1:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=STOP_WITHIN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.clear_faults()
    assert proc.returncode == 143, (stdout, stderr)
    assert stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("stopped by SIGTERM: "), stderr
