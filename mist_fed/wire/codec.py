"""The Arrow wire format of features: one schema layout, pure encode/decode, a ``Stats`` record.

Every feature batch has the columns of :data:`FEATURE_COLUMNS`:

* ``id`` (string), ``label`` (int64, null where unknown),
* ``features``: ``arrow.fixed_shape_tensor`` of the per-image shape (``[tokens, dim]`` for
  ``mist``/``block``, ``[N+1, tokens, dim]`` for ``side``, ``[dim]`` for ``final``),
* ``scale`` (``int8`` and ``int8ch`` only): float32 absmax scales, per token for ``int8``,
  per channel for ``int8ch`` (shapes in :mod:`mist_fed.wire.dtypes`), so ``x ~= q * scale / 127``.

Schema metadata records ``backbone``, ``weights`` (``Backbone.weights_id``), ``gather``, ``k``,
``dtype`` and the format version. Decoding is zero-copy where pyarrow allows (one chunk of
float32/float16); the int8 dtypes are dequantized to float32.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mist_fed.errors import WireError
from mist_fed.wire.dtypes import (
    NUMPY_DTYPE,
    QUANTIZED,
    WIRE_DTYPES,
    dequantize,
    quantize,
    scale_shape,
)
from mist_fed.wire.features import FeatureSet

WIRE_VERSION = "1"
FEATURE_COLUMNS = ("id", "label", "features", "scale")
META_KEYS = ("backbone", "weights", "gather", "k", "dtype", "shape")

#: What a device uploads to ``do_exchange``: its own encoded images (PNG/JPEG bytes).
UPLOAD_SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("image", pa.binary())]
)

_ARROW_DTYPE = {d: pa.from_numpy_dtype(t) for d, t in NUMPY_DTYPE.items()}


@dataclass(frozen=True)
class WireMeta:
    """What a feature stream claims to hold; lives in the schema metadata."""

    backbone: str
    weights: str
    gather: str
    k: int | None
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise WireError(
                f"unknown feature dtype {self.dtype!r}; choose one of {', '.join(WIRE_DTYPES)}"
            )

    def to_metadata(self) -> dict[bytes, bytes]:
        return {
            b"mist_fed.version": WIRE_VERSION.encode(),
            b"mist_fed.backbone": self.backbone.encode(),
            b"mist_fed.weights": self.weights.encode(),
            b"mist_fed.gather": self.gather.encode(),
            b"mist_fed.k": b"" if self.k is None else str(self.k).encode(),
            b"mist_fed.dtype": self.dtype.encode(),
            b"mist_fed.shape": json.dumps(list(self.shape)).encode(),
        }

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> WireMeta:
        md = schema.metadata or {}
        if b"mist_fed.version" not in md:
            raise WireError(
                "stream has no mist_fed schema metadata: it is not a mist-fed feature stream"
            )
        try:
            get = {k.decode().removeprefix("mist_fed."): v.decode() for k, v in md.items()}
            if get.get("version") != WIRE_VERSION:
                raise WireError(
                    f"wire format version {get.get('version')!r} is not {WIRE_VERSION!r}; "
                    "update the client or the server so they match"
                )
            return cls(
                backbone=get["backbone"],
                weights=get["weights"],
                gather=get["gather"],
                k=int(get["k"]) if get["k"] else None,
                dtype=get["dtype"],
                shape=tuple(json.loads(get["shape"])),
            )
        except (KeyError, ValueError) as e:
            raise WireError(f"feature stream has no valid mist_fed schema metadata ({e})") from e

    def as_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "gather": self.gather,
            "k": self.k,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }


@functools.lru_cache(maxsize=256)
def feature_schema(meta: WireMeta) -> pa.Schema:
    """The schema of a feature stream (the column layout of :data:`FEATURE_COLUMNS`); cached."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("features", pa.fixed_shape_tensor(_ARROW_DTYPE[meta.dtype], list(meta.shape))),
    ]
    if meta.dtype in QUANTIZED:
        scales = list(scale_shape(meta.shape, meta.dtype))
        fields.append(pa.field("scale", pa.fixed_shape_tensor(pa.float32(), scales)))
    return pa.schema(fields, metadata=meta.to_metadata())


def encode_arrays(meta: WireMeta, features: np.ndarray | torch.Tensor) -> dict[str, pa.Array]:
    """Encode ``[n, *shape]`` float features as the ``features`` (and ``scale``) columns."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    if tuple(features.shape[1:]) != tuple(meta.shape):
        raise WireError(
            f"features of shape {tuple(features.shape[1:])} do not match the stream's {meta.shape}"
        )
    if not np.isfinite(features).all():  # int8 would turn NaN into silent garbage
        raise WireError(
            "features hold NaN or Inf; refusing to encode them (check the backbone's weights)"
        )
    if meta.dtype in QUANTIZED:
        q, scale = quantize(features, meta.dtype)
        return {
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(q)),
            "scale": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(scale)),
        }
    arr = np.ascontiguousarray(features, dtype=NUMPY_DTYPE[meta.dtype])
    return {"features": pa.FixedShapeTensorArray.from_numpy_ndarray(arr)}


def assemble_batch(
    meta: WireMeta,
    ids: Sequence[str],
    labels: Sequence[int | None],
    columns: dict[str, pa.Array],
) -> pa.RecordBatch:
    """A record batch from ids, labels (``None`` or negative = unknown) and encoded columns."""
    schema = feature_schema(meta)
    arrays: list[pa.Array] = [
        pa.array(list(ids), pa.string()),
        pa.array([None if (v is None or v < 0) else int(v) for v in labels], pa.int64()),
    ]
    for name in schema.names[2:]:
        arrays.append(columns[name])
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def encode(
    meta: WireMeta,
    ids: Sequence[str],
    labels: Sequence[int | None],
    features: np.ndarray | torch.Tensor,
) -> pa.RecordBatch:
    """Pure encoder: one record batch of features in ``meta.dtype``."""
    return assemble_batch(meta, ids, labels, encode_arrays(meta, features))


def _tensor_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 1:
            col = col.chunk(0)
        else:
            col = pa.concat_arrays(col.chunks) if col.num_chunks else col.type.wrap_array([])
    return np.asarray(col.to_numpy_ndarray())


def check_schema(schema: pa.Schema, meta: WireMeta) -> None:
    """Raise ``WireError`` unless ``schema`` has exactly the columns ``meta`` promises."""
    want = feature_schema(meta)
    if schema.names != want.names:
        raise WireError(
            f"feature stream has columns {schema.names}, expected {want.names} for {meta.dtype}"
        )
    for got, exp in zip(schema, want, strict=True):
        if not got.type.equals(exp.type):
            raise WireError(
                f"feature column {got.name!r} is {got.type}, expected {exp.type} "
                f"(shape {list(meta.shape)} in the stream's metadata)"
            )


def decode_ipc(data: bytes | pa.Buffer) -> FeatureSet:
    """Decode an Arrow IPC stream of feature batches (e.g. bytes saved from the wire)."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise WireError(f"not a readable Arrow IPC feature stream ({type(e).__name__}: {e})") from e
    return decode(table)


def decode(data: pa.RecordBatch | pa.Table | Iterable[pa.RecordBatch]) -> FeatureSet:
    """Pure decoder: record batch(es) -> :class:`FeatureSet` (int8 dequantized to float32).

    Refuses with :class:`WireError` a stream whose columns or tensor shapes differ from its
    metadata, and features that are not finite (NaN or Inf).
    """
    try:
        if not isinstance(data, pa.RecordBatch | pa.Table):
            batches = list(data)
            if not batches:
                raise WireError("cannot decode an empty list of batches: the schema is unknown")
            data = pa.Table.from_batches(batches)
        meta = WireMeta.from_schema(data.schema)
        check_schema(data.schema, meta)
        fs = _decode_checked(data, meta)
    except (pa.ArrowException, ValueError, TypeError, KeyError, RecursionError) as e:
        raise WireError(f"feature stream does not decode ({type(e).__name__}: {e})") from e
    if fs.features.numel() and not bool(torch.isfinite(fs.features).all()):
        bad = int((~torch.isfinite(fs.features)).flatten(1).any(1).sum())
        raise WireError(
            f"{bad} of {len(fs)} feature rows hold NaN or Inf; refusing them "
            "(the cloud's backbone or encoder is broken: report it to its operator)"
        )
    return fs


def _decode_checked(data: pa.RecordBatch | pa.Table, meta: WireMeta) -> FeatureSet:
    n = data.num_rows
    ids = data.column("id").to_pylist()
    # to_pylist, not pyarrow.compute's fill_null: its kernels cost ~35 MB on a device
    labels = torch.tensor([-1 if v is None else v for v in data.column("label").to_pylist()])
    labels = labels.to(torch.int64)
    if n == 0:
        torch_dtype = torch.float16 if meta.dtype == "float16" else torch.float32
        feats = torch.empty((0, *meta.shape), dtype=torch_dtype)
    else:
        x = _tensor_numpy(data.column("features"))
        if meta.dtype in QUANTIZED:
            x = dequantize(x, _tensor_numpy(data.column("scale")), meta.dtype)
        with warnings.catch_warnings():  # Arrow buffers are read-only; share them, do not copy
            warnings.simplefilter("ignore", UserWarning)
            feats = torch.from_numpy(x)
    return FeatureSet(ids, labels, feats, meta.as_dict())


@dataclass
class Stats:
    """Wire byte accounting: bytes, rows and batches seen on one stream (or summed)."""

    bytes: int = 0
    rows: int = 0
    batches: int = 0
    per_client: dict[str, int] = field(default_factory=dict)

    def add(self, batch: pa.RecordBatch, client: str | None = None) -> int:
        nbytes = batch_nbytes(batch)
        self.bytes += nbytes
        self.rows += batch.num_rows
        self.batches += 1
        if client is not None:
            self.per_client[client] = self.per_client.get(client, 0) + nbytes
        return nbytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "rows": self.rows,
            "batches": self.batches,
            "per_client": dict(self.per_client),
        }


def batch_nbytes(batch: pa.RecordBatch) -> int:
    """Bytes a batch occupies in Arrow buffers (what crosses the wire, framing aside)."""
    return int(batch.nbytes)
