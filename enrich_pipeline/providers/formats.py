"""Which answer format each model takes, which models think unless told not to, and the run's
step-down from one format to the next (API policy; the formats themselves are
``enrichment/structured.py``).

What the documentation says (stored copies, see the README's sources):

- [SO] Structured output, https://www.alibabacloud.com/help/en/model-studio/qwen-structured-output
  (Dec 15 2025, Feb 18 2026) and https://alibabacloud.com/help/zh/model-studio/json-mode (Feb 06
  2026): ``json_object`` for "most Qwen models" (non-thinking mode); ``json_schema`` only for
  text models: qwen3-max (and snapshots from 2025-09-23), qwen-plus (-latest, snapshots from
  2025-07-28), qwen-flash (snapshots from 2025-07-28), deepseek-v3.2. No vision model is listed
  for ``json_schema``. The prompt must contain "JSON" for ``json_object``.
- [VL-old] https://help.aliyun.com/zh/model-studio/user-guide/json-mode (older page): of the
  qwen-vl series, qwen-vl-max and qwen-vl-plus take ``json_object`` (not their snapshots).
- [VIS] https://docs.qwencloud.com/developer-guides/multimodal/vision: Qwen3.6/3.5 "Structured
  output: Supported in non-thinking mode". The Qwen3-VL row is not in the stored copy; a
  third-party model dump marks qwen3-vl-plus/flash structured_output=true (not authoritative:
  http://47.109.151.80:15030/Maas2-group/Maas-Model-platform/raw/master/backend/parsed_json/
  qwen3-vl-plus.json). A model that refuses after all costs one refused call: the run steps
  down (``FormatLadder``).
- [THINK] https://help.aliyun.com/en/model-studio/visual-reasoning and
  https://docs.qwencloud.com/developer-guides/text-generation/thinking: hybrid models
  qwen3.7-plus, qwen3.6-plus/flash, qwen3.5-plus/flash (snapshots, open ones), qwen3-vl-plus/flash;
  thinking is on by default for the Qwen3.5 and Qwen3.6 series, off for Qwen3-VL; off with
  ``enable_thinking: false`` in ``extra_body``
  (https://www.alibabacloud.com/help/en/model-studio/deep-thinking). Thinking-only models
  (qwen3-vl-*-thinking, qvq-*) take no structured output (non-thinking mode only, [SO]).

Any other server (a local vLLM, a proxy: no Model Studio region, ``regions.region_of``) and any
model not named here get ``text`` under ``auto``: nothing documents what they take.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Hashable

from enrich_pipeline.enrichment.structured import FORMATS, JSON_OBJECT, JSON_SCHEMA, TEXT
from enrich_pipeline.providers.regions import region_of

log = logging.getLogger(__name__)

AUTO = "auto"

# [SO]: the json_schema list (text models; a vision run never picks them, but a user's own
# OpenAI-compatible text model at DashScope does).
_JSON_SCHEMA_MODELS = re.compile(
    r"^(qwen3-max(-\d{4}-\d{2}-\d{2})?|qwen-plus(-latest|-\d{4}-\d{2}-\d{2})?"
    r"|qwen-flash(-\d{4}-\d{2}-\d{2})?|deepseek-v3\.2)$"
)
# [VL-old], [VIS]: vision models that take json_object (non-thinking).
_JSON_OBJECT_MODELS = re.compile(
    r"^(qwen-vl-max|qwen-vl-plus|qwen3-vl-(plus|flash)(-\d{4}-\d{2}-\d{2})?"
    r"|qwen3\.[5-7]-[a-z0-9.-]+)$"
)
# [THINK]
_THINKING_ONLY = re.compile(r"^(qvq-.*|.*-thinking(-\d{4}-\d{2}-\d{2})?)$")
_THINKS_BY_DEFAULT = re.compile(r"^qwen3\.[56]-")
_HYBRID = re.compile(r"^(qwen3\.[5-7]-|qwen3-vl-(plus|flash))")

# Malformed answers in a row (for at least two images, with no well-formed answer between)
# that step the format down: one image may get its four tries malformed (the default three
# retries), several images the model's.
MALFORMED_STEP_DOWN = 4


def documented_formats(model: str, base_url: str) -> tuple[str, ...]:
    """The formats ``model`` at ``base_url`` is documented to take, best first (``text``
    always)."""
    name = model.strip().lower()
    if region_of(base_url) is None or _THINKING_ONLY.match(name):
        return (TEXT,)
    if _JSON_SCHEMA_MODELS.match(name):
        return (JSON_SCHEMA, JSON_OBJECT, TEXT)
    if _JSON_OBJECT_MODELS.match(name):
        return (JSON_OBJECT, TEXT)
    return (TEXT,)


def first_format(setting: str, model: str, base_url: str) -> str:
    """The format a run starts with: ``ENRICH_ANSWER_FORMAT`` when set, else the best the
    documentation lists for the model."""
    if setting != AUTO:
        if setting not in FORMATS:
            raise ValueError(f"unknown answer format {setting!r}")
        return setting
    return documented_formats(model, base_url)[0]


def thinking_off(model: str, answer_format: str) -> bool:
    """Whether to send ``enable_thinking: false``: always for models that think by default
    (thinking tokens are billed as output and a caption needs none), and with any
    response_format on a hybrid model (structured output is for non-thinking mode only)."""
    name = model.strip().lower()
    if _THINKS_BY_DEFAULT.match(name):
        return True
    return answer_format != TEXT and bool(_HYBRID.match(name))


def lower(answer_format: str) -> str | None:
    """The next format down the ladder, or None at ``text``."""
    index = FORMATS.index(answer_format)
    return FORMATS[index + 1] if index + 1 < len(FORMATS) else None


class FormatLadder:
    """The run's answer format and its step-downs, shared by every call thread.

    A request refused because the model does not take its response_format steps the run down
    one format (``refused``), once however many calls were refused together; so does a streak
    of malformed answers (``malformed``). Each step is one log line; never back up in a run.
    """

    def __init__(
        self, first: str, model: str = "", on_step: Callable[[], None] | None = None
    ) -> None:
        if first not in FORMATS:
            raise ValueError(f"unknown answer format {first!r}")
        self.first = first
        self.model = model
        self._on_step = on_step
        self._current = first
        self._lock = threading.Lock()
        self._malformed = 0
        self._images: set[int] = set()
        self.steps: list[str] = []  # one line per step-down, in order

    @property
    def current(self) -> str:
        with self._lock:
            return self._current

    def _step(self, from_format: str, why: str) -> bool:
        """Step down from ``from_format`` (if it is still the current one). True when the
        current format is now below ``from_format``."""
        with self._lock:
            if self._current != from_format:
                return FORMATS.index(self._current) > FORMATS.index(from_format)
            below = lower(from_format)
            if below is None:
                return False
            self._current = below
            self._malformed = 0
            self._images.clear()
            line = (
                f"answer format stepped down from {from_format} to {below} for model "
                f"{self.model!r}: {why}"
            )
            self.steps.append(line)
        log.warning("%s", line)
        if self._on_step is not None:
            self._on_step()
        return True

    def refused(self, from_format: str, message: str) -> bool:
        """The provider refused ``from_format``'s response_format: step down. True when the
        call can be asked again in a lower format (no row is charged for the refusal)."""
        return self._step(
            from_format,
            f"the model refused it ({message}); no row was charged, set ENRICH_ANSWER_FORMAT "
            "to choose",
        )

    def malformed(self, answer_format: str, image: Hashable) -> bool:
        """One more malformed answer in ``answer_format``, for ``image``: True when this made
        the run step down."""
        with self._lock:
            if self._current != answer_format:
                return False
            self._malformed += 1
            self._images.add(hash(image))
            if self._malformed < MALFORMED_STEP_DOWN or len(self._images) < 2:
                return False
            count, images = self._malformed, len(self._images)
        return self._step(
            answer_format,
            f"{count} malformed answers in a row for {images} images: the model does not "
            "answer this format reliably",
        )

    def wellformed(self) -> None:
        with self._lock:
            self._malformed = 0
            self._images.clear()

    def reset(self) -> None:
        """A new run: back to the first format."""
        with self._lock:
            self._current = self.first
            self._malformed = 0
            self._images.clear()


# ---------------------------------------------------------------------------------------------
# Batch mode: a batch's lines are answered long after they are sent, so there is no step-down
# within one. What a collected batch showed of its format (``batch_verdict``) is recorded with
# it instead, and the model's next submission starts from there (``batch_format``).

# Malformed answers that lower a batch's format: more than its well-formed ones, and from at
# least this many lines (images), as the online streak needs two images.
BATCH_MALFORMED_LINES = 2


def batch_verdict(asked: str, *, refused: int, malformed: int, wellformed: int) -> str | None:
    """The format the model's next batch should use, as this batch's lines showed: one below
    ``asked`` when any line was refused for its response_format or most answers were
    malformed, ``asked`` itself when it was answered well, None when nothing was learned (no
    answer, or ``text`` failing: there is nothing below it)."""
    if refused or (malformed >= BATCH_MALFORMED_LINES and malformed > wellformed):
        return lower(asked)
    return asked if wellformed else None


def _rank(answer_format: str) -> int:
    return FORMATS.index(answer_format)


def batch_format(
    setting: str, model: str, base_url: str, verdicts: list[tuple[str, str, str]]
) -> tuple[str, str | None]:
    """The format a batch submission for ``model`` uses, and the line that says why when the
    model's earlier batches (``verdicts``: asked, next, batch ref; oldest first) lowered it.

    ``ENRICH_ANSWER_FORMAT`` set explicitly wins. Under ``auto`` a refusal (or mostly malformed
    answers) lowers the model's format for good, and a batch later answered well in a better
    format (asked for explicitly) raises it again: the best format the documentation lists,
    no better than the model's batches have shown it takes."""
    first = first_format(setting, model, base_url)
    limit: str | None = None  # None: no batch has lowered the model's format
    refused_in: dict[str, str] = {}  # format -> the last batch that showed it is not taken
    for asked, verdict, ref in verdicts:
        if asked not in FORMATS or verdict not in FORMATS:
            continue
        if _rank(verdict) > _rank(asked):
            refused_in[asked] = ref
            if limit is None or _rank(verdict) > _rank(limit):
                limit = verdict
        elif limit is not None and _rank(asked) < _rank(limit):
            limit = asked
    if limit is None or _rank(limit) <= _rank(first):
        return first, None
    above = FORMATS[_rank(limit) - 1]
    because = (
        f"batch {refused_in[above]} showed the model does not take {above}"
        if above in refused_in
        else f"the model's batches showed it does not take {above}"
    )
    if setting != AUTO:
        return first, (
            f"answer format {first} for model {model!r}, as ENRICH_ANSWER_FORMAT says, "
            f"although {because}"
        )
    return limit, (
        f"answer format {limit} for model {model!r}, not {first}: {because}; set "
        "ENRICH_ANSWER_FORMAT to choose"
    )
