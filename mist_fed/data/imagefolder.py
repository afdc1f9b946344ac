"""``imagefolder:PATH``: a user's own images in torchvision's folder layout.

``PATH/train/<class>/*`` (required), ``PATH/val/<class>/*`` (optional: without it the protocol
carves val out of train), ``PATH/test/<class>/*`` (required). Classes are the sorted
sub-folder names of ``train``; ids are paths relative to ``PATH`` (``train/cat/001.jpg``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from mist_fed.data.protocols import Source, apply_protocol
from mist_fed.data.tasks import Task, register_task
from mist_fed.errors import TaskError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def _folder_source(root: Path, split: str, classes: list[str]) -> Source:
    ids: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / split / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                ids.append(f"{split}/{name}/{f.name}")
                labels.append(label)
    extra = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise TaskError(
            f"{root / split} has classes that {root / 'train'} lacks: {extra[:5]}; "
            "every class needs training images"
        )
    if not ids:
        raise TaskError(f"no images under {root / split}/<class>/ (suffixes: jpg, png, ...)")

    def load(i: int) -> Image.Image:
        with Image.open(root / ids[i]) as img:
            return img.convert("RGB")

    return Source(ids, labels, load)


@register_task(
    "imagefolder", description="your images: PATH/{train,val?,test}/<class>/*", requires_arg=True
)
def imagefolder_task(
    arg: str | None = None,
    *,
    protocol: str = "full",
    shots: int | None = None,
    seed: int = 0,
    **_: Any,
) -> Task:
    """Build the task; the default protocol is ``full`` (all your training images)."""
    if not arg:
        raise TaskError("give the folder: imagefolder:PATH (with PATH/train/<class>/...)")
    root = Path(arg).expanduser()
    for need in ("train", "test"):
        if not (root / need).is_dir():
            raise TaskError(
                f"imagefolder: {root / need} is not a folder; expected torchvision's layout "
                f"{root}/train/<class>/*, {root}/test/<class>/* and optionally {root}/val/<class>/*"
            )
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if len(classes) < 2:
        raise TaskError(f"imagefolder: {root / 'train'} needs at least 2 class folders")
    train = _folder_source(root, "train", classes)
    test = _folder_source(root, "test", classes)
    val = _folder_source(root, "val", classes) if (root / "val").is_dir() else None
    splits = apply_protocol(train, test, val, protocol=protocol, shots=shots, seed=seed)
    return Task(f"imagefolder:{root}", len(classes), dict(splits), classes)
