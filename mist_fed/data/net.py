"""Is a dataset's download host reachable? Asked before a download so offline fails fast.

torchvision's downloads retry and wait on dead connections; one short TCP connect tells an
offline machine apart in seconds. ``MIST_FED_OFFLINE=1`` says "offline" without asking.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse


def offline_flag() -> bool:
    return os.environ.get("MIST_FED_OFFLINE", "").lower() in ("1", "true", "yes")


@cache
def _can_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when ``url``'s host accepts a TCP connection (and ``MIST_FED_OFFLINE`` is unset)."""
    if offline_flag():
        return False
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return bool(u.hostname) and _can_connect(u.hostname or "", port, timeout)
