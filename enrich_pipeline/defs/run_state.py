"""What one run's steps share besides their inputs, as a resource of its own.

``pending_rows`` reads the run's settings from its config once, finds the other runs holding
its users and starts the run's lookahead; the chunk steps use the lookahead, and ``summarize``
reports the settings and the other runs. Each run gets a fresh state, closed with the run (the
lookahead's threads stop and the claims of chunks it loaded ahead are given back).
"""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from enrich_pipeline.pipeline.lookahead import Lookahead
from enrich_pipeline.settings import RunSettings


class RunStateResource(ConfigurableResource):
    """The run's lookahead, its settings and the other runs found holding its users."""

    _lookahead: Lookahead[Any] | None = PrivateAttr(default=None)
    _settings: RunSettings | None = PrivateAttr(default=None)
    _other_runs: dict[str, str] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self.close()
        self._settings, self._other_runs = None, {}

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self.close()

    def begin(
        self, settings: RunSettings, other_runs: dict[str, str], lookahead: Lookahead[Any]
    ) -> None:
        """What ``pending_rows`` found for the run's steps."""
        self.close()
        self._settings, self._other_runs, self._lookahead = settings, other_runs, lookahead

    @property
    def lookahead(self) -> Lookahead[Any] | None:
        """None when a step runs without ``pending_rows`` (re-executed on its own)."""
        return self._lookahead

    @property
    def settings(self) -> RunSettings:
        """The run's settings, or the environment's when ``pending_rows`` did not run."""
        return self._settings or RunSettings.from_env()

    @property
    def other_runs(self) -> dict[str, str]:
        return self._other_runs

    def close(self) -> None:
        if self._lookahead is not None:
            self._lookahead.close()
            self._lookahead = None
