"""Flag groups that several subcommands share, and the cloud token they read."""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path

from mist_fed.assets.defaults import PAPER_BACKBONE
from mist_fed.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_ENV = "MIST_FED_CLOUD_TOKEN"


def add_backbone_args(p: argparse.ArgumentParser, default: str = PAPER_BACKBONE) -> None:
    p.add_argument("--backbone", default=default, help="timm ViT name or registered backbone")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="local weights file (.safetensors, .pth, .npz)")
    src.add_argument(
        "--random-init", action="store_true", help="random weights (tests, cost figures)"
    )


def add_cloud_token_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cloud-token-file",
        metavar="PATH",
        help=f"a file whose first line is the cloud's bearer token (default: ${TOKEN_ENV}); "
        "never pass a token on the command line, where `ps` shows it",
    )


def read_cloud_token(path: str | Path | None = None) -> str | None:
    """The cloud's token: the first line of ``path``, else ``$MIST_FED_CLOUD_TOKEN`` (then
    removed from this process's environment), else None. A file others may read is used with a
    warning naming the fix (``chmod 600``); an empty one is a :class:`ConfigError`."""
    env = os.environ.pop(TOKEN_ENV, None)
    if path is None:
        return env.strip() or None if env else None
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the cloud token file {p}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("cloud token file %s is readable by others; chmod 600 %s", p, p)
    token = (text.splitlines() or [""])[0].strip()
    if not token:
        raise ConfigError(f"the cloud token file {p} is empty; put the token on its first line")
    return token
