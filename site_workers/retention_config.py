"""The ``result_store.retention`` section of a site config: how long results stay and how many bytes they may take.

Every limit is off by default (the store keeps everything, as before). Example::

    result_store:
      url: file:///srv/dfm/north/results
      retention:
        max_age_s: 604800                 # a result goes a week after it was stored
        max_bytes: 50000000000            # the whole store
        max_bytes_per_client: 5000000000  # what one client's runs may hold
        min_age_s: 600                    # never removed to make room while younger
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RetentionPolicy(BaseModel):
    """Limits the site administrator sets on the result store; results over them are collected, oldest first.

    ``max_age_s``: a result older than this (since it was stored) is removed.
    ``max_bytes`` and ``max_bytes_per_client``: when the store (or what one client's
    runs stored) holds more, its oldest results are removed until it fits; a client
    is the identity that asked for the run (``anonymous`` where the transport
    authenticates none). ``min_age_s``: a result younger than this is never removed
    to make room, so a flow's fresh intermediates are not pulled from under it; when
    only such results are left, a new result that would not fit is refused
    (``store_full``) and nothing is written. ``None`` switches a limit off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_age_s: float | None = Field(default=None, gt=0, description="Seconds a result is kept after it was stored.")
    max_bytes: int | None = Field(default=None, gt=0, description="Bytes all results together may take.")
    max_bytes_per_client: int | None = Field(default=None, gt=0, description="Bytes the results of one client may take.")
    min_age_s: float = Field(default=300.0, ge=0, description="Results younger than this are never removed to make room.")

    @model_validator(mode="after")
    def _client_share_fits_the_store(self) -> RetentionPolicy:
        if self.max_bytes is not None and self.max_bytes_per_client is not None and self.max_bytes_per_client > self.max_bytes:
            raise ValueError(
                f"max_bytes_per_client ({self.max_bytes_per_client}) is larger than max_bytes ({self.max_bytes}) of the "
                "whole store; lower it or raise max_bytes"
            )
        return self

    @property
    def bounded(self) -> bool:
        """True when any limit is set."""
        return self.max_age_s is not None or self.max_bytes is not None or self.max_bytes_per_client is not None
