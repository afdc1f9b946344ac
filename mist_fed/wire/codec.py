"""The Arrow wire format of features: one schema layout, pure encode/decode, a ``Stats`` record.

Every feature batch has the columns of :data:`FEATURE_COLUMNS`:

* ``id`` (string), ``label`` (int64, null where unknown),
* ``features``: ``arrow.fixed_shape_tensor`` of the per-image shape (``[tokens, dim]`` for
  ``mist``/``block``, ``[N+1, tokens, dim]`` for ``side``, ``[dim]`` for ``final``),
  The int4 dtypes hold the packed bytes: ``uint8`` of shape ``[..., ceil(dim / 2)]``, two
  codes per byte (layout in :mod:`mist_fed.wire.dtypes`); ``shape`` in the metadata keeps the
  unpacked shape, so an odd ``dim`` decodes exactly.
* ``scale`` (quantized dtypes only): float32 absmax scales, per token for ``int8``/``int4``,
  per channel for ``int8ch``/``int4ch`` (shapes in :mod:`mist_fed.wire.dtypes`), so
  ``x ~= q * scale / 127`` (int4: ``/ 7``).

A compressed dtype (``base+zstd``, ``base+lz4``) has ``base``'s columns; the stream's IPC
messages carry compressed buffers (:func:`ipc_options`) and the metadata names the whole dtype.

Schema metadata records ``backbone``, ``weights`` (``Backbone.weights_id``), ``gather``, ``k``,
``dtype``, ``shape`` (as sent: a projected wire's ``[tokens, D]``), ``basis`` (the projection's
id; empty for an unprojected wire) and the format version. Decoding is zero-copy where pyarrow allows (one chunk of
float32/float16); the quantized dtypes are dequantized to float32.
"""

from __future__ import annotations

import functools
import io
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
    base_dtype,
    check_wire,
    codec_of,
    dequantize,
    packed_shape,
    quantize,
    scale_shape,
)
from mist_fed.wire.features import FeatureSet

WIRE_VERSION = "1"
FEATURE_COLUMNS = ("id", "label", "features", "scale")
META_KEYS = ("backbone", "weights", "gather", "k", "dtype", "shape", "basis")

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
    basis: str = ""  # the channel projection's id (pca wires), else empty

    def __post_init__(self) -> None:
        wire = check_wire(self.dtype, WireError, "feature")
        if wire.projected != bool(self.basis):
            raise WireError(
                f"feature dtype {self.dtype!r} with basis {self.basis!r}: a pca wire names its "
                "projection's id, no other wire has one"
            )
        if wire.projected and (not self.shape or self.shape[-1] != wire.dims):
            raise WireError(
                f"feature dtype {self.dtype!r} sends {wire.dims} channels, not shape {self.shape}"
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
            b"mist_fed.basis": self.basis.encode(),
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
                basis=get.get("basis", ""),
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
            "basis": self.basis,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WireMeta:
        """From :meth:`as_dict` (a :class:`FeatureSet`'s ``meta``); other keys are ignored."""
        try:
            return cls(
                backbone=data["backbone"],
                weights=data["weights"],
                gather=data["gather"],
                k=data["k"],
                dtype=data["dtype"],
                shape=tuple(data["shape"]),
                basis=data.get("basis", ""),
            )
        except (KeyError, TypeError) as e:
            raise WireError(f"feature metadata lacks {e}") from e


@functools.lru_cache(maxsize=256)
def feature_schema(meta: WireMeta) -> pa.Schema:
    """The schema of a feature stream (the column layout of :data:`FEATURE_COLUMNS`); cached."""
    base = base_dtype(meta.dtype)
    stored = list(packed_shape(meta.shape, base))
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("features", pa.fixed_shape_tensor(_ARROW_DTYPE[base], stored)),
    ]
    if base in QUANTIZED:
        scales = list(scale_shape(meta.shape, base))
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
    base = base_dtype(meta.dtype)
    if base in QUANTIZED:
        q, scale = quantize(features, base)
        return {
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(q)),
            "scale": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(scale)),
        }
    arr = np.ascontiguousarray(features, dtype=NUMPY_DTYPE[base])
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


def tensor_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-shape tensor column (one chunk, several or none) as one ``[n, *shape]`` array."""
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
    """Pure decoder: record batch(es) -> :class:`FeatureSet` (quantized ones as float32).

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
        # IPC reading does not check buffers: a corrupt body (bad string offsets) would crash
        # the conversion below; a full validation turns it into ArrowInvalid
        data.validate(full=True)
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
    base = base_dtype(meta.dtype)
    if n == 0:
        torch_dtype = torch.float16 if base == "float16" else torch.float32
        feats = torch.empty((0, *meta.shape), dtype=torch_dtype)
    else:
        x = tensor_numpy(data.column("features"))
        if base in QUANTIZED:
            channels = meta.shape[-1] if meta.shape else 0
            x = dequantize(x, tensor_numpy(data.column("scale")), base, channels)
        with warnings.catch_warnings():  # Arrow buffers are read-only; share them, do not copy
            warnings.simplefilter("ignore", UserWarning)
            feats = torch.from_numpy(x)
    return FeatureSet(ids, labels, feats, meta.as_dict())


@dataclass
class Stats:
    """Wire byte accounting: bytes, rows and batches seen on one stream (or summed).

    ``bytes`` is what :func:`batch_nbytes` counts for each batch, unless the caller measured
    it itself (``add(batch, nbytes=...)``, as the client does for compressed streams).
    """

    bytes: int = 0
    rows: int = 0
    batches: int = 0
    per_client: dict[str, int] = field(default_factory=dict)

    def add(
        self, batch: pa.RecordBatch, client: str | None = None, nbytes: int | None = None
    ) -> int:
        if nbytes is None:
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


def ipc_options(dtype: str) -> pa.ipc.IpcWriteOptions | None:
    """The IPC write options a stream of ``dtype`` is sent with (``None``: Arrow's defaults)."""
    codec = codec_of(dtype)
    return None if codec is None else pa.ipc.IpcWriteOptions(compression=codec)


def batch_nbytes(batch: pa.RecordBatch, dtype: str | None = None) -> int:
    """Bytes of ``batch`` on the wire: its IPC message body, headers and schema amortized away.

    Uncompressed (``dtype`` without a codec, or ``None``): the bytes of the batch's Arrow
    buffers, ``batch.nbytes``; for a fixed-size dtype the ``features`` and ``scale`` columns
    are exactly ``rows * feature_bytes(shape, dtype)`` of it, the rest is ids and labels.

    Compressed (``base+zstd``, ``base+lz4``): the body of the record-batch IPC message that
    carries ``batch`` compressed, i.e. for each buffer an 8-byte uncompressed-length prefix
    plus its compressed bytes, padded to 8 bytes (Arrow's layout). A Flight reader hands the
    client the batch already decompressed and no Python API reports the received message's
    size, so the client measures it by writing the decompressed batch again with the same
    :func:`ipc_options`: the decompressed buffers are the ones the cloud wrote and the codecs
    are deterministic (same codec, default level), so this is the body the cloud sent, byte
    for byte when both run the same pyarrow (``tests/test_wire_formats.py`` checks it against
    the stream a live cloud sends). In both cases each message's flatbuffer header, the schema
    message and the end-of-stream marker are not counted: a few hundred bytes per batch,
    amortized over its rows.
    """
    options = None if dtype is None else ipc_options(dtype)
    if options is None:
        return int(batch.nbytes)
    return ipc_body_nbytes(batch, options)


def ipc_body_nbytes(batch: pa.RecordBatch, options: pa.ipc.IpcWriteOptions | None = None) -> int:
    """The body length of the IPC record-batch message that ``batch`` is written as."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=options) as w:
        w.write_batch(batch)
    for msg in pa.ipc.MessageReader.open_stream(sink.getvalue()):
        if msg.type == "record batch":
            return int(msg.body.size)
    raise WireError("writing a record batch gave no record-batch message")  # pragma: no cover


def encode_png(img: Any) -> bytes:
    """PNG bytes of a PIL image: what an upload (:data:`UPLOAD_SCHEMA`) carries per image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
