"""The shared stop-signal handling of the commands (``cli/stopping.py``), in this process."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from enrich_pipeline.cli.stopping import Stopped, exit_code, stop_signals, stops_cleanly


@pytest.fixture
def default_dispositions() -> Iterator[None]:
    """SIGTERM and SIGHUP at their defaults (what a command starts with), restored after."""
    saved = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]
)
def test_each_stop_signal_raises_a_keyboard_interrupt_that_names_it(
    default_dispositions: None, signum: signal.Signals, code: int
) -> None:
    with pytest.raises(KeyboardInterrupt) as raised, stop_signals():
        signal.raise_signal(signum)
    assert isinstance(raised.value, Stopped) and raised.value.signum == signum
    assert exit_code(raised.value) == code


def test_a_second_signal_while_stopping_does_not_cut_the_cleanup_short(
    default_dispositions: None,
) -> None:
    cleaned = False
    with pytest.raises(Stopped), stop_signals():
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            signal.raise_signal(signal.SIGTERM)  # ignored: the cleanup runs on
            cleaned = True
    assert cleaned


def test_the_dispositions_are_restored_and_an_ignored_signal_stays_ignored(
    default_dispositions: None,
) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    with stop_signals():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)
        assert callable(signal.getsignal(signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_command_stopped_by_a_signal_prints_one_line_and_returns_128_plus_it(
    default_dispositions: None, capsys: pytest.CaptureFixture[str]
) -> None:
    @stops_cleanly
    def main() -> int:
        signal.raise_signal(signal.SIGTERM)
        return 0

    assert main() == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stopped by SIGTERM: "), err
