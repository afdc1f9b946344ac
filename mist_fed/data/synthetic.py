"""``synthetic:classes=4,train=32,val=8,test=16,size=32,seed=0``: small learnable images for tests.

Each class has its own mean colour and stripe direction; every image adds seeded noise,
so ids, labels and pixels are the same on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mist_fed.data.tasks import Task, register_task
from mist_fed.errors import TaskError

DEFAULTS = {"classes": 4, "train": 32, "val": 8, "test": 16, "size": 32, "seed": 0}


def parse_options(arg: str | None) -> dict[str, int]:
    opts = dict(DEFAULTS)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in opts or not value.lstrip("-").isdigit():
            raise TaskError(
                f"bad synthetic task option {part!r}; use keys {', '.join(DEFAULTS)} with integers"
            )
        opts[key] = int(value)
    if opts["classes"] < 2 or opts["size"] < 8 or min(opts["train"], opts["val"], opts["test"]) < 1:
        raise TaskError(
            f"synthetic task needs classes >= 2, size >= 8, and >= 1 image per split: {opts}"
        )
    return opts


@dataclass
class SyntheticSplit:
    name: str
    n: int
    classes: int
    size: int
    seed: int

    @property
    def ids(self) -> Sequence[str]:
        return [f"{self.name}-{i:06d}" for i in range(self.n)]

    @property
    def labels(self) -> Sequence[int]:
        return [i % self.classes for i in range(self.n)]

    def image(self, i: int) -> Image.Image:
        if not 0 <= i < self.n:
            raise IndexError(i)
        label = i % self.classes
        rng = np.random.default_rng([self.seed, ord(self.name[0]), i])
        base = np.random.default_rng([self.seed, label]).uniform(40, 215, size=3)
        yy, xx = np.mgrid[0 : self.size, 0 : self.size]
        stripes = np.sin((xx if label % 2 else yy) * (1 + label) * np.pi / self.size * 2)
        img = (
            base[None, None, :]
            + 30 * stripes[..., None]
            + rng.normal(0, 12, (self.size, self.size, 3))
        )
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    def __len__(self) -> int:
        return self.n


@register_task("synthetic")
def synthetic_task(arg: str | None = None, **_: object) -> Task:
    o = parse_options(arg)
    splits = {
        s: SyntheticSplit(s, o[s], o["classes"], o["size"], o["seed"])
        for s in ("train", "val", "test")
    }
    name = "synthetic" + (f":{arg}" if arg else "")
    return Task(
        name=name,
        num_classes=o["classes"],
        splits=dict(splits),
        classes=[f"c{c}" for c in range(o["classes"])],
    )
