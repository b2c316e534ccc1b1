"""The stand-in DashScope server in its own process, so its CPU never counts as the pipeline's.

Same options as ``python -m enrich_pipeline_tests.standin`` plus a control channel on stdin,
because the benchmark needs the request log of a server in another process:

- ``stats``: one JSON line, ``{"requests": [[arrival, endpoint, status, image_tokens], ...]}``
- ``reset``: clear the log (answers ``ok``)
- ``config LATENCY RPM [EMBEDDING_LATENCY [PER_SECOND]]``: change the latency per vision call,
  the rpm limit (``none``: no limit), the latency per embeddings call (``same``: LATENCY) and
  whether the limit is also enforced per second (``1``/``0``, as DashScope does: RPS = RPM/60),
  so one server serves every scenario (answers ``ok``)
- ``quit`` or end of input: stop.

It prints ``READY <base_url>`` once it listens.
"""

from __future__ import annotations

import argparse
import json
import sys

from enrich_pipeline_tests.standin import StandIn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="sk-bench")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rpm-limit", type=int, default=None)
    args = parser.parse_args(argv)
    server = StandIn(
        api_key=args.api_key, port=args.port, latency=args.latency, rpm_limit=args.rpm_limit
    )
    with server:
        print(f"READY {server.base_url}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                with server._lock:  # the log is appended from the server thread
                    log = [
                        [r["time"], r["endpoint"], r["status"], r.get("image_tokens", 0)]
                        for r in server.requests
                    ]
                print(json.dumps({"requests": log}), flush=True)
            elif command == "reset":
                server.reset_log()
                print("ok", flush=True)
            elif command.startswith("config "):
                _, latency, rpm, *rest = command.split()
                embedding = rest[0] if rest else "same"
                per_second = rest[1] == "1" if len(rest) > 1 else False
                with server._lock:
                    server.latency = float(latency)
                    server.rpm_limit = None if rpm == "none" else int(rpm)
                    server.embedding_latency = None if embedding == "same" else float(embedding)
                    server.per_second = per_second
                    # A new limit starts with an empty minute (one window, or one per model).
                    for name in ("_window", "_windows"):
                        window = getattr(server, name, None)
                        if window is not None:
                            window.clear()
                print("ok", flush=True)
            elif command == "quit":
                break


if __name__ == "__main__":
    main()
