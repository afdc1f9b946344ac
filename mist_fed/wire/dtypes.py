"""Wire dtypes: what each costs per image and how the quantized ones quantize (numpy only).

A wire dtype's name is a *base* dtype, optionally ``+`` an Arrow IPC buffer codec
(``float16+zstd``, ``int8ch+lz4``, ``int4ch+zstd``):

* ``float32``, ``float16``: the features as they are (float16 rounded).
* ``int8``: absmax int8 with one float32 scale per token (over the channel axis).
* ``int8ch``: absmax int8 with one float32 scale per channel of each image (over the token
  axis). ViT features have a few channels far larger than the rest; a per-token scale spends
  its 255 steps on those, a per-channel scale gives every channel its own. The bytes differ
  only by the scales: one per channel instead of one per token. A feature vector with no token axis (``final``)
  keeps one scale per image under either int8.
* ``int4``, ``int4ch``: the same absmax scales (per token, per channel) with 15 levels
  (``q`` in ``[-7, 7]``), two values packed per byte along the channel axis: channel ``2j`` in
  the low nibble, ``2j+1`` in the high one, each a 4-bit two's complement. An odd channel count
  leaves the last byte's high nibble 0. Code ``-8`` never occurs and is refused on decoding.
* ``<base>+zstd``, ``<base>+lz4``: ``base``'s record batches, their buffers compressed by Arrow
  IPC on the wire (``pyarrow.ipc.IpcWriteOptions(compression=...)``) and decompressed by the
  reader. The cloud stores and the device caches ``base``'s columns; only the link sees the
  codec. Their size depends on the data: :func:`feature_bytes` refuses to predict it, the
  client measures it (:func:`mist_fed.wire.codec.batch_nbytes`).

``x ~= q * scale / L`` (``L`` = 127 for int8, 7 for int4); :func:`scale_shape` says the scale's
shape per image.

A channel projection may come first: ``pca<D>-<dtype>`` (``pca192-int4ch``, ``pca64-int8ch+zstd``)
sends each token's ``D`` coordinates in the principal axes the cloud fitted on a fixed image
sample for the backbone and gather (``pca<D>task-<dtype>``: fitted on the task's training
images instead), in ``<dtype>``. The features are ``[..., D]`` instead of ``[..., C]``: the
edge net is sized from that (:func:`wire_projection`), and the stream names the basis by id
(:mod:`mist_fed.wire.projection`), so a device trained on one basis refuses another's features.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mist_fed.errors import ConfigError

BASE_DTYPES = ("float32", "float16", "int8", "int8ch", "int4", "int4ch")
CODECS = ("zstd", "lz4")
#: Every wire dtype, by name: the bases (fixed size), then each base + each codec.
WIRE_DTYPES = BASE_DTYPES + tuple(f"{b}+{c}" for c in CODECS for b in BASE_DTYPES)
#: The names whose bytes per image the cost model predicts exactly (no codec).
FIXED_SIZE = BASE_DTYPES
QUANTIZED = ("int8", "int8ch", "int4", "int4ch")
PACKED = ("int4", "int4ch")  # two values per byte
#: Bytes per feature value on the wire (int4: half a byte; a row of C channels packs into
#: ceil(C / 2) bytes, see :func:`packed_shape`).
ELEMENT_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "int8": 1,
    "int8ch": 1,
    "int4": 0.5,
    "int4ch": 0.5,
}
#: The numpy dtype of the ``features`` column (int4: the packed bytes).
NUMPY_DTYPE = {
    "float32": np.float32,
    "float16": np.float16,
    "int8": np.int8,
    "int8ch": np.int8,
    "int4": np.uint8,
    "int4ch": np.uint8,
}
LEVELS = {"int8": 127, "int8ch": 127, "int4": 7, "int4ch": 7}


MAX_PROJECTED_DIM = 4096
_PROJECTED = re.compile(r"pca([1-9][0-9]{0,3})(task)?-(.+)")
WIRE_HELP = f"{', '.join(WIRE_DTYPES)}, or pca<D>[task]-<any of these> (e.g. pca192-int4ch)"


@dataclass(frozen=True)
class Wire:
    """A parsed wire name: an optional channel projection, the base dtype, an optional codec."""

    name: str
    base: str
    codec: str | None = None
    dims: int | None = None  # channels after the projection (None: no projection)
    scope: str | None = None  # where the projection was fitted: "sample" or "task"

    @property
    def projected(self) -> bool:
        return self.dims is not None

    @property
    def encoded(self) -> str:
        """The name without the projection: how the projected coordinates are sent."""
        return self.base if self.codec is None else f"{self.base}+{self.codec}"


def parse_wire(name: str) -> Wire:
    """``"pca192task-int4ch+zstd"`` -> its parts; ``ValueError`` naming the choices if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"a wire dtype is a name, got {name!r}")
    dims: int | None = None
    scope: str | None = None
    rest = name
    m = _PROJECTED.fullmatch(name)
    if m is not None:
        dims, scope, rest = int(m.group(1)), "task" if m.group(2) else "sample", m.group(3)
        if dims > MAX_PROJECTED_DIM:
            raise ValueError(f"wire {name!r} projects to {dims} channels, over {MAX_PROJECTED_DIM}")
    if rest not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {name!r}; choose {WIRE_HELP}")
    base, _, codec = rest.partition("+")
    return Wire(name, base, codec or None, dims, scope)


def check_wire(name: str, error: type[Exception], field: str = "") -> Wire:
    """:func:`parse_wire`, its one-line ``ValueError`` raised as ``error`` (after ``field: ``):
    how a config, a request or a command line refuses a wire name in its own kind of error."""
    try:
        return parse_wire(name)
    except ValueError as e:
        raise error(f"{field}: {e}" if field else str(e)) from None


def wire_arg(name: str) -> str:
    """argparse ``type=`` for a wire name: ``name``, or the parser's error naming the choices."""
    import argparse

    check_wire(name, argparse.ArgumentTypeError)
    return name


def is_fixed_size(name: str) -> bool:
    """Whether the cost model predicts the wire's bytes per image exactly (no codec)."""
    return parse_wire(name).codec is None


def wire_dim(name: str, channels: int) -> int:
    """Channels per token on the wire: the projection's ``D``, else the backbone's ``channels``."""
    dims = parse_wire(name).dims
    if dims is not None and dims > channels:
        raise ValueError(f"wire {name!r} projects to {dims} channels; the features have {channels}")
    return channels if dims is None else dims


def wire_projection(name: str) -> int | None:
    """The channels a wire projects to (``None``: the backbone's own); ``ConfigError`` if
    ``name`` is no wire."""
    return check_wire(name, ConfigError).dims


def wire_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    """A gather's per-image feature ``shape`` as the wire ``name`` sends it."""
    shape = tuple(shape)
    if not parse_wire(name).projected:
        return shape
    if len(shape) != 2:
        raise ValueError(
            f"wire {name!r} projects a [tokens, channels] map; this gather's feature is {list(shape)}"
        )
    return (shape[0], wire_dim(name, shape[1]))


def stored_dtype(name: str) -> str:
    """What the cloud's store keeps for a wire: its base, or float16 maps to project from."""
    wire = parse_wire(name)
    return "float16" if wire.projected else wire.base


def split_dtype(name: str) -> tuple[str, str | None]:
    """``"int8ch+zstd"`` -> ``("int8ch", "zstd")``; ``"pca64-float16"`` -> ``("float16", None)``."""
    wire = parse_wire(name)
    return wire.base, wire.codec


def base_dtype(name: str) -> str:
    """The column layout of a wire dtype: its name without projection and codec."""
    return split_dtype(name)[0]


def codec_of(name: str) -> str | None:
    """The Arrow IPC buffer codec of a wire dtype (``None``: uncompressed)."""
    return split_dtype(name)[1]


def _reduce_axis(ndim: int, dtype: str) -> int:
    """The axis the absmax runs over, counted from the end: channels (-1) or tokens (-2)."""
    return -2 if dtype in ("int8ch", "int4ch") and ndim >= 2 else -1


def scale_shape(shape: Sequence[int], dtype: str = "int8") -> tuple[int, ...]:
    """Shape of one image's float32 scales for a feature ``shape`` under a quantized dtype."""
    dtype = base_dtype(dtype)
    if dtype not in QUANTIZED:
        raise ValueError(f"{dtype!r} has no scales; quantized dtypes are {QUANTIZED}")
    shape = tuple(shape)
    if _reduce_axis(len(shape), dtype) == -2:
        return (*shape[:-2], shape[-1])
    return shape[:-1] or (1,)


def packed_shape(shape: Sequence[int], dtype: str) -> tuple[int, ...]:
    """Shape of one image's ``features`` column: ``shape``, or int4's ``ceil(C / 2)`` bytes."""
    shape = tuple(shape)
    if base_dtype(dtype) in PACKED:
        if not shape:
            raise ValueError("an int4 feature needs a channel axis to pack along")
        return (*shape[:-1], (shape[-1] + 1) // 2)
    return shape


def feature_bytes(shape: Sequence[int], dtype: str = "float32") -> int:
    """Bytes of one image's features on the wire, scales included (fixed-size dtypes only).

    A compressed dtype (``base+codec``) has no fixed size: its bytes depend on the data and
    are measured, never predicted, so this raises ``ValueError`` for one.
    """
    wire = parse_wire(dtype)
    base, codec = wire.base, wire.codec
    if codec is not None:
        raise ValueError(
            f"{dtype!r} is compressed: its bytes per image depend on the data and are measured "
            f"on the wire, not predicted (its uncompressed size is that of {base!r})"
        )
    n = math.prod(packed_shape(shape, base)) * (1 if base in PACKED else int(ELEMENT_BYTES[base]))
    if base in QUANTIZED:
        n += 4 * math.prod(scale_shape(shape, base))
    return n


def quantize(x: np.ndarray, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Absmax ``[n, *shape]`` features: ``(q [n, *packed_shape], scale [n, *scale_shape])``."""
    dtype = base_dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    levels = np.float32(LEVELS[dtype])
    absmax = np.abs(x).max(axis=_reduce_axis(x.ndim - 1, dtype), keepdims=True)
    scale = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale * levels), -levels, levels).astype(np.int8)
    if dtype in PACKED:
        q = pack_int4(q)
    return q, scale.reshape(len(x), *scale_shape(x.shape[1:], dtype))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 codes in ``[-7, 7]`` -> uint8, two per byte along the last axis (low nibble first)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.int8)], axis=-1)
    u = q.view(np.uint8) & np.uint8(0x0F)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << np.uint8(4)))


def unpack_int4(p: np.ndarray, channels: int) -> np.ndarray:
    """uint8 packed codes -> int8 ``[..., channels]``; ``ValueError`` on bytes no encoder writes."""
    p = np.asarray(p)
    if p.dtype != np.uint8 or p.shape[-1] != (channels + 1) // 2:
        raise ValueError(
            f"packed int4 column is {p.dtype} [..., {p.shape[-1]}], expected uint8 "
            f"[..., {(channels + 1) // 2}] for {channels} channels"
        )
    nib = np.empty((*p.shape[:-1], 2 * p.shape[-1]), np.uint8)
    nib[..., 0::2] = p & np.uint8(0x0F)
    nib[..., 1::2] = p >> np.uint8(4)
    if channels % 2 and nib.size and nib[..., -1].any():
        raise ValueError("packed int4 column has a nonzero padding nibble (odd channel count)")
    q = nib[..., :channels].astype(np.int8)
    q[q >= 8] -= 16
    if (q == -8).any():
        raise ValueError("packed int4 column holds code -8, outside the encoder's [-7, 7]")
    return q


def dequantize(
    q: np.ndarray, scale: np.ndarray, dtype: str = "int8", channels: int = 0
) -> np.ndarray:
    """Float32 features from ``q [n, *packed_shape]`` and ``scale [n, *scale_shape]``.

    ``channels`` is the unpacked last dimension (needed for int4 only: an odd count packs into
    the same bytes as the next even one).
    """
    dtype = base_dtype(dtype)
    if dtype in PACKED:
        q = unpack_int4(q, channels)
    s = np.asarray(scale, dtype=np.float32)
    if _reduce_axis(q.ndim - 1, dtype) == -2:
        s = s.reshape(*q.shape[:-2], 1, q.shape[-1])
    else:
        s = s.reshape(*q.shape[:-1], 1)
    return q.astype(np.float32) * (s / np.float32(LEVELS[dtype]))
