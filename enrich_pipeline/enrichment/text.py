"""Caption text as the provider returned it, made fit to store.

A provider's text is untrusted: it can carry NUL (PostgreSQL's ``text`` and ``jsonb`` refuse it,
so one such caption would fail the whole chunk's write), lone UTF-16 surrogates (not encodable as
UTF-8: the write, or the cache insert, raises), terminal escapes and other control characters
(they garble logs, terminals and CSV exports), invisible characters only (a caption that looks
present and says nothing), or a novel's length. ``clean_caption`` removes what cannot or should
not be stored; ``fit_caption`` caps the length at ``CAPTION_MAX_CHARS`` and says whether it cut.
"""

from __future__ import annotations

import re
import unicodedata

# Longest caption stored. The prompt asks for one or two sentences (a few hundred characters);
# 2,000 keeps any honest answer whole and bounds what a runaway one costs in metadata, the
# cache and the embedding request (about 500 tokens, far under the model's 8,192).
CAPTION_MAX_CHARS = 2000
# Longest error message kept for the ledger and the report.
MESSAGE_MAX_CHARS = 500
ELLIPSIS = "\u2026"

# ANSI/VT escape sequences, removed whole so that no "[31m" is left behind: CSI (ESC [ or the
# C1 byte 0x9B, parameters, intermediates, a final byte), OSC (ESC ] ... BEL or ESC \) and the
# two-byte ESC sequences.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
)
_SURROGATES = re.compile("[\ud800-\udfff]")
# Joiners are kept: they hold emoji sequences and some scripts together.
_KEPT_FORMAT = frozenset({"\u200c", "\u200d"})


def _without_surrogates(text: str) -> str:
    """Valid surrogate pairs joined into their character, lone surrogates dropped."""
    if not _SURROGATES.search(text):
        return text
    joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return _SURROGATES.sub("", joined)


def clean_text(text: object) -> str:
    """``text`` as storable, printable, single-line text: escape sequences, control and format
    characters (NUL, BEL, DEL, C1, zero-width spaces, BOM...) and lone surrogates removed, every
    run of whitespace (tabs, newlines, no-break and ideographic spaces) folded to one space, the
    ends trimmed. '' when nothing visible is left."""
    raw = "" if text is None else str(text)
    raw = _ESCAPES.sub("", _without_surrogates(raw))
    kept = []
    for char in raw:
        if char.isspace():
            kept.append(" ")
            continue
        category = unicodedata.category(char)
        if category == "Cc" or (category == "Cf" and char not in _KEPT_FORMAT):
            continue
        kept.append(char)
    return " ".join("".join(kept).split())


def clean_caption(text: object) -> str:
    """The caption as storable text (see ``clean_text``); '' means no caption."""
    return clean_text(text)


def fit_caption(text: str, limit: int = CAPTION_MAX_CHARS) -> tuple[str, bool]:
    """``text`` at most ``limit`` characters and whether it was cut: cut at the last word
    boundary in the final tenth (else mid-word) and ended with an ellipsis."""
    if len(text) <= limit:
        return text, False
    head = text[: limit - 1]
    space = head.rfind(" ")
    if space >= limit * 9 // 10:
        head = head[:space]
    return head.rstrip() + ELLIPSIS, True


def clean_message(text: object, limit: int = MESSAGE_MAX_CHARS) -> str:
    """An error message fit for the ledger, the report and a log line."""
    cleaned = clean_text(text)
    return fit_caption(cleaned, limit)[0] if len(cleaned) > limit else cleaned
