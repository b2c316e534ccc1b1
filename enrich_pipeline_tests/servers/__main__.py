"""The test servers' command line.

python -m enrich_pipeline_tests.servers start PROFILE DIR   # prints URI=..., LOG=...,
                                                            # SOCKET_DIR=...; blocks until
                                                            # SIGTERM/SIGINT
python -m enrich_pipeline_tests.servers selfcheck [-v]      # starts both profiles and
                                                            # verifies them
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from enrich_pipeline_tests.servers.cluster import PROFILES, start_server
from enrich_pipeline_tests.servers.selfcheck import selfcheck


def _cmd_start(profile: str, base_dir: Path) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = start_server(profile, base_dir)
    print(f"URI={server.uri}", flush=True)
    print(f"LOG={server.log_path}", flush=True)
    print(f"SOCKET_DIR={server.socket_dir}", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                print("postgres exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m enrich_pipeline_tests.servers",
        description="Throw-away PostgreSQL 12 servers for the tests (profiles pg12 and gp6).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser(
        "start", help="start a server in DIR, print URI=, LOG=, SOCKET_DIR=, run until signalled"
    )
    start.add_argument("profile", choices=PROFILES)
    start.add_argument("dir", type=Path)
    check = commands.add_parser("selfcheck", help="start both profiles and verify them")
    check.add_argument("-v", "--verbose", action="store_true", help="print every check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "start":
        return _cmd_start(args.profile, args.dir)
    return selfcheck(verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
