"""The legacy report of ``batch_enrich_captions.py``: configuration block, per-item progress,
final statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from enrich_pipeline.pipeline.stats import ItemOutcome, RunStats
from enrich_pipeline.redaction import scrub_secrets

RULE = "=" * 64


class Report:
    """The legacy report: configuration block, per-item progress, final statistics."""

    def __init__(self, out: TextIO, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.count = 0

    def line(self, text: str = "") -> None:
        # Every line may quote a provider or a database (an item's reason, a stop): scrubbed.
        print(scrub_secrets(text), file=self.out, flush=True)

    def configuration(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.line(RULE)
        self.line("Batch caption enrichment")
        self.line(RULE)
        self.line("Configuration:")
        for key, value in pairs:
            self.line(f"  {key + ':':<18}{value}")
        self.line(RULE)

    def item(self, user_id: str, o: ItemOutcome) -> None:
        self.count += 1
        if self.quiet:
            return
        mark = {"succeeded": "OK", "failed": "FAILED", "skipped": "SKIPPED"}[o.status]
        self.line(f"[{self.count}] item {o.item_id} (user {user_id!r}): {mark}")
        if o.status == "succeeded":
            self.line(f"    Caption: {o.caption}")
            self.line(f"    Colors:  {', '.join(o.dominant_colors) or '-'}")
            self.line(f"    Styles:  {', '.join(o.style_tags) or '-'}")
            self.line(f"    Objects: {', '.join(o.object_tags) or '-'}")
        elif o.error:
            self.line(f"    Reason:  {o.error}")

    def statistics(
        self,
        stats: RunStats,
        usage: dict[str, int],
        elapsed: float,
        cost: float | None = None,
        currency: str = "USD",
        offline: bool = False,
    ) -> None:
        self.line(RULE)
        self.line("Statistics:")
        for label, value in stats.report_rows():
            self.line(f"  {label + ':':<18}{value}")
        if offline:
            # Zeros of tokens and cost would read as a free model: no model was called at all.
            self.line(f"  {'API calls:':<18}none (offline provider: no model was called)")
            self.line(f"  {'Elapsed:':<18}{elapsed:.1f} s")
            self.line(RULE)
            return
        self.line(
            f"  {'Tokens used:':<18}{usage['total_tokens']} (prompt {usage['prompt_tokens']}, "
            f"completion {usage['completion_tokens']}, embedding {usage['embedding_tokens']})"
        )
        if usage.get("image_embedding_calls") or usage.get("failed_image_embedding_calls"):
            self.line(
                f"  {'Image calls:':<18}{usage['image_embedding_calls']} call(s), "
                f"{usage['image_embedding_tokens']} image and "
                f"{usage['image_embedding_text_tokens']} text tokens"
                + (
                    f", {usage['failed_image_embedding_calls']} failed call(s)"
                    if usage.get("failed_image_embedding_calls")
                    else ""
                )
            )
        # Answers whose usage could not be believed (missing, null, negative, huge): their
        # tokens are not in the totals, which are then a floor, and so is the cost.
        unknown = usage.get("unknown_token_calls", 0)
        if unknown:
            self.line(
                f"  {'Tokens unknown:':<18}for {unknown} call(s) (no believable count in the "
                "answer: the totals and the cost are a floor)"
            )
        steps = usage.get("format_step_downs", 0)
        if steps:
            self.line(
                f"  {'Answer format:':<18}stepped down {steps} time(s) (refused or malformed "
                "answers; see the log, or set ENRICH_ANSWER_FORMAT)"
            )
        # Every call made counts, answered or failed; the failed ones are also shown apart.
        failed_vision = usage.get("failed_vision_calls", 0)
        failed_embedding = usage.get("failed_embedding_calls", 0)
        self.line(
            f"  {'API calls:':<18}{usage['vision_calls'] + failed_vision} vision, "
            f"{usage['embedding_calls'] + failed_embedding} embedding, {usage['retries']} retries"
        )
        if failed_vision or failed_embedding:
            self.line(
                f"  {'Failed calls:':<18}{failed_vision} vision, {failed_embedding} embedding "
                "(errors, timeouts, refused connections, answers without a caption; counted "
                "in API calls)"
            )
        if cost is not None:
            floor = "at least " if unknown else ""
            self.line(f"  {'Estimated cost:':<18}{floor}{cost:.6f} {currency} (ENRICH_PRICES)")
        self.line(f"  {'Elapsed:':<18}{elapsed:.1f} s")
        self.line(RULE)
