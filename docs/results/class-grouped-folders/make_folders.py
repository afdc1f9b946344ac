"""Class-grouped image folders from real datasets (#22 measurement): train/val/test/<class>/*.png."""

import gzip
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write(root, split, images, labels, names, per_class, rng):
    for c, name in enumerate(names):
        members = np.flatnonzero(labels == c)
        pick = members if per_class is None else rng.choice(members, per_class, replace=False)
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in sorted(pick):
            Image.fromarray(images[i]).save(d / f"{i:05d}.png")


rng = np.random.default_rng(22)
fm = Path("/usr/share/datasets/fashion-mnist")
names = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]
tx, ty = idx(fm / "train-images-idx3-ubyte.gz"), idx(fm / "train-labels-idx1-ubyte.gz")
sx, sy = idx(fm / "t10k-images-idx3-ubyte.gz"), idx(fm / "t10k-labels-idx1-ubyte.gz")
root = Path("fmnist-folder")
perm = rng.permutation(len(ty))
tr, va = perm[:30000], perm[30000:]
write(root, "train", tx[tr], ty[tr], names, 80, rng)
write(root, "val", tx[va], ty[va], names, 20, rng)
write(root, "test", sx, sy, names, 100, rng)

d = load_digits()
img = (d.images * 255 / 16).astype(np.uint8)
y = d.target
perm = rng.permutation(len(y))
test_idx = []
train_idx, val_idx = [], []
for c in range(10):
    m = [i for i in perm if y[i] == c]
    train_idx += m[:80]
    val_idx += m[80:100]
    test_idx += m[100:]
root = Path("digits-folder")
dn = [f"digit{c}" for c in range(10)]
for split, ids in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
    ids = np.array(ids)
    write(root, split, img[ids], y[ids], dn, None, rng)
