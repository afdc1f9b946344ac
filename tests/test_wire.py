"""The pure wire codec and request parsing: no server."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from mist_fed.cloud.gather import GatherSpec, gather_many
from mist_fed.errors import WireError
from mist_fed.wire import edge_init
from mist_fed.wire.codec import Stats, WireMeta, decode, encode, feature_schema, ipc_options
from mist_fed.wire.dtypes import (
    FIXED_SIZE,
    WIRE_DTYPES,
    base_dtype,
    dequantize,
    feature_bytes,
    quantize,
)
from mist_fed.wire.request import FeatureRequest

SPECS = [GatherSpec("mist", 2), GatherSpec("side"), GatherSpec("final"), GatherSpec("block", 1)]


def _meta(bb, spec, dtype):
    shape = spec.shape(bb.num_blocks, bb.num_tokens, bb.embed_dim)
    return WireMeta(bb.name, bb.weights_id, spec.kind, spec.k, dtype, shape)


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_round_trip_each_dtype_and_gather(tiny_backbone, spec, dtype):
    # Prepare: real gathered features of the tiny backbone
    torch.manual_seed(0)
    x = gather_many(tiny_backbone, torch.randn(3, 3, 32, 32), [spec])[spec]
    meta = _meta(tiny_backbone, spec, dtype)
    # Execute: encode, then decode through IPC bytes as on the wire
    batch = encode(meta, ["a", "b", "c"], [1, None, 2], x)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=ipc_options(dtype)) as w:
        w.write_batch(batch)
    fs = decode(pa.ipc.open_stream(sink.getvalue()).read_all())
    # Assert
    assert fs.ids == ["a", "b", "c"]
    assert fs.labels.tolist() == [1, -1, 2]
    assert tuple(fs.features.shape) == (3, *meta.shape)
    assert fs.meta["gather"] == spec.kind and fs.meta["k"] == spec.k and fs.meta["dtype"] == dtype
    assert fs.meta["weights"] == tiny_backbone.weights_id
    rel = (fs.features.float() - x).norm() / x.norm()
    bound = {"float32": 0.0, "float16": 1e-3, "int8": 0.01, "int8ch": 0.01, "int4": 0.2}
    bound["int4ch"] = bound["int4"]
    bound = bound[base_dtype(dtype)]
    assert rel <= bound


def test_int8_is_quarter_of_fp32_plus_scales(tiny_backbone):
    # Prepare
    spec = GatherSpec("mist", 3)
    x = torch.randn(4, tiny_backbone.num_tokens, tiny_backbone.embed_dim)
    # Execute
    f32 = encode(_meta(tiny_backbone, spec, "float32"), list("abcd"), [0] * 4, x)
    i8 = encode(_meta(tiny_backbone, spec, "int8"), list("abcd"), [0] * 4, x)
    # Assert
    feat32 = f32.column("features").nbytes
    assert i8.column("features").nbytes == feat32 // 4
    assert i8.column("scale").nbytes == 4 * 4 * tiny_backbone.num_tokens


@pytest.mark.parametrize("dtype", FIXED_SIZE)
@pytest.mark.parametrize(
    "shape", [(7, 6), (3, 7, 6), (6,), (7, 5)], ids=["mist", "side", "final", "odd"]
)
def test_feature_bytes_equal_the_encoded_columns(dtype, shape):
    # Prepare
    meta = WireMeta("b", "w", "mist", 1, dtype, shape)
    x = np.random.default_rng(0).normal(size=(5, *shape)).astype(np.float32)
    # Execute
    batch = encode(meta, list("abcde"), [0] * 5, x)
    # Assert: the cost model's bytes are the Arrow buffers of the feature columns
    cols = sum(batch.column(c).nbytes for c in batch.schema.names[2:])
    assert cols == 5 * feature_bytes(shape, dtype)


def test_int8ch_has_one_scale_per_channel_and_beats_per_token_on_outlier_channels():
    # Prepare: ViT-like features where two of 64 channels are 50x larger than the rest
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 20, 64)).astype(np.float32)
    x[..., [3, 40]] *= 50.0
    # Execute
    errs = {}
    for dtype in ("int8", "int8ch"):
        q, scale = quantize(x, dtype)
        back = dequantize(q, scale, dtype)
        small = np.delete(np.arange(64), [3, 40])  # the channels a per-token scale starves
        errs[dtype] = np.linalg.norm((back - x)[..., small]) / np.linalg.norm(x[..., small])
        assert np.abs(back - x).max() <= scale.max() / 127 / 2 + 1e-4  # half a step at most
    # Assert: scales per image and channel; the small channels keep their precision
    assert quantize(x, "int8ch")[1].shape == (8, 64)
    assert quantize(x, "int8")[1].shape == (8, 20)
    assert errs["int8ch"] < errs["int8"] / 10


def test_decode_is_zero_copy_for_float32():
    # Prepare
    meta = WireMeta("b", "w", "mist", 1, "float32", (5, 8))
    batch = encode(meta, ["x", "y"], [0, 1], np.ones((2, 5, 8), np.float32))
    # Execute
    fs = decode(batch)
    # Assert: the tensor shares the Arrow buffer
    buf = batch.column("features").storage.values.buffers()[1]
    assert fs.features.data_ptr() == buf.address


def test_decode_rejects_foreign_schema():
    # Prepare
    table = pa.table({"id": ["a"], "label": [1], "features": [[1.0]]})
    # Execute / Assert
    with pytest.raises(WireError, match="metadata"):
        decode(table)


def test_encode_rejects_wrong_shape_and_dtype():
    meta = WireMeta("b", "w", "mist", 1, "float32", (5, 8))
    with pytest.raises(WireError, match="shape"):
        encode(meta, ["a"], [0], np.zeros((1, 5, 7), np.float32))
    with pytest.raises(WireError, match="dtype"):
        WireMeta("b", "w", "mist", 1, "bfloat16", (5, 8))


def test_schema_records_backbone_and_request():
    meta = WireMeta("vit", "file:abc", "mist", 4, "int8", (5, 8))
    schema = feature_schema(meta)
    assert schema.names == ["id", "label", "features", "scale"]
    assert WireMeta.from_schema(schema) == meta


def test_stats_counts_bytes_rows_batches():
    meta = WireMeta("b", "w", "final", None, "float16", (8,))
    batch = encode(meta, ["a", "b"], [0, 1], np.zeros((2, 8), np.float32))
    stats = Stats()
    stats.add(batch, "dev1")
    stats.add(batch, "dev1")
    assert (stats.rows, stats.batches) == (4, 2)
    assert stats.bytes == 2 * batch.nbytes == stats.per_client["dev1"]


def test_request_round_trip_and_errors():
    req = FeatureRequest("synthetic", "train", "mist", 2, "int8", ("a", "b"), offset=1)
    assert FeatureRequest.from_json(req.to_json()) == req
    bad = {
        b"{nope": "not JSON",
        b"[]": "JSON object",
        json.dumps({"split": "train"}).encode(): "'task'",
        json.dumps({"task": "t", "split": "dev", "k": 1}).encode(): "split",
        json.dumps({"task": "t", "split": "val", "gather": "x"}).encode(): "gather",
        json.dumps({"task": "t", "split": "val", "k": 1, "dtype": "int3"}).encode(): "dtype",
        json.dumps({"task": "t", "split": "val", "k": "1"}).encode(): "integer",
        json.dumps({"task": "t", "split": "val"}).encode(): "needs an integer k",
        json.dumps({"task": "t", "split": "val", "k": 1, "zz": 1}).encode(): "unknown keys",
        json.dumps({"task": "t", "split": "val", "k": 1, "offset": -1}).encode(): "offset",
    }
    for raw, match in bad.items():
        with pytest.raises(WireError, match=match):
            FeatureRequest.from_json(raw)
    with pytest.raises(WireError, match="over the limit"):
        FeatureRequest.from_json(b" " * 100, max_bytes=10)


def test_edge_init_round_trip_and_errors(tiny_backbone):
    # Prepare

    state = tiny_backbone.edge_init_state("partial1")
    init = edge_init.EdgeInit("partial1", tiny_backbone.name, tiny_backbone.weights_id, state)
    # Execute
    blob = edge_init.encode(init)
    back = edge_init.decode(blob)
    # Assert
    assert back.header() == init.header() and back.nbytes == len(blob)
    assert back.state.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(back.state[k], v, rtol=0, atol=0)
    assert edge_init.decode(edge_init.encode(edge_init.EdgeInit("mist", "b", "w"))).state == {}
    assert edge_init.decode_request(edge_init.encode_request("partial1")) == "partial1"
    for bad in (b"", b"\xff" * 8, blob[:20]):
        with pytest.raises(WireError, match="not a mist-fed safetensors blob"):
            edge_init.decode(bad)
    from safetensors.torch import save

    with pytest.raises(WireError, match="not a mist-fed safetensors blob"):
        edge_init.decode(save({"x": torch.zeros(1)}))
