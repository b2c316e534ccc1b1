"""Benchmarks of the enrichment pipeline: ``python -m benchmarks.bench`` (see ``bench/``)."""
