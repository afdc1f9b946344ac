"""Real image-classification tasks from torchvision datasets, and Fashion-MNIST from Debian.

Registered: ``flowers102``, ``cifar100``, ``dtd``, ``pets``, ``svhn``, ``eurosat``,
``caltech101``, ``fashion-mnist``, ``mnist``. Data is read from a local root
(:func:`mist_fed.assets.defaults.data_dir`, ``$MIST_FED_DATA``) when present, and downloaded there by
torchvision when the dataset's host is reachable. Offline, a missing dataset fails at once with a
:class:`TaskError` saying where it looked and how to get it.

Fashion-MNIST is also found, first, in Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``, idx .gz files): ``apt-get install dataset-fashion-mnist``.

Datasets without an official test split (EuroSAT, Caltech101) hold out a fixed 20% (seed 0) as
test; protocols (:mod:`.protocols`) then draw train and val from the rest.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mist_fed.assets.defaults import (
    DATASET_HOSTS,
    DEBIAN_FASHION_MNIST,
    PAPER_TASK_FOLDER,
    data_dir,
)
from mist_fed.assets.net import url_reachable
from mist_fed.data.protocols import Source, apply_protocol, carve
from mist_fed.data.tasks import Availability, Task, register_task
from mist_fed.errors import TaskError

log = logging.getLogger(__name__)

_LABEL_ATTRS = ("targets", "labels", "_labels", "y")


@dataclass(frozen=True)
class VisionSpec:
    """A torchvision dataset: its class, official splits (name -> kwargs) and class count."""

    name: str
    cls: str
    num_classes: int
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    folder: str = ""  # the folder torchvision creates under the root (for messages)
    subroot: bool = False  # torchvision reads files straight from its root: give it root/folder
    needs: tuple[str, ...] = ()  # Python packages its reader imports (installed by make install)

    def root(self) -> Path:
        """The root torchvision's class is given."""
        return data_dir() / self.folder if self.subroot else data_dir()

    def where(self) -> Path:
        """The folder that holds this dataset's files (for messages)."""
        return data_dir() / self.folder


SPECS = {
    s.name: s
    for s in (
        VisionSpec(
            "cifar100",
            "CIFAR100",
            100,
            {"train": {"train": True}, "test": {"train": False}},
            PAPER_TASK_FOLDER,
        ),
        VisionSpec(
            "mnist", "MNIST", 10, {"train": {"train": True}, "test": {"train": False}}, "MNIST"
        ),
        VisionSpec(
            "fashion-mnist",
            "FashionMNIST",
            10,
            {"train": {"train": True}, "test": {"train": False}},
            "FashionMNIST",
        ),
        VisionSpec(
            "flowers102",
            "Flowers102",
            102,
            {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
            "flowers-102",
            needs=("scipy",),
        ),
        VisionSpec(
            "dtd",
            "DTD",
            47,
            {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
            "dtd",
        ),
        VisionSpec(
            "pets",
            "OxfordIIITPet",
            37,
            {"train": {"split": "trainval"}, "test": {"split": "test"}},
            "oxford-iiit-pet",
        ),
        VisionSpec(
            "svhn",
            "SVHN",
            10,
            {"train": {"split": "train"}, "test": {"split": "test"}},
            "svhn",
            subroot=True,
            needs=("scipy",),
        ),
        VisionSpec("eurosat", "EuroSAT", 10, {"all": {}}, "eurosat"),
        VisionSpec("caltech101", "Caltech101", 101, {"all": {}}, "caltech101"),
    )
}


class ReaderMissingError(TaskError):
    """A torchvision reader's own dependency (scipy, for .mat files) is not installed."""


def _how(name: str) -> str:
    extra = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
    return (
        f"run once with network access (torchvision downloads it into {data_dir()}){extra}, "
        f"or copy it there in torchvision's own layout (set $MIST_FED_DATA to use another root)"
    )


def _open(spec: VisionSpec, kwargs: dict[str, Any], download: bool) -> Any:
    """The torchvision dataset, from the local root or (when reachable) downloaded there."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.cls)
    root = spec.root()
    try:
        return cls(str(root), download=False, **kwargs)
    except ImportError as e:  # a reader's optional dependency (scipy for .mat files)
        raise ReaderMissingError(
            f"task {spec.name!r}: torchvision's {spec.cls} reader needs the Python package "
            f"{e.name or ', '.join(spec.needs)!r}, which is not installed ({e}); run `make install` "
            f"or `pip install {' '.join(spec.needs) or e.name}`"
        ) from e
    except (RuntimeError, FileNotFoundError, OSError) as missing:
        host = DATASET_HOSTS.get(spec.name, "")
        if not download or not url_reachable(host):
            why = "downloads are off" if not download else f"{host} is not reachable (offline?)"
            raise TaskError(
                f"task {spec.name!r}: no data under {spec.where()} ({missing}); "
                f"{why}. To get it: {_how(spec.name)}."
            ) from missing
    except Exception as e:  # damaged files: bad pickles, .mat files, index lines
        raise TaskError(
            f"task {spec.name!r}: the data under {spec.where()} is unreadable "
            f"({type(e).__name__}: {e}); remove it and fetch it again. To get it: {_how(spec.name)}."
        ) from e
    log.info("downloading %s into %s", spec.name, root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as e:  # network errors come in many kinds
        raise TaskError(
            f"task {spec.name!r}: download into {root} failed ({type(e).__name__}: {e}). "
            f"To get it: {_how(spec.name)}."
        ) from e


def _labels(ds: Any) -> list[int]:
    for attr in _LABEL_ATTRS:
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(v) for v in values]
    return [int(ds[i][1]) for i in range(len(ds))]


def _source(name: str, split: str, ds: Any) -> Source:
    def load(i: int) -> Image.Image:
        img = ds[i][0]
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))

    return Source([f"{name}/{split}/{i:06d}" for i in range(len(ds))], _labels(ds), load)


def _classes(ds: Any, n: int) -> list[str]:
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    return [str(c) for c in names] if names and len(names) == n else [str(i) for i in range(n)]


# -- Fashion-MNIST from Debian's idx files ------------------------------------------------

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST family's array format."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise TaskError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_dir() -> Path | None:
    for d in (DEBIAN_FASHION_MNIST, data_dir() / "FashionMNIST" / "raw"):
        if all((d / f).is_file() for pair in _IDX.values() for f in pair):
            return d
    return None


def _idx_source(d: Path, split: str) -> Source:
    images = read_idx(d / _IDX[split][0])
    labels = read_idx(d / _IDX[split][1])
    return Source(
        [f"fashion-mnist/{split}/{i:06d}" for i in range(len(labels))],
        [int(v) for v in labels],
        lambda i: Image.fromarray(images[i], "L"),
    )


# -- registration -------------------------------------------------------------------------


def _locate(spec: VisionSpec) -> Callable[[], Availability]:
    def locate() -> Availability:
        if spec.name == "fashion-mnist" and (d := _idx_dir()) is not None:
            return Availability(True, str(d))
        where = str(spec.where())
        try:
            for kwargs in spec.splits.values():
                _open(spec, kwargs, download=False)
        except ReaderMissingError as e:
            return Availability(False, where, str(e))
        except TaskError:
            host = DATASET_HOSTS.get(spec.name, "")
            online = url_reachable(host)
            how = "downloads on first use" if online else _how(spec.name)
            return Availability(False, where, how, downloadable=online)
        return Availability(True, where)

    return locate


def _factory(spec: VisionSpec) -> Callable[..., Task]:
    def build(
        arg: str | None = None,
        *,
        protocol: str = "vtab-1k",
        shots: int | None = None,
        seed: int = 0,
        download: bool = True,
        **_: Any,
    ) -> Task:
        if arg:
            raise TaskError(f"task {spec.name!r} takes no argument (got {arg!r})")
        sources: dict[str, Source] = {}
        classes = FASHION_CLASSES
        idx = _idx_dir() if spec.name == "fashion-mnist" else None
        if idx is not None:
            log.info("fashion-mnist from %s", idx)
            sources = {s: _idx_source(idx, s) for s in _IDX}
        else:
            for split, kwargs in spec.splits.items():
                ds = _open(spec, kwargs, download)
                sources[split] = _source(spec.name, split, ds)
                classes = _classes(ds, spec.num_classes)
        if "all" in sources:
            sources["train"], sources["test"] = carve(sources.pop("all"), 0.2, seed=0)
        splits = apply_protocol(
            sources["train"],
            sources["test"],
            sources.get("val"),
            protocol=protocol,
            shots=shots,
            seed=seed,
        )
        return Task(spec.name, spec.num_classes, dict(splits), list(classes))

    return build


for _spec in SPECS.values():
    register_task(
        _spec.name,
        num_classes=_spec.num_classes,
        locate=_locate(_spec),
        description=f"torchvision {_spec.cls}",
    )(_factory(_spec))
