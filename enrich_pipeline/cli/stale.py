"""``enrich-captions``' commands and lines about captions that follow their image: how many rows
are stale, ``--adopt`` (record the current image and text of the pipeline's captions from
before image or text digests, no call) and ``--forget-cache`` (remove answers from the cache,
mark the rows they fed stale). Neither command calls a model or needs ``DASHSCOPE_API_KEY``."""

from __future__ import annotations

import argparse
from typing import TextIO

from enrich_pipeline.db.stale import StaleCounts
from enrich_pipeline.db.store import Store
from enrich_pipeline.settings import ConfigError

_WHAT_HAPPENS = {
    "recaption": "re-captioned with the pending ones",
    "flag": "flagged caption_stale, no call",
    "ignore": "left as they are",
}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adopt",
        action="store_true",
        help="record the current image and text of captions the pipeline wrote before image "
        "digests (of --user-id, or all) as the ones captioned, so a later image change or "
        "edit is noticed; no model call, and exit",
    )
    p.add_argument(
        "--forget-cache",
        action="store_true",
        help="remove the cached answers of --model, --prompt-version and/or --content-sha256 "
        "(every one given must match) and mark the rows whose caption came from them stale "
        "(ENRICH_ON_IMAGE_CHANGE says what happens to them next); no model call, and exit",
    )
    p.add_argument("--model", help="with --forget-cache: the model whose answers are forgotten")
    p.add_argument(
        "--prompt-version",
        help="with --forget-cache: the prompt version whose answers are forgotten",
    )
    p.add_argument(
        "--content-sha256",
        help="with --forget-cache: the image content (SHA-256 hex, as recorded in "
        "caption_content_sha256) whose answers are forgotten",
    )


def check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations that cannot mean what they say, before anything is opened."""
    forget_by = (args.model, args.prompt_version, args.content_sha256)
    if args.adopt and args.forget_cache:
        raise ConfigError("--adopt and --forget-cache are two commands: run them one at a time")
    if not args.forget_cache and any(v is not None for v in forget_by):
        raise ConfigError("--model, --prompt-version and --content-sha256 go with --forget-cache")
    if args.forget_cache:
        if all(v is None for v in forget_by):
            raise ConfigError(
                "--forget-cache needs --model, --prompt-version or --content-sha256 "
                "(forgetting every answer would re-caption the whole table)"
            )
        if any(v is not None and not v.strip() for v in forget_by):
            raise ConfigError("--model, --prompt-version and --content-sha256 must not be empty")
        if args.user_id is not None:
            raise ConfigError(
                "--forget-cache is for every user: the cache is shared, an answer it forgets "
                "can no longer serve any row"
            )


def adopt(store: Store, user_id: str | None, out: TextIO) -> int:
    done = store.items.adopt_captions(user_id)
    who = f"user {user_id!r}" if user_id is not None else "every user"
    print(
        f"Adopted {done.images} caption(s) of {who} written by the pipeline before image "
        "digests: their current image is recorded as the one captioned, their current text as "
        "the pipeline's (no model call).",
        file=out,
    )
    if done.texts or done.edited:
        print(
            f"Recorded the text of {done.texts + done.edited} caption(s) written before text "
            f"digests; {done.edited} of them edited by a person, kept as theirs (never "
            "replaced).",
            file=out,
        )
    return 0


def forget(store: Store, args: argparse.Namespace, mode: str, out: TextIO) -> int:
    given = {
        "model": args.model,
        "prompt version": args.prompt_version,
        "content sha256": args.content_sha256,
    }
    done = store.items.forget_answers(
        model=args.model, prompt_version=args.prompt_version, content_sha256=args.content_sha256
    )
    which = ", ".join(f"{k} {v!r}" for k, v in given.items() if v is not None)
    print(
        f"Forgot {done.cache_entries} cached answer(s) of {which}; marked {done.rows_marked} "
        f"row(s) of {done.users} user(s) captioned from them stale "
        f"(ENRICH_ON_IMAGE_CHANGE={mode}: {_WHAT_HAPPENS[mode]}).",
        file=out,
    )
    if mode != "recaption" and done.rows_marked:
        print(
            "Note: they are re-captioned only with ENRICH_ON_IMAGE_CHANGE=recaption (the default).",
            file=out,
        )
    return 0


def stale_line(counts: StaleCounts, mode: str) -> str | None:
    """The report's line about stale rows, or None when there are none."""
    if not counts.stale:
        return None
    flagged = f", {counts.flagged} flagged" if counts.flagged else ""
    return (
        f"Stale items: {counts.stale} (image changed since captioned{flagged}; "
        f"ENRICH_ON_IMAGE_CHANGE={mode}: {_WHAT_HAPPENS[mode]})"
    )
