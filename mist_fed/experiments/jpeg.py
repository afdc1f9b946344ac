"""The wire's reference point: what sending a task's images themselves would cost, as JPEGs."""

from __future__ import annotations

from mist_fed.data import get_task

JPEG_QUALITY = 75  # PIL's default


def jpeg_bytes_per_image(
    task_spec: str, split: str, limit: int | None = None, size: int = 224
) -> float:
    """Mean bytes of a ``size``-px JPEG (:data:`JPEG_QUALITY`) of ``split``'s first ``limit``
    images: what sending the image itself would cost, the wire's reference point."""
    import io

    from PIL import Image

    s = get_task(task_spec).split(split)
    n = len(s) if limit is None else min(limit, len(s))
    total = 0
    for i in range(n):
        buf = io.BytesIO()
        img = s.image(i).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        total += buf.tell()
    return total / max(n, 1)
