"""``python -m enrich_pipeline_tests.standin``: the stand-in DashScope server, run by hand."""

from __future__ import annotations

import argparse
import time

from enrich_pipeline_tests.standin.server import StandIn
from enrich_pipeline_tests.standin.tokens import IMAGE_TOKEN_RULES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m enrich_pipeline_tests.standin",
        description="Run the DashScope stand-in server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default="sk-standin")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument(
        "--embedding-latency", type=float, default=None, help="seconds per embeddings call"
    )
    parser.add_argument("--rpm-limit", type=int, default=None, help="requests/minute, per model")
    parser.add_argument("--tpm-limit", type=int, default=None, help="tokens/minute, per model")
    parser.add_argument(
        "--per-second", action="store_true", help="also enforce RPM/60 and TPM/60 per second"
    )
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--trickle-interval", type=float, default=1.0)
    parser.add_argument(
        "--text-only-model",
        dest="text_only_models",
        action="append",
        default=[],
        help="a model that refuses images (repeatable)",
    )
    parser.add_argument("--image-token-rule", choices=IMAGE_TOKEN_RULES, default="dashscope")
    parser.add_argument(
        "--batch-delay", type=float, default=0.0, help="seconds a batch takes to complete"
    )
    parser.add_argument(
        "--echo-key", action="store_true", help="repeat the request's credentials in errors"
    )
    args = parser.parse_args(argv)
    with StandIn(**vars(args)) as server:
        print(f"DashScope stand-in listening on {server.base_url}", flush=True)
        print(f"export DASHSCOPE_BASE_URL={server.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
