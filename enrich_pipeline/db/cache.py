"""The answer cache: answers by image content, model, prompt version, answer format and caption
languages, so that the same image is never paid twice, across rows, users and runs.

An entry holds the first language's caption and the whole answer as JSON
(``structured.Answer.to_json``); an entry without one (``answer`` NULL: a plain English caption
cached before structured answers) is read as that caption with tags by the keyword rules."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.enrichment.structured import Answer, MalformedAnswer

log = logging.getLogger(__name__)


class CaptionCacheRows:
    """Statements on ``enrich_answer_cache``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def cached_answers(
        self,
        shas: Iterable[str],
        *,
        model: str,
        prompt_version: str,
        answer_format: str,
        languages: Sequence[str],
    ) -> dict[str, Answer]:
        """The cached answers of these images under this key; a failed lookup, or an entry
        that cannot be read, is a miss."""
        query = sql.SQL(
            "SELECT content_sha256, caption, answer FROM {c} WHERE model = %(model)s"
            " AND prompt_version = %(pv)s AND answer_format = %(fmt)s AND languages = %(langs)s"
            " AND content_sha256 = ANY(%(shas)s::text[])"
        ).format(c=self.db.t("enrich_answer_cache"))
        wanted = sorted(set(shas))
        if not wanted:
            return {}
        codes = tuple(languages)
        try:
            with self.db.connection() as conn:
                rows = conn.execute(
                    query,
                    {
                        "model": model,
                        "pv": prompt_version,
                        "fmt": answer_format,
                        "langs": ",".join(codes),
                        "shas": wanted,
                    },
                ).fetchall()
        except psycopg.Error as exc:  # PoolTimeout included
            # The cache saves money; it must never cost a row. A failed lookup is a miss.
            log.warning("answer cache lookup failed, treated as a miss: %s", exc)
            return {}
        found: dict[str, Answer] = {}
        for sha, caption, answer in rows:
            try:
                found[sha] = Answer.from_cache(caption, answer, answer_format, codes)
            except MalformedAnswer as exc:
                log.warning("answer cache entry %s unreadable, treated as a miss: %s", sha, exc)
        return found

    def cache_answer(
        self, sha: str, answer: Answer, *, model: str, prompt_version: str, languages: Sequence[str]
    ) -> None:
        """Remember a paid answer at once, before the chunk is written, so a crash keeps it."""
        try:
            self.cache_answers(
                [(sha, answer)], model=model, prompt_version=prompt_version, languages=languages
            )
        except psycopg.Error as exc:
            log.warning("answer not cached (%s); it is still written with its chunk", exc)

    def cache_answers(
        self,
        answers: Sequence[tuple[str, Answer]],
        *,
        model: str,
        prompt_version: str,
        languages: Sequence[str],
    ) -> None:
        """Remember many paid answers, ``(content_sha256, answer)``, in one statement; each
        keyed by the format it was given in."""
        if not answers:
            return
        query = sql.SQL(
            "INSERT INTO {c} (content_sha256, model, prompt_version, answer_format, languages,"
            " caption, answer) SELECT DISTINCT ON (x.sha, x.fmt) x.sha, %(model)s, %(pv)s,"
            " x.fmt, %(langs)s, x.caption, x.answer"
            " FROM unnest(%(shas)s::text[], %(fmts)s::text[], %(captions)s::text[],"
            " %(answers)s::text[]) AS x(sha, fmt, caption, answer)"
            " ON CONFLICT DO NOTHING"
        ).format(c=self.db.t("enrich_answer_cache"))
        params = {
            "model": model,
            "pv": prompt_version,
            "langs": ",".join(languages),
            "shas": [s for s, _ in answers],
            "fmts": [a.answer_format for _, a in answers],
            "captions": [a.caption for _, a in answers],
            "answers": [a.to_json() for _, a in answers],
        }
        with self.db.connection() as conn:
            conn.execute(query, params)
