"""Network and path defaults: the only place host and port literals live."""

import os
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8815
DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"


def cache_dir() -> Path:
    """Where converted weights and feature stores live (``MIST_FED_CACHE`` overrides)."""
    return Path(os.environ.get("MIST_FED_CACHE", Path.home() / ".cache" / "mist-fed"))


def cloud_location(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"grpc://{host}:{port}"
