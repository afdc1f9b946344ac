"""Is a download host reachable? A fast check, so offline machines fail in seconds, not minutes.

Hub and dataset clients retry with backoff for most of a minute when there is no network;
one short TCP connect first keeps the real download path for online machines and a prompt,
clear error offline. :func:`url_reachable` serves any host; :func:`hub_reachable` the model hub.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


@cache
def _can_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when ``url``'s host accepts a TCP connection (asked once per process)."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return bool(u.hostname) and _can_connect(u.hostname or "", port, timeout)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub endpoint accepts a TCP connection (and offline mode is off)."""
    if _offline_flag():
        return False
    from huggingface_hub import constants

    return url_reachable(constants.ENDPOINT, timeout)
