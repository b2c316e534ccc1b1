"""``enrich-search --relevance``: recall@5 and MRR of each ranking mode on the labelled set.

The set's ten drawings are rows of their own table (``relevance_items``) in their own namespace
(``enrich_relevance`` unless ``--relevance-namespace`` says otherwise), so neither the user's
items nor their search results are touched. The first run captions and embeds them with the
configured provider, like any run (paid: ten captions, ten caption embeddings, ten image
embeddings when an image model is set); later runs reuse them and pay only for the queries'
embeddings. Images are ``data:`` URLs, readable on every server and never fetched.
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import TextIO

import psycopg

from enrich_pipeline.bootstrap import open_runtime
from enrich_pipeline.db import embedded
from enrich_pipeline.db.samples import create_sample_table, insert_sample_items, titled_rows
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.pipeline.relevance import (
    MRR_DEPTH,
    RECALL_AT,
    SET_USER,
    Evaluation,
    Query,
    evaluate,
    load_set,
)
from enrich_pipeline.pipeline.search import Mode
from enrich_pipeline.settings import ConfigError, Settings

DEFAULT_NAMESPACE = "enrich_relevance"
TABLE = "relevance_items"


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--relevance",
        action="store_true",
        help="caption and embed the labelled sample set (once, in a namespace of its own), run "
        "its queries in every ranking mode and print recall@5 and MRR, and exit",
    )
    parser.add_argument(
        "--relevance-set", metavar="FILE", help="a labelled set of your own (same JSON shape)"
    )
    parser.add_argument(
        "--relevance-namespace",
        metavar="SCHEMA",
        help=f"where the set's table lives (default {DEFAULT_NAMESPACE})",
    )


def sample_data_url(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    draw_sample(shape, fg, bg).save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def set_rows(settings: Settings) -> dict[str, str]:
    """Create the set's table and its missing rows; returns title -> item id."""
    rows = {
        embedded.sample_title(n, user, shape): (shape, fg, bg)
        for n, (user, shape, fg, bg) in enumerate(embedded.SAMPLES, start=1)
    }
    db = settings.db
    with psycopg.connect(db.conninfo.get_secret_value(), autocommit=True) as conn:
        create_sample_table(conn, db.namespace, db.table)
        have = titled_rows(conn, db.namespace, db.table, SET_USER)
        missing = [
            (SET_USER, sample_data_url(*drawing), "active", {"title": title, "source": "relevance"})
            for title, drawing in rows.items()
            if title not in have
        ]
        if missing:
            insert_sample_items(conn, db.namespace, db.table, missing)
        return {
            t: i
            for t, i in titled_rows(conn, db.namespace, db.table, SET_USER).items()
            if t in rows
        }


def run(settings: Settings, out: TextIO, *, set_path: str | None, namespace: str | None) -> int:
    try:
        queries = load_set(set_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--relevance-set: {exc}") from None
    db = settings.db.with_(namespace=namespace or DEFAULT_NAMESPACE, table=TABLE)
    settings = settings.with_(db=embedded.resolve(db, seed=False))
    try:
        ids = set_rows(settings)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"the relevance set needs a table of its own: {str(exc).splitlines()[0]}; grant "
            f"CREATE on the database, or name a schema you own with --relevance-namespace"
        ) from None
    runtime = open_runtime(settings, seed=False)
    try:
        provider = runtime.provider
        stats = runtime.engine().enrich(SET_USER)
        done = stats.succeeded + stats.failed
        out.write(
            f"Relevance set: {len(ids)} sample drawings in {db.namespace}.{db.table} "
            + (f"({done} captioned this run)" if done else "(captioned by an earlier run)")
            + "\n"
        )
        modes: list[Mode] = ["caption"]
        if provider.image_embedding_model:
            modes += ["image", "both"]
        evaluation = evaluate(runtime.store, provider, queries, ids, modes)
        api = runtime.settings.dashscope
        out.write(
            f"captions: {provider.model_label}; caption vectors: {provider.embedding_model}"
            f" ({api.embedding_dimensions} dims); image vectors: "
            + (
                f"{provider.image_embedding_model} ({provider.image_embedding_dimensions} dims)"
                if provider.image_embedding_model
                else "off (set ENRICH_IMAGE_EMBEDDING_MODEL for the image and both modes)"
            )
            + "\n"
        )
        out.write(report(evaluation, queries))
        out.write(misses(evaluation, queries))
    finally:
        runtime.close()
    return 0


def report(evaluation: Evaluation, queries: list[Query]) -> str:
    """The figures as a table: each mode's recall@5 and MRR over all queries and by kind."""
    kinds = sorted({q.kind for q in queries}, key=lambda k: (k == "like", k))
    counts = {k: sum(1 for q in queries if q.kind == k) for k in kinds}
    head = f"{'mode':<8} {'recall@' + str(RECALL_AT):>9} {'MRR':>6}"
    head += "".join(f"  {k + f' ({counts[k]})':>16}" for k in kinds)
    lines = [head, "-" * len(head)]
    for mode, figures in evaluation.overall.items():
        line = f"{mode:<8} {figures.recall:>9.2f} {figures.mrr:>6.2f}"
        for kind in kinds:
            part = evaluation.by_kind[(mode, kind)]
            line += f"  {f'{part.recall:.2f} / {part.mrr:.2f}':>16}"
        lines.append(line)
    lines.append(
        f"{len(queries)} queries; by kind: recall@{RECALL_AT} / MRR (first relevant hit within "
        f"the first {MRR_DEPTH})"
    )
    return "\n".join(lines) + "\n"


def misses(evaluation: Evaluation, queries: list[Query], shown: int = 3) -> str:
    """The queries whose first hit is not relevant, per mode, with what came first: where to
    look when a figure is low."""
    lines = []
    for mode in evaluation.overall:
        for query in queries:
            ranked = evaluation.rankings[(mode, query.label)]
            if ranked and ranked[0] in query.relevant:
                continue
            first = ", ".join(ranked[:shown]) or "nothing"
            lines.append(f"  {mode}: {query.label!r} -> {first}")
    if not lines:
        return "Every query's first hit is relevant in every mode.\n"
    return "First hit not relevant:\n" + "\n".join(lines) + "\n"
