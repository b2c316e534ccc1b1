"""What a paid answer is worth: its token counts, checked before they are counted, and whether it
carries a caption at all.

A provider bills a call that answered, whatever the answer says about itself. So an answer with
odd ``usage`` (missing, ``{}``, null, negative, huge, not a number) still delivers its caption:
its counts are *unknown*, counted as such (``Usage.unknown_token_calls``), never a crash and never
a number that reaches a cost, a report or metadata unchecked. A count is believed when it is a
whole number from 0 to ``MAX_CALL_TOKENS``.

An answer that is a completion but carries no caption (blank, only invisible characters, or
no readable message) is *unusable*: it was paid for, and it is that row's error (retried within
the call like any transient error, then charged to the row, which later runs retry until
``max_attempts``). A model that answers nothing usable call after call, for several images,
is the problem itself: ``UnusableStreak`` says when to stop the run (``DASHSCOPE_UNUSABLE_STOP``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Any

from enrich_pipeline.providers.base import SCOPE_ROW, ProviderError
from enrich_pipeline.providers.transport import ForeignAnswer

# No single call can bill more tokens than its model's context window holds (input and output
# together). The largest window of the models this pipeline calls is qwen3-vl-plus's 262,144
# tokens (text-embedding-v4: 8,192 per text, 10 texts a request); 2**20 leaves room for larger
# models to come while refusing the absurd (negative counts, 1e300, 4e30).
MAX_CALL_TOKENS = 1 << 20

UNUSABLE_STOP = "unusable_answers"  # the code of the run's stop


def token_count(value: object) -> int | None:
    """A count as the answer gave it, or None when it cannot be believed: not a number (null,
    text, a boolean), not whole, not finite, negative or above ``MAX_CALL_TOKENS``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    if not 0 <= value <= MAX_CALL_TOKENS:
        return None
    return int(value)


def _field(obj: object, name: str) -> object:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def read_usage(usage: object, names: Iterable[str]) -> tuple[dict[str, int], bool]:
    """The believable counts of an answer's ``usage`` (an SDK object or a dict), and whether all
    of ``names`` were: a count that is not, or counts that together pass ``MAX_CALL_TOKENS``,
    make the call's tokens unknown (the believable ones are still counted: a floor)."""
    counts: dict[str, int] = {}
    known = usage is not None
    for name in names:
        count = token_count(_field(usage, name)) if usage is not None else None
        if count is None:
            known = False
        else:
            counts[name] = count
    if sum(counts.values()) > MAX_CALL_TOKENS:
        return {}, False
    return counts, known


def answer_text(response: object) -> str | None:
    """The first choice's message text of a chat completion ("" for no choice at all); None
    when the completion has no readable message (``choices`` not a list, a choice without a
    message, content that is not text).

    Raises ``ForeignAnswer`` when the answer is not a completion at all (neither ``choices`` nor
    ``usage``: a proxy's page, another API's JSON), which is the service's failure, not a paid
    answer: at an endpoint not yet proven it stops the run naming the base URL
    (``errors.classify``)."""
    choices = _field(response, "choices")
    if not isinstance(choices, list) and _field(response, "usage") is None:
        raise ForeignAnswer("HTTP 200: the answer has no choices, not a chat completion")
    if not isinstance(choices, list):
        return None
    if not choices:  # nothing to say: an empty caption
        return ""
    content = _field(_field(choices[0], "message"), "content")
    return content if isinstance(content, str) else None


def unusable_answer(text: str | None) -> ProviderError:
    """The row's error for a paid answer without a caption; transient: retried in the call,
    charged to the row past the retries, tried again by later runs until ``max_attempts``."""
    if text is None:
        return ProviderError(
            "unusable_answer",
            "the model answered without a readable caption (no message text)",
            permanent=False,
            scope=SCOPE_ROW,
        )
    return ProviderError(
        "empty_caption", "the model returned an empty caption", permanent=False, scope=SCOPE_ROW
    )


UNUSABLE_CODES = frozenset({"empty_caption", "unusable_answer"})
MALFORMED = "malformed_answer"


def malformed_answer(reason: object) -> ProviderError:
    """The row's error for a paid answer that is not what was asked for (not JSON, not an
    object, a language's caption missing: ``structured.MalformedAnswer``); transient like an
    unusable answer. A streak of them steps the run's format down (``formats.FormatLadder``)."""
    return ProviderError(
        MALFORMED,
        f"the model's answer is malformed: {reason}",
        permanent=False,
        scope=SCOPE_ROW,
    )


def is_malformed(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.code == MALFORMED


def is_unusable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.code in UNUSABLE_CODES


class UnusableStreak:
    """Paid answers without a caption in a row, across rows: ``note`` says when they are
    ``limit`` in a row, for at least two images, with no usable answer between. One image that
    the model cannot caption is that row's problem (its retries are bounded, its attempts
    charged); several in a row while nothing is captioned is the model's or the prompt's."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._images: set[int] = set()
        self._lock = threading.Lock()

    def usable(self) -> None:
        with self._lock:
            self._count = 0
            self._images.clear()

    def note(self, image: Any) -> tuple[int, int] | None:
        """One more unusable answer, for ``image``; (answers, images) when the run must stop."""
        with self._lock:
            self._count += 1
            self._images.add(hash(image))
            if self._count >= self.limit and len(self._images) >= 2:
                return self._count, len(self._images)
            return None

    def reset(self) -> None:
        self.usable()
