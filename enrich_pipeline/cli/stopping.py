"""A clean stop on SIGTERM, SIGHUP and SIGINT alike, for every command.

systemd, Kubernetes and ``timeout`` stop a process with SIGTERM, a closed terminal with SIGHUP;
by default both end Python at once, with its claims held for the whole lease and the answers in
flight lost. Here they raise ``Stopped``, a ``KeyboardInterrupt``, so they take the path Ctrl-C
takes: psycopg cancels the statement in progress, the engine lets the calls in flight finish
(their captions land in the cache), writes the chunks they complete and releases the rest of its
claims. The command then prints one line and exits 128 + the signal number (130 for SIGINT, 129
for SIGHUP, 143 for SIGTERM), as a shell reports a process a signal ended.

A second signal while stopping is ignored, so that the release of the claims is not cut short;
the wait is bounded by the call timeout, and SIGKILL still ends the process at once. A signal
the process started with ignored (``nohup``, a background job's SIGINT) stays ignored.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec

P = ParamSpec("P")

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived: a ``KeyboardInterrupt`` that knows which signal it was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's convention for a process a signal ended: 128 + the signal number."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def stop_line(exc: KeyboardInterrupt, what: str) -> str:
    return f"stopped by {signal_name(exc)}: {what}"


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM, SIGHUP and SIGINT raise ``Stopped`` (once)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller in a thread has its own
        return
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise Stopped(signum)

    previous: dict[int, object] = {}
    for s in SIGNALS:
        current = signal.getsignal(s)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[s] = signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]


class StopRequested(Exception):
    """A stop signal reached a supervisor (``enrich-dagster ui`` or ``up``)."""


@contextmanager
def supervisor_signals() -> Iterator[list[int]]:
    """Within the block, the first SIGTERM, SIGINT or SIGHUP raises ``StopRequested``; later ones
    are only recorded in the list yielded, so that stopping the children is not cut short.

    Unlike ``stop_signals``, a signal the process started with ignored is taken too: a
    supervisor started as a background job (SIGINT ignored) must still stop its children. A
    caller appends to the list to make every later signal a no-op."""
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            raise StopRequested

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stops_cleanly(main: Callable[P, int]) -> Callable[P, int]:
    """``main`` under ``stop_signals``; a stop it does not report itself is one line and the
    signal's exit code, never a traceback."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        with stop_signals():
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt as exc:
                print(
                    stop_line(exc, "what was done is kept; run the command again"), file=sys.stderr
                )
                return exit_code(exc)

    return wrapper
