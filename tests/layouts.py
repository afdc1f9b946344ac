"""Tiny datasets in torchvision's on-disk layouts, one builder per registered torchvision task.

Each ``make_<task>(root)`` writes a few small images (and the index files torchvision's reader
expects) under ``root`` exactly where ``torchvision.datasets.<Class>(root)`` looks, and returns
the number of images per official split. Readers that check the MD5 of their index files
(Flowers102, CIFAR100, SVHN) are switched off with :func:`skip_md5`, as torchvision's own tests
do; product code never does.
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# modules whose readers compare their files' MD5 with the official archives'
MD5_CHECKED = (
    "torchvision.datasets.flowers102",
    "torchvision.datasets.cifar",
    "torchvision.datasets.svhn",
)


def skip_md5(monkeypatch) -> None:
    """Make torchvision's ``check_integrity`` accept the fixtures' files (existence only)."""
    import importlib

    for name in MD5_CHECKED:
        mod = importlib.import_module(name)
        monkeypatch.setattr(mod, "check_integrity", lambda path, md5=None: Path(path).is_file())


def skip_md5_source() -> str:
    """The same switch as Python source, for a child process (``python -c``)."""
    return (
        "import importlib, pathlib\n"
        f"for _m in {MD5_CHECKED!r}:\n"
        "    importlib.import_module(_m).check_integrity = "
        "lambda path, md5=None: pathlib.Path(path).is_file()\n"
    )


def _img(i: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(i)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)


def make_flowers102(root: Path, classes: int = 3, per_split: int = 6) -> dict[str, int]:
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    n = 3 * per_split
    for i in range(1, n + 1):
        _img(i).save(base / "jpg" / f"image_{i:05d}.jpg")
    ids = np.arange(1, n + 1)
    savemat(base / "imagelabels.mat", {"labels": (ids % classes) + 1})  # 1-based labels
    trn, val, tst = ids[:per_split], ids[per_split : 2 * per_split], ids[2 * per_split :]
    savemat(base / "setid.mat", {"trnid": trn, "valid": val, "tstid": tst})
    return {"train": per_split, "val": per_split, "test": per_split}


def make_cifar100(root: Path, train: int = 10, test: int = 5) -> dict[str, int]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        entry = {
            "data": rng.integers(0, 255, (n, 3 * 32 * 32), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(n)],
        }
        (base / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
    (base / "meta").write_bytes(pickle.dumps(meta))
    return {"train": train, "test": test}


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def make_mnist(root: Path, train: int = 10, test: int = 5, folder: str = "MNIST") -> dict[str, int]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return {"train": train, "test": test}


def make_dtd(root: Path, classes: tuple[str, ...] = ("banded", "dotted")) -> dict[str, int]:
    data = root / "dtd" / "dtd"
    counts = {}
    i = 0
    for split in ("train", "val", "test"):
        lines = []
        for c in classes:
            (data / "images" / c).mkdir(parents=True, exist_ok=True)
            for j in range(3):
                name = f"{c}_{split}_{j}.jpg"
                _img(i).save(data / "images" / c / name)
                lines.append(f"{c}/{name}")
                i += 1
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
        counts[split] = len(lines)
    return counts


def make_pets(root: Path, breeds: tuple[str, ...] = ("Abyssinian", "beagle")) -> dict[str, int]:
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir(parents=True)
    counts = {}
    i = 0
    for split, n in (("trainval", 4), ("test", 2)):
        lines = []
        for label, breed in enumerate(breeds, 1):
            for _ in range(n):
                i += 1
                _img(i).save(base / "images" / f"{breed}_{i}.jpg")
                lines.append(f"{breed}_{i} {label} {1 + label % 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        counts["train" if split == "trainval" else split] = len(lines)
    return counts


def make_svhn(root: Path, train: int = 10, test: int = 5) -> dict[str, int]:
    from scipy.io import savemat

    base = root / "svhn"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        x = rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN labels 0 as 10
        savemat(base / f"{split}_32x32.mat", {"X": x, "y": y})
    return {"train": train, "test": test}


def make_eurosat(root: Path, classes: tuple[str, ...] = ("Forest", "River"), n: int = 10) -> dict:
    data = root / "eurosat" / "2750"
    for c in classes:
        (data / c).mkdir(parents=True)
        for j in range(n):
            _img(zlib.crc32(f"{c}/{j}".encode()) % 1000).save(data / c / f"{c}_{j + 1}.jpg")
    return {"all": n * len(classes)}


def make_caltech101(
    root: Path, classes: tuple[str, ...] = ("accordion", "ant"), n: int = 10
) -> dict:
    cats = root / "caltech101" / "101_ObjectCategories"
    for c in (*classes, "BACKGROUND_Google"):
        (cats / c).mkdir(parents=True)
        for j in range(1, n + 1):
            _img(j, mode="L" if j % 2 else "RGB").save(cats / c / f"image_{j:04d}.jpg")
    return {"all": n * len(classes)}


def make_fashion_mnist(root: Path) -> dict[str, int]:
    # torchvision's extracted idx files (the .gz ones are read by our own idx reader, tested
    # in test_tasks.py)
    return make_mnist(root, folder="FashionMNIST")


LAYOUTS: dict[str, Callable[[Path], dict[str, int]]] = {
    "flowers102": make_flowers102,
    "cifar100": make_cifar100,
    "dtd": make_dtd,
    "pets": make_pets,
    "svhn": make_svhn,
    "eurosat": make_eurosat,
    "caltech101": make_caltech101,
    "mnist": make_mnist,
    "fashion-mnist": make_fashion_mnist,
}
