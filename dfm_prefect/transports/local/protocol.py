"""What both ends of the local transport agree on: frame limit, ready line, key variable."""

from __future__ import annotations

MAX_FRAME = 256 << 20
"""Largest frame either end accepts, in bytes."""

READY = "DFM-SITE-READY"
"""The line a site process prints on stdout once it serves (followed by its address)."""

AUTHKEY_ENV = "DFM_AUTHKEY"
"""The environment variable that hands a site process the federation's key (hex)."""

DEFAULT_USER = "admin@local"
"""The identity of the person who starts a local federation (the one its federation file signs as)."""
PEERS_ENV = "DFM_PEERS"
"""Names a site's own federation file for reaching the other sites (moves), signed with its site certificate."""
