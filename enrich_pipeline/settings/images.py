"""Image fetching limits, turned into the domain's ``ImagePolicy``."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.images.policy import DEFAULT_PIXELS_IN_FLIGHT
from enrich_pipeline.settings.framework import SettingsModel


class ImageSettings(SettingsModel):
    """Image fetching limits. Private networks stay refused unless explicitly allowed."""

    max_bytes: int = Field(
        20 * 1024 * 1024,
        description="largest image file, in bytes",
        validation_alias="ENRICH_IMAGE_MAX_BYTES",
        gt=0,
        le=1024 * 1024 * 1024,
    )
    max_pixels: int = Field(
        50_000_000,
        description="largest image, in pixels",
        validation_alias="ENRICH_IMAGE_MAX_PIXELS",
        gt=0,
        le=10**9,
    )
    max_pixels_in_flight: int = Field(
        DEFAULT_PIXELS_IN_FLIGHT,
        description="image pixels one process decodes at once (a larger image goes alone); "
        "0: no bound",
        validation_alias="ENRICH_MAX_PIXELS_IN_FLIGHT",
        ge=0,
        le=10**10,
    )
    timeout: float = Field(
        15.0,
        description="seconds to fetch one image",
        validation_alias="ENRICH_IMAGE_TIMEOUT",
        gt=0,
        le=600,
    )
    max_redirects: int = Field(
        5,
        description="redirects followed per image",
        validation_alias="ENRICH_IMAGE_MAX_REDIRECTS",
        ge=0,
        le=20,
    )
    allow_private_networks: bool = Field(
        False,
        description="allow image URLs on loopback/private/link-local addresses",
        validation_alias="ENRICH_ALLOW_PRIVATE_NETWORKS",
    )
    allowed_networks: str = Field(
        "",
        description="comma-separated CIDRs exempt from the SSRF guard",
        validation_alias="ENRICH_ALLOWED_NETWORKS",
    )
    # None: only where the database is the embedded demo.
    allow_local_files: bool | None = Field(
        None,
        description="allow local paths in the image column",
        validation_alias="ENRICH_ALLOW_LOCAL_FILES",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for network in (n.strip() for n in value.split(",")):
            if network:
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError as exc:
                    raise ValueError(str(exc)) from None
        return value

    def policy(self, *, local_files: bool = False) -> ImagePolicy:
        """The domain's image policy. Local paths are read only where ``local_files`` says so
        (the embedded demo) or the setting asks for it: a path in a real table must not become
        a way to read the worker's files."""
        return ImagePolicy(
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            max_pixels_in_flight=self.max_pixels_in_flight,
            timeout=self.timeout,
            max_redirects=self.max_redirects,
            allow_private_networks=self.allow_private_networks,
            # CIDRs exempt from the SSRF guard (an internal image CDN, say), without opening
            # every private network.
            allowed_networks=frozenset(
                n.strip() for n in self.allowed_networks.split(",") if n.strip()
            ),
            allow_local_files=local_files
            if self.allow_local_files is None
            else self.allow_local_files,
        )
