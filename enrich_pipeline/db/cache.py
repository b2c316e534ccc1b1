"""The answer cache: answers by image content, model, prompt version, answer format and caption
languages, so that the same image is never paid twice, across rows, users and runs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database

log = logging.getLogger(__name__)


class CaptionCacheRows:
    """Statements on ``enrich_answer_cache``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def cached_captions(
        self,
        shas: Iterable[str],
        *,
        model: str,
        prompt_version: str,
        answer_format: str = "text",
        languages: str = "en",
    ) -> dict[str, str]:
        query = sql.SQL(
            "SELECT content_sha256, caption FROM {c} WHERE model = %(model)s"
            " AND prompt_version = %(pv)s AND answer_format = %(fmt)s AND languages = %(langs)s"
            " AND content_sha256 = ANY(%(shas)s::text[])"
        ).format(c=self.db.t("enrich_answer_cache"))
        wanted = sorted(set(shas))
        if not wanted:
            return {}
        try:
            with self.db.connection() as conn:
                rows = conn.execute(
                    query,
                    {
                        "model": model,
                        "pv": prompt_version,
                        "fmt": answer_format,
                        "langs": languages,
                        "shas": wanted,
                    },
                )
                return dict(rows.fetchall())
        except psycopg.Error as exc:  # PoolTimeout included
            # The cache saves money; it must never cost a row. A failed lookup is a miss.
            log.warning("caption cache lookup failed, treated as a miss: %s", exc)
            return {}

    def cache_caption(self, sha: str, *, model: str, prompt_version: str, caption: str) -> None:
        """Remember a paid caption at once, before the chunk is written, so a crash keeps it."""
        try:
            self.cache_captions([(sha, caption)], model=model, prompt_version=prompt_version)
        except psycopg.Error as exc:
            log.warning("caption not cached (%s); it is still written with its chunk", exc)

    def cache_captions(
        self, captions: Sequence[tuple[str, str]], *, model: str, prompt_version: str
    ) -> None:
        """Remember many paid captions, ``(content_sha256, caption)``, in one statement."""
        if not captions:
            return
        query = sql.SQL(
            "INSERT INTO {c} (content_sha256, model, prompt_version, answer_format, languages,"
            " caption) SELECT DISTINCT ON (x.sha) x.sha, %(model)s, %(pv)s, 'text', 'en',"
            " x.caption"
            " FROM unnest(%(shas)s::text[], %(captions)s::text[]) AS x(sha, caption)"
            " ON CONFLICT DO NOTHING"
        ).format(c=self.db.t("enrich_answer_cache"))
        params = {
            "model": model,
            "pv": prompt_version,
            "shas": [s for s, _ in captions],
            "captions": [c for _, c in captions],
        }
        with self.db.connection() as conn:
            conn.execute(query, params)
