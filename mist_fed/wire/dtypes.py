"""Wire dtypes: what each costs per image and how the int8 ones quantize (numpy only, no torch).

* ``float32``, ``float16``: the features as they are (float16 rounded).
* ``int8``: absmax int8 with one float32 scale per token (over the channel axis).
* ``int8ch``: absmax int8 with one float32 scale per channel of each image (over the token
  axis). ViT features have a few channels far larger than the rest; a per-token scale spends
  its 255 steps on those, a per-channel scale gives every channel its own. The bytes differ
  only by the scales: one per channel instead of one per token. A feature vector with no token axis (``final``)
  keeps one scale per image under either int8.

``x ~= q * scale / 127`` for both; :func:`scale_shape` says the scale's shape per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

WIRE_DTYPES = ("float32", "float16", "int8", "int8ch")
QUANTIZED = ("int8", "int8ch")
ELEMENT_BYTES = {"float32": 4, "float16": 2, "int8": 1, "int8ch": 1}
NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "int8ch": np.int8}


def _reduce_axis(ndim: int, dtype: str) -> int:
    """The axis the absmax runs over, counted from the end: channels (-1) or tokens (-2)."""
    return -2 if dtype == "int8ch" and ndim >= 2 else -1


def scale_shape(shape: Sequence[int], dtype: str = "int8") -> tuple[int, ...]:
    """Shape of one image's float32 scales for a feature ``shape`` under a quantized dtype."""
    if dtype not in QUANTIZED:
        raise ValueError(f"{dtype!r} has no scales; quantized dtypes are {QUANTIZED}")
    shape = tuple(shape)
    if _reduce_axis(len(shape), dtype) == -2:
        return (*shape[:-2], shape[-1])
    return shape[:-1] or (1,)


def feature_bytes(shape: Sequence[int], dtype: str = "float32") -> int:
    """Bytes of one image's features on the wire, scales included."""
    n = math.prod(shape) * ELEMENT_BYTES[dtype]
    if dtype in QUANTIZED:
        n += 4 * math.prod(scale_shape(shape, dtype))
    return n


def quantize(x: np.ndarray, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Absmax int8 of ``[n, *shape]`` features: ``(q [n, *shape], scale [n, *scale_shape])``."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=_reduce_axis(x.ndim - 1, dtype), keepdims=True)
    scale = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale * np.float32(127.0)), -127, 127).astype(np.int8)
    return q, scale.reshape(len(x), *scale_shape(x.shape[1:], dtype))


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: str = "int8") -> np.ndarray:
    """Float32 features from int8 ``q [n, *shape]`` and their ``scale [n, *scale_shape]``."""
    s = np.asarray(scale, dtype=np.float32)
    if _reduce_axis(q.ndim - 1, dtype) == -2:
        s = s.reshape(*q.shape[:-2], 1, q.shape[-1])
    else:
        s = s.reshape(*q.shape[:-1], 1)
    return q.astype(np.float32) * (s / np.float32(127.0))
