"""Network and path defaults: the only place host and port literals live."""

import os
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8815
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")  # bind on every interface; no host to dial
DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"
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
