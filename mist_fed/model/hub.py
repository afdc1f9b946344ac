"""Is the model hub reachable? A fast check, so offline machines fail in seconds, not minutes.

The hub client retries with backoff for most of a minute when there is no network; asking
first keeps the real download path for online machines and a prompt, clear error offline.
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub endpoint accepts a TCP connection (and offline mode is off)."""
    if _offline_flag():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    return _can_connect(url.hostname or "", port, timeout)
