"""Captions that follow their image: stale rows counted and flagged, pipeline captions from
before image (or text) digests adopted, answer-cache entries forgotten with the rows they fed
marked stale.

Every statement sets or removes a metadata key or two in portable SQL: ``jsonb_each`` and
``json_object_agg`` only (no ``jsonb ||``, ``jsonb_set``, ``to_jsonb``, ``jsonb_build_object``:
AnalyticDB 6.0 lacks them), the value built as JSON text, one level of correlation. Large
tables are worked through in batches of ids (keyset order), each its own transaction, so a
million rows never hold one long lock. Only ``metadata`` and ``updated_at`` of a row change.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db
from enrich_pipeline.db.pending import FLAGGED, PIPELINES_CAPTION, STALE, stale_rows

# What a forgotten answer's rows record as their image digest: never an MD5 in hex, so the row
# is stale whatever its image, until a new caption records the real digest.
FORGOTTEN = "forgotten"
DIGEST_KEY = "caption_image_digest"
TEXT_DIGEST_KEY = "caption_text_digest"
# What an adopted caption records as its text digest when a person had already edited it: never
# an MD5 in hex, so the caption is the person's (never stale, never replaced) whatever its text.
EDITED = "edited"
STALE_FLAG = "caption_stale"

_OBJECT = sql.SQL("jsonb_typeof(i.metadata) = 'object'")
# Pipeline captions from before digests: a model recorded, no digest, a caption and an image.
_UNADOPTED = sql.SQL(
    "i.metadata ? 'caption_model' AND NOT i.metadata ? 'caption_image_digest'"
    " AND COALESCE(i.metadata->>'caption', '') <> '' AND i.image IS NOT NULL"
)
# Pipeline captions from before text digests (an image digest, no text digest).
_TEXT_UNRECORDED = (
    "i.metadata ? 'caption_image_digest' AND NOT i.metadata ? 'caption_text_digest'"
    " AND COALESCE(i.metadata->>'caption', '') <> ''"
)
# Of those, the ones a person edited: the pipeline wrote ``caption`` as one of the values of
# ``caption_i18n`` (the first language's), and an edit changes ``caption`` alone.
_EDITED = (
    "jsonb_typeof(i.metadata->'caption_i18n') = 'object' AND NOT EXISTS (SELECT 1"
    " FROM jsonb_each_text(i.metadata->'caption_i18n') AS t WHERE t.value = i.metadata->>'caption')"
)
_TEXT_UNEDITED = sql.SQL(f"{_TEXT_UNRECORDED} AND NOT ({_EDITED})")
_TEXT_EDITED = sql.SQL(f"{_TEXT_UNRECORDED} AND {_EDITED}")
_MD5_OF = "('\"' || md5({}) || '\"')::jsonb"


@dataclass(frozen=True)
class StaleCounts:
    stale: int = 0
    # Of those: flagged ``caption_stale`` (ENRICH_ON_IMAGE_CHANGE=flag).
    flagged: int = 0


@dataclass(frozen=True)
class Adopted:
    """What ``adopt_captions`` recorded."""

    # Captions from before image digests: the current image and text recorded as captioned.
    images: int = 0
    # Captions from before text digests (their image digest kept): the text recorded...
    texts: int = 0
    # ... or, a person having edited it, ``edited``: the caption is theirs from now on.
    edited: int = 0


@dataclass(frozen=True)
class Forgotten:
    """What ``forget_answers`` removed and marked."""

    cache_entries: int
    rows_marked: int
    users: int


def _with_key(key: str, value: sql.Composable, *more: tuple[str, sql.Composable]) -> sql.Composed:
    """``i.metadata`` with ``key`` set to ``value`` (a jsonb expression), and each further
    (key, value) of ``more``, every other key kept."""
    keys = [key, *(k for k, _ in more)]
    return sql.SQL(
        "(SELECT json_object_agg(m.key, m.value)::jsonb FROM ("
        " SELECT o.key, o.value FROM jsonb_each(i.metadata) AS o WHERE o.key <> ALL({keys})"
        " {values}) AS m)"
    ).format(
        keys=sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, keys))),
        values=sql.SQL(" ").join(
            sql.SQL("UNION ALL SELECT {}, {}").format(sql.Literal(k), v)
            for k, v in [(key, value), *more]
        ),
    )


def _without_key(key: str) -> sql.Composed:
    return sql.SQL(
        "(SELECT COALESCE(json_object_agg(o.key, o.value), '{{}}'::json)::jsonb"
        " FROM jsonb_each(i.metadata) AS o WHERE o.key <> {key})"
    ).format(key=sql.Literal(key))


def _user_scope(user_id: str | None) -> sql.Composable:
    return sql.SQL("TRUE") if user_id is None else sql.SQL("i.user_id = %(user)s")


class StaleRows:
    """Statements on stale rows and on what captions record of their making (part of
    ``ItemRows``)."""

    db: Database

    @retry_db
    def count_stale(self, user_id: str | None = None) -> StaleCounts:
        """Stale rows (of one user, or all), and how many of them are flagged."""
        query = sql.SQL(
            "SELECT count(*), sum(CASE WHEN {flagged} THEN 1 ELSE 0 END) FROM {items} i"
            " WHERE {scope} AND {stale}"
        ).format(
            items=self.db.items,
            flagged=FLAGGED,
            scope=_user_scope(user_id),
            stale=stale_rows(self.db),
        )
        with self.db.connection() as conn:
            row = conn.execute(query, {"user": user_id}).fetchone()
        return StaleCounts(int(row[0] or 0), int(row[1] or 0)) if row else StaleCounts()

    @retry_db
    def flag_stale(self, user_id: str) -> tuple[int, int]:
        """``ENRICH_ON_IMAGE_CHANGE=flag``: mark the user's stale rows ``caption_stale: true``
        (no model call), and take the mark off rows no longer stale (their image changed back).
        Conditional in SQL, so a caption written meanwhile is never marked. Returns (flagged,
        unflagged)."""
        flag_sql = sql.SQL(
            "UPDATE {items} AS i SET metadata = {flagged}, updated_at = now()"
            " WHERE i.user_id = %(user)s AND {stale} AND {obj}"
            " AND COALESCE({is_flagged}, false) = false"
        ).format(
            items=self.db.items,
            flagged=_with_key(STALE_FLAG, sql.SQL("'true'::jsonb")),
            stale=STALE,
            obj=_OBJECT,
            is_flagged=FLAGGED,
        )
        unflag_sql = sql.SQL(
            "UPDATE {items} AS i SET metadata = {unflagged}, updated_at = now()"
            " WHERE i.user_id = %(user)s AND {is_flagged} AND {obj}"
            " AND NOT COALESCE(({stale}), false)"
        ).format(
            items=self.db.items,
            unflagged=_without_key(STALE_FLAG),
            stale=STALE,
            obj=_OBJECT,
            is_flagged=FLAGGED,
        )
        with self.db.connection() as conn, conn.transaction():
            flagged = conn.execute(flag_sql, {"user": user_id}).rowcount
            unflagged = conn.execute(unflag_sql, {"user": user_id}).rowcount
        return max(flagged, 0), max(unflagged, 0)

    def adopt_captions(self, user_id: str | None = None, *, batch: int = 5000) -> Adopted:
        """Record what the pipeline's older captions were made from, no call, the digests
        computed in SQL (``md5``):

        - captions from before image digests (``caption_model`` without
          ``caption_image_digest``): the current image as the one captioned and the current
          caption as the pipeline's text. Nothing tells a person's edit of such a caption from
          the pipeline's text: adopting declares it the pipeline's;
        - captions from before text digests (an image digest, no ``caption_text_digest``): the
          current caption as the pipeline's text, their image digest kept (a row stale now
          stays stale); but ``edited`` where ``caption`` is none of ``caption_i18n``'s values,
          which the pipeline wrote together: a person has edited it, and it stays theirs.
        """
        image = sql.SQL(_MD5_OF).format(sql.SQL("i.image"))
        text = sql.SQL(_MD5_OF).format(sql.SQL("i.metadata->>'caption'"))
        edited = sql.SQL("{}::jsonb").format(sql.Literal(json.dumps(EDITED)))
        with_both = _with_key(DIGEST_KEY, image, (TEXT_DIGEST_KEY, text))
        return Adopted(
            images=sum(self._set_in_batches(_UNADOPTED, with_both, {}, user_id, batch)),
            texts=sum(
                self._set_in_batches(
                    _TEXT_UNEDITED, _with_key(TEXT_DIGEST_KEY, text), {}, user_id, batch
                )
            ),
            edited=sum(
                self._set_in_batches(
                    _TEXT_EDITED, _with_key(TEXT_DIGEST_KEY, edited), {}, user_id, batch
                )
            ),
        )

    def forget_answers(
        self,
        *,
        model: str | None = None,
        prompt_version: str | None = None,
        content_sha256: str | None = None,
        batch: int = 5000,
    ) -> Forgotten:
        """Delete the answer-cache entries of this model / prompt version / image content (the
        ones given, all of them must match) and mark every row whose caption came from such an
        answer (the same ``caption_model`` / ``caption_prompt_version`` /
        ``caption_content_sha256``) stale: its recorded image digest becomes ``forgotten``,
        which no image matches, so ``ENRICH_ON_IMAGE_CHANGE`` decides what happens to it next
        (by default it is re-captioned, and the removed answer cannot serve it again). A
        caption a person edited is left alone: it no longer says what the answer said."""
        given = {
            "model": model,
            "prompt_version": prompt_version,
            "content_sha256": content_sha256,
        }
        if all(v is None for v in given.values()):
            raise ValueError("forgetting answers needs a model, a prompt version or a content hash")
        keys = {"model": "model", "prompt_version": "prompt_version", "content_sha256": "sha"}
        cache_where = sql.SQL(" AND ").join(
            sql.SQL("{} = %({})s").format(sql.Identifier(col), sql.SQL(keys[col]))
            for col, v in given.items()
            if v is not None
        )
        recorded = {
            "model": "caption_model",
            "prompt_version": "caption_prompt_version",
            "content_sha256": "caption_content_sha256",
        }
        rows_where = sql.SQL(" AND ").join(
            [
                sql.SQL(
                    "i.metadata ? 'caption_model' AND COALESCE(i.metadata->>'caption', '') <> ''"
                ),
                # A caption a person edited is theirs: no forgotten answer makes it stale.
                PIPELINES_CAPTION,
                *(
                    sql.SQL("i.metadata->>{} = %({})s").format(
                        sql.Literal(recorded[col]), sql.SQL(keys[col])
                    )
                    for col, v in given.items()
                    if v is not None
                ),
                sql.SQL("i.metadata->>'caption_image_digest' IS DISTINCT FROM {}").format(
                    sql.Literal(FORGOTTEN)
                ),
            ]
        )
        params = {"model": model, "prompt_version": prompt_version, "sha": content_sha256}
        delete_sql = sql.SQL("DELETE FROM {c} WHERE {where}").format(
            c=self.db.t("enrich_answer_cache"), where=cache_where
        )
        # The cache first: a run between the two steps then pays for a new answer rather than
        # being served the forgotten one again.
        with self.db.connection() as conn:
            entries = max(conn.execute(delete_sql, params).rowcount, 0)
        marked = sql.SQL("{}::jsonb").format(sql.Literal(json.dumps(FORGOTTEN)))
        users: set[str] = set()
        rows = 0
        for n, batch_users in self._set_in_batches(
            rows_where, _with_key(DIGEST_KEY, marked), params, None, batch, with_users=True
        ):
            rows += n
            users.update(batch_users)
        return Forgotten(entries, rows, len(users))

    def _set_in_batches(
        self,
        where: sql.Composable,
        metadata: sql.Composable,
        params: dict,
        user_id: str | None,
        batch: int,
        *,
        with_users: bool = False,
    ) -> Iterator[Any]:
        """Set ``metadata`` on the rows ``where`` holds, ``batch`` ids at a time in id order
        (each batch one short transaction); yields the rows changed per batch (and their
        users, ``with_users``)."""
        condition = sql.SQL("{scope} AND {obj} AND {where}").format(
            scope=_user_scope(user_id), obj=_OBJECT, where=where
        )
        ids_sql = sql.SQL(
            "SELECT i.id::text, i.user_id FROM {items} i WHERE {cond} AND i.id IS NOT NULL"
            " AND (%(after)s::text IS NULL OR {i_id} > %(after)s::{idt})"
            " ORDER BY {i_id} LIMIT %(batch)s"
        ).format(items=self.db.items, cond=condition, i_id=self.db.i_id, idt=self.db.id_cast)
        update_sql = sql.SQL(
            "UPDATE {items} AS i SET metadata = {metadata}, updated_at = now()"
            " WHERE {match} AND {cond}"
        ).format(
            items=self.db.items,
            metadata=metadata,
            match=self.db.id_match("ids"),
            cond=condition,
        )
        after: str | None = None
        while True:
            base = {**params, "user": user_id, "after": after, "batch": batch}
            with self.db.connection() as conn, conn.transaction():
                found = conn.execute(ids_sql, base).fetchall()
                if not found:
                    return
                changed = conn.execute(update_sql, {**base, "ids": [r[0] for r in found]})
                count = max(changed.rowcount, 0)
            after = found[-1][0]
            yield (count, {str(r[1]) for r in found}) if with_users else count
