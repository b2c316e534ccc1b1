"""Caption text as the provider returned it, made fit to store."""

from __future__ import annotations


def clean_caption(text: str | None) -> str:
    """Whitespace folded to single spaces; '' when nothing is left."""
    return " ".join(str(text or "").split())
