"""The one offline switch, and whether a download host is reachable.

Hub and dataset clients retry with backoff for most of a minute when there is no network; one
short TCP connect first keeps the real download path for online machines and a prompt, clear
error offline. ``MIST_FED_OFFLINE=1`` says "offline" without asking (Hugging Face's own
``HF_HUB_OFFLINE=1`` is honoured for the hub too, as its library does). Reachability decides
only whether a download is tried, never which default is chosen
(:mod:`mist_fed.assets.defaults` reads local state only).
"""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse

OFFLINE_ENV = "MIST_FED_OFFLINE"
_TRUE = ("1", "true", "yes")


def offline() -> bool:
    """True when ``$MIST_FED_OFFLINE`` says this machine has no network."""
    return os.environ.get(OFFLINE_ENV, "").lower() in _TRUE


@cache
def _can_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when ``url``'s host accepts a TCP connection (asked once per process), unless offline."""
    if offline():
        return False
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return bool(u.hostname) and _can_connect(u.hostname or "", port, timeout)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub accepts a TCP connection (and neither switch says offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    from huggingface_hub import constants

    return url_reachable(constants.ENDPOINT, timeout)
