"""``digits``: scikit-learn's bundled 8x8 handwritten digits, a real task that needs no download.

The data is ``sklearn.datasets.load_digits`` (1,797 images, 10 classes, pixel values 0..16):
the test set of UCI's optdigits, shipped inside the scikit-learn wheel. It has no official
test split, so a fixed, stratified 20% (seed 0: every class keeps its share) is held out as
``test``; a protocol (:mod:`.protocols`, VTAB-1k by default) draws train and val from the rest.

Images are 8x8 greys scaled to 0..255 and given as RGB (as Fashion-MNIST's 28x28 are); the
cloud resizes them to the backbone's input with its eval transform. Ids are ``digits-NNNN``,
the image's index in ``load_digits``, so they are the same in every process and on every
machine whatever protocol or seed picked them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from mist_fed.data.protocols import Source, apply_protocol, carve
from mist_fed.data.tasks import Availability, Task, register_task
from mist_fed.errors import TaskError

NAME = "digits"
NUM_CLASSES = 10
TEST_FRACTION = 0.2
TEST_SEED = 0  # the held-out test set is fixed; ``seed`` only redraws train / val
HOW = "pip install scikit-learn"


def _sklearn_datasets() -> Any:
    try:
        import sklearn.datasets
    except ImportError as e:
        raise TaskError(
            f"task {NAME!r} reads scikit-learn's bundled digits, and scikit-learn is not "
            f"installed ({e}); {HOW}"
        ) from e
    return sklearn.datasets


@cache
def _pixels_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as uint8 (n, 8, 8) in 0..255, and their labels."""
    bunch = _sklearn_datasets().load_digits()
    pixels = np.round(np.asarray(bunch.images, dtype=np.float64) * (255 / 16))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    pixels.flags.writeable = False
    return pixels, np.asarray(bunch.target, dtype=np.int64)


def source() -> Source:
    """Every digit image: ids ``digits-NNNN``, labels 0..9, grey 8x8 images."""
    pixels, labels = _pixels_and_labels()
    return Source(
        [f"{NAME}-{i:04d}" for i in range(len(labels))],
        [int(v) for v in labels],
        lambda i: Image.fromarray(pixels[i], "L"),
    )


def locate() -> Availability:
    try:
        datasets = _sklearn_datasets()
    except TaskError:
        return Availability(False, "scikit-learn (not installed)", HOW)
    import sklearn

    return Availability(True, f"scikit-learn {sklearn.__version__} ({datasets.__name__})")


@register_task(
    NAME,
    num_classes=NUM_CLASSES,
    locate=locate,
    description="scikit-learn load_digits (UCI optdigits 8x8, bundled)",
)
def digits_task(
    arg: str | None = None,
    *,
    protocol: str = "vtab-1k",
    shots: int | None = None,
    seed: int = 0,
    **_: Any,
) -> Task:
    if arg:
        raise TaskError(f"task {NAME!r} takes no argument (got {arg!r})")
    train, test = carve(source(), TEST_FRACTION, seed=TEST_SEED, stratify=True)
    splits = apply_protocol(train, test, protocol=protocol, shots=shots, seed=seed)
    return Task(NAME, NUM_CLASSES, dict(splits), [str(c) for c in range(NUM_CLASSES)])
