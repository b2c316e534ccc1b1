"""A stand-in for DashScope's OpenAI-compatible endpoint, served on loopback, for tests and
benchmarks (never part of the product: its web stack is in the ``test`` extra).

    with StandIn(latency=0.1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)

``python -m enrich_pipeline_tests.standin`` runs it by hand. The modules, one concern each:
``server`` (``StandIn``: knobs, lifecycle, fault control), ``online`` (chat and embeddings on
the wire), ``answers`` (request checks and success bodies), ``tokens`` (token counting),
``limits`` (per-minute and per-second rate limits), ``errors`` (DashScope's error bodies),
``faults`` (injected faults and hostile content), ``batch`` and ``batch_files`` (the Batch API).
"""

from enrich_pipeline_tests.standin.server import StandIn

__all__ = ["StandIn"]
