"""The production topology on one machine (``enrich-dagster up``): where the code server
listens, how its processes are restarted, how long they get to start."""

from __future__ import annotations

from pydantic import Field

from enrich_pipeline.settings.framework import SettingsModel


class TopologySettings(SettingsModel):
    """The code server's address and the supervisor's restart policy."""

    code_server_host: str = Field(
        "127.0.0.1",
        description="address the code server (dagster api grpc) listens on",
        validation_alias="ENRICH_CODE_SERVER_HOST",
        min_length=1,
        max_length=253,
    )
    code_server_port: int = Field(
        4266,
        description="port of the code server, which the webserver and the daemon reach",
        validation_alias="ENRICH_CODE_SERVER_PORT",
        ge=1,
        le=65535,
    )
    restart_backoff: float = Field(
        1.0,
        description=(
            "seconds before a process of the topology that exited is started again; doubled "
            "for each exit in a row (as Kubernetes restarts a pod)"
        ),
        validation_alias="ENRICH_RESTART_BACKOFF",
        ge=0.1,
        le=3600,
    )
    restart_backoff_max: float = Field(
        60.0,
        description=(
            "longest wait before a restart; a process that ran this long before it exited "
            "starts again after the first wait"
        ),
        validation_alias="ENRICH_RESTART_BACKOFF_MAX",
        ge=0.1,
        le=86_400,
    )
    startup_timeout: float = Field(
        300.0,
        description="seconds the three processes get to become healthy before up gives up",
        validation_alias="ENRICH_STARTUP_TIMEOUT",
        ge=1,
        le=3600,
    )

    def restart_wait(self, exits_in_a_row: int) -> float:
        """Seconds before the restart that follows the ``exits_in_a_row``-th exit (from 1)."""
        n = max(exits_in_a_row, 1) - 1
        return min(self.restart_backoff_max, self.restart_backoff * 2 ** min(n, 30))
