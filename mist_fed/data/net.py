"""Is a dataset's download host reachable? Asked before a download so offline fails fast.

torchvision's downloads retry and wait on dead connections; one short TCP connect tells an
offline machine apart in seconds. ``MIST_FED_OFFLINE=1`` says "offline" without asking.
"""

from __future__ import annotations

import os

from mist_fed.model import hub


def offline_flag() -> bool:
    return os.environ.get("MIST_FED_OFFLINE", "").lower() in ("1", "true", "yes")


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when ``url``'s host accepts a TCP connection (and ``MIST_FED_OFFLINE`` is unset)."""
    if offline_flag():
        return False
    return hub.url_reachable(url, timeout)
