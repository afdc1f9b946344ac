"""Bad input, fuzzed: the ticket parser, the Arrow decoder, and a live server under junk tickets."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.errors import WireError
from mist_fed.wire.codec import (
    WireMeta,
    assemble_batch,
    decode,
    decode_ipc,
    encode,
    encode_arrays,
    feature_schema,
    ipc_options,
)
from mist_fed.wire.dtypes import (
    MAX_PROJECTED_DIM,
    NUMPY_DTYPE,
    PACKED,
    QUANTIZED,
    WIRE_DTYPES,
    base_dtype,
    packed_shape,
    parse_wire,
    scale_shape,
)
from mist_fed.wire.request import FeatureRequest

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
META = WireMeta("tiny", "w0", "mist", 2, "float32", (3, 4))
KEYS = ["task", "split", "gather", "k", "dtype", "ids", "offset", "extra"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
tickets = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=7).map(
        lambda d: json.dumps(d).encode()
    ),
    st.sampled_from(
        [b"[" * 5000, b'{"task": "synthetic", "k": 1' + b"9" * 5000 + b"}", b"NaN", b"\xff\xfe"]
    ),
)


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _good(n: int = 4, dtype: str = "float32") -> tuple[WireMeta, pa.RecordBatch]:
    meta = WireMeta("tiny", "w0", "mist", 2, dtype, (3, 4))
    x = np.random.default_rng(0).standard_normal((n, 3, 4)).astype(np.float32)
    return meta, encode(meta, [f"i{j}" for j in range(n)], list(range(n)), x)


TRIED = {"tickets": 0, "ipc_bytes": 0, "schemas": 0, "packed": 0, "projected": 0}


@FUZZ
@given(tickets)
def test_ticket_parser_only_raises_wire_errors(raw):
    TRIED["tickets"] += 1
    try:
        req = FeatureRequest.from_json(raw)
    except WireError as e:
        assert str(e)
    else:  # what parses round-trips
        assert FeatureRequest.from_json(req.to_json()) == req


def test_oversize_ticket_is_refused_before_parsing():
    with pytest.raises(WireError, match="over the limit"):
        FeatureRequest.from_json(b" " * 2000, max_bytes=1000)


@FUZZ
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=10_000))
def test_decoder_refuses_random_and_truncated_bytes(junk, cut):
    TRIED["ipc_bytes"] += 1
    _, batch = _good()
    data = _ipc(batch)
    for raw in (junk, data[: cut % len(data)], data[:16] + junk):
        try:
            fs = decode_ipc(raw)
        except WireError:
            continue
        # a stream cut at a message boundary reads as fewer whole rows: never garbage
        assert fs.ids == batch.column("id").to_pylist()[: len(fs)]


@FUZZ
@given(
    shape=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=3),
    dtype=st.sampled_from(WIRE_DTYPES),
    drop=st.sampled_from([None, "id", "label", "features", "scale"]),
    claimed=st.sampled_from(WIRE_DTYPES),
)
def test_decoder_refuses_wrong_schemas_and_shapes(shape, dtype, drop, claimed):
    TRIED["schemas"] += 1
    # Prepare: a batch encoded for one shape/dtype, whose metadata claims another
    real = WireMeta("tiny", "w0", "mist", 2, dtype, tuple(shape))
    x = np.ones((2, *shape), np.float32)
    batch = encode(real, ["a", "b"], [0, 1], x)
    lie = WireMeta("tiny", "w0", "mist", 2, claimed, (3, 4))
    table = pa.Table.from_batches([batch])
    dropped = drop in table.column_names  # a float stream has no "scale" to drop
    if dropped:
        table = table.drop_columns([drop])
    table = table.replace_schema_metadata(lie.to_metadata())
    honest = not dropped and real == lie
    # same columns, other claim: float16 sent as float16+zstd, or int4 of 3 channels claimed
    # as 4 (ceil(C / 2) bytes either way): decodes as claimed, or int4's padding check refuses
    same_layout = not dropped and feature_schema(real).remove_metadata().equals(
        feature_schema(lie).remove_metadata()
    )
    # Execute / Assert
    if honest:
        assert len(decode(table)) == 2
    elif same_layout:
        try:
            assert len(decode(table)) == 2
        except WireError:
            assert base_dtype(real.dtype) in PACKED
    else:
        with pytest.raises(WireError):
            decode(table)


@FUZZ
@given(
    dtype=st.sampled_from(PACKED),
    channels=st.integers(min_value=1, max_value=7),
    codec=st.sampled_from(["", "+zstd", "+lz4"]),
    junk=st.binary(min_size=1, max_size=64),
    cut=st.integers(min_value=0, max_value=10_000),
)
def test_decoder_refuses_malformed_packed_int4_with_wire_errors_only(
    dtype, channels, codec, junk, cut
):
    TRIED["packed"] += 1
    # Prepare: a well-formed packed stream, then its packed bytes overwritten with junk,
    # and its IPC bytes (compressed or not) cut or corrupted
    meta = WireMeta("tiny", "w0", "mist", 2, dtype + codec, (3, channels))
    x = np.random.default_rng(channels).standard_normal((2, 3, channels)).astype(np.float32)
    batch = encode(meta, ["a", "b"], [0, 1], x)
    packed = np.asarray(batch.column("features").to_numpy_ndarray()).copy()
    flat = packed.reshape(-1)
    flat[:] = np.frombuffer((junk * flat.size)[: flat.size], np.uint8)
    cols = {
        "features": pa.FixedShapeTensorArray.from_numpy_ndarray(packed),
        "scale": batch.column("scale"),
    }
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=ipc_options(meta.dtype)) as w:
        w.write_batch(assemble_batch(meta, ["a", "b"], [0, 1], cols))
    data = sink.getvalue().to_pybytes()
    pos = cut % len(data)
    for raw in (data, data[:pos], data[:pos] + junk + data[pos + len(junk) :]):
        # Execute / Assert: a decode gives finite features of the claimed shape, or WireError
        try:
            fs = decode_ipc(raw)
        except WireError:
            continue
        assert tuple(fs.features.shape[1:]) == (3, channels)
        assert bool(fs.features.isfinite().all())


# -- projected streams (pca<D>-<dtype>): the basis id and D in the metadata ----------------------
PROJECTED = (
    "pca3-float32",
    "pca4-float16",
    "pca3-int8",
    "pca4-int8ch",
    "pca3-int4",
    "pca4task-int4ch",
    "pca4-int8ch+zstd",
    "pca3-float16+lz4",
    "pca1-int4ch+zstd",
)
BASIS = "0123456789abcdef"
CLAIMS = (
    *PROJECTED,
    "float32",
    "int8",
    "int4ch+zstd",
    "pca4096-float16",
    "pca0-int8",
    f"pca{MAX_PROJECTED_DIM + 1}-int8",
    "pca99999-int8",
    "pca4-foo",
)


def _projected(dtype: str) -> tuple[WireMeta, pa.RecordBatch]:
    """Two rows of 3 tokens x D coordinates, encoded as ``dtype`` under basis :data:`BASIS`."""
    d = parse_wire(dtype).dims
    assert d is not None
    meta = WireMeta("tiny", "w0", "mist", 2, dtype, (3, d), BASIS)
    x = np.random.default_rng(d).standard_normal((2, 3, d)).astype(np.float32)
    return meta, encode(meta, ["a", "b"], [0, 1], x)


def _layout(dtype: str, shape: tuple) -> tuple | None:
    """What the columns of ``dtype`` at ``shape`` look like (``None``: no such layout)."""
    try:
        base = base_dtype(dtype)
        scales = scale_shape(shape, base) if base in QUANTIZED else None
        return NUMPY_DTYPE[base], packed_shape(shape, base), scales
    except (ValueError, TypeError):
        return None


def _consistent(fs) -> None:
    """A decoded projected set agrees with its own metadata: basis, D, finite values."""
    wire = parse_wire(fs.meta["dtype"])
    assert bool(fs.meta["basis"]) == wire.projected
    assert tuple(fs.features.shape[1:]) == tuple(fs.meta["shape"])
    if wire.projected:
        assert fs.meta["shape"][-1] == wire.dims
    assert bool(fs.features.isfinite().all())


KEEP, DROP = "keep", "drop"  # a metadata value left as encoded, or its key removed


@FUZZ
@given(
    dtype=st.sampled_from(PROJECTED),
    claimed=st.one_of(st.just(KEEP), st.sampled_from(CLAIMS)),
    basis=st.one_of(st.sampled_from([KEEP, DROP, "", "f" * 16]), st.text(max_size=20)),
    shape=st.one_of(st.just(KEEP), st.lists(st.integers(min_value=-1, max_value=5), max_size=3)),
)
def test_decoder_refuses_projected_streams_whose_metadata_lies(dtype, claimed, basis, shape):
    TRIED["projected"] += 1
    # Prepare: a well-formed projected batch; its metadata's dtype, shape and basis replaced
    real, batch = _projected(dtype)
    claimed = dtype if claimed == KEEP else claimed
    claimed_shape = real.shape if shape == KEEP else tuple(shape)
    claimed_basis = {KEEP: BASIS, DROP: ""}.get(basis, basis)
    md = dict(batch.schema.metadata)
    md[b"mist_fed.dtype"] = claimed.encode()
    md[b"mist_fed.shape"] = json.dumps(list(claimed_shape)).encode()
    md[b"mist_fed.basis"] = claimed_basis.encode()
    if basis == DROP:
        del md[b"mist_fed.basis"]
    table = pa.Table.from_batches([batch]).replace_schema_metadata(md)
    # The rules, stated apart from the decoder: a name it knows (D in 1..4096), a basis id iff
    # the wire is projected, shape[-1] == D, and columns laid out as claimed
    try:
        wire = parse_wire(claimed)
    except ValueError:
        wire = None
    lies = (
        wire is None
        or wire.projected != bool(claimed_basis)
        or (wire.projected and (not claimed_shape or claimed_shape[-1] != wire.dims))
        or _layout(claimed, claimed_shape) != _layout(dtype, real.shape)
    )
    # Execute / Assert
    if lies:
        with pytest.raises(WireError):
            decode(table)
        return
    try:
        fs = decode(table)
    except WireError:  # int4 of 3 channels claimed as 4 (same bytes): its padding check
        assert base_dtype(dtype) in PACKED
        return
    _consistent(fs)
    assert fs.meta["basis"] == claimed_basis and fs.meta["dtype"] == claimed
    if (claimed, claimed_shape, claimed_basis) == (dtype, real.shape, BASIS):
        assert fs.ids == ["a", "b"]


@pytest.mark.parametrize(
    ("dtype", "shape", "basis", "match"),
    [
        ("pca4-int8", [3, 4], None, "a pca wire names its projection's id"),
        ("pca4-int8", [3, 4], "", "a pca wire names its projection's id"),
        ("int8", [3, 4], BASIS, "no other wire has one"),
        ("float16+zstd", [3, 4], BASIS, "no other wire has one"),
        ("pca4-int8", [3, 5], BASIS, "sends 4 channels"),
        ("pca4-int8", [], BASIS, "sends 4 channels"),
        ("pca5-int8", [3, 4], BASIS, "sends 5 channels"),
        ("pca0-int8", [3, 4], BASIS, "unknown wire dtype"),
        ("pca99999-int8", [3, 4], BASIS, "unknown wire dtype"),
        (f"pca{MAX_PROJECTED_DIM + 1}-int8", [3, 4], BASIS, "over 4096"),
    ],
)
def test_decoder_names_what_is_wrong_with_a_projected_streams_metadata(dtype, shape, basis, match):
    # Prepare: a pca4-int8 batch whose metadata claims otherwise
    _, batch = _projected("pca4-int8")
    md = dict(batch.schema.metadata)
    md.update({b"mist_fed.dtype": dtype.encode(), b"mist_fed.shape": json.dumps(shape).encode()})
    if basis is None:
        del md[b"mist_fed.basis"]
    else:
        md[b"mist_fed.basis"] = basis.encode()
    table = pa.Table.from_batches([batch]).replace_schema_metadata(md)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    # Execute / Assert: from a table and from the bytes of the wire alike
    with pytest.raises(WireError, match=match):
        decode(table)
    with pytest.raises(WireError, match=match):
        decode_ipc(sink.getvalue())


@FUZZ
@given(
    dtype=st.sampled_from(PROJECTED),
    junk=st.binary(min_size=1, max_size=64),
    cut=st.integers(min_value=0, max_value=10_000),
)
def test_decoder_refuses_damaged_projected_streams_with_wire_errors_only(dtype, junk, cut):
    TRIED["projected"] += 1
    # Prepare: a projected IPC stream (compressed where the wire says so), then junk, cut, spliced
    _, batch = _projected(dtype)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=ipc_options(dtype)) as w:
        w.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    pos = cut % len(data)
    assert decode_ipc(data).meta["basis"] == BASIS  # the control
    for raw in (junk, data[:pos], data[:pos] + junk + data[pos + len(junk) :]):
        # Execute / Assert: WireError, or features that agree with what the stream claims
        try:
            fs = decode_ipc(raw)
        except WireError:
            continue
        _consistent(fs)


@pytest.mark.parametrize("dtype", PACKED)
@pytest.mark.parametrize("channels", [3, 4])
def test_decoder_refuses_int4_codes_no_encoder_writes(dtype, channels):
    # Prepare: code -8 (nibble 0x8), and for an odd channel count a nonzero padding nibble
    meta = WireMeta("tiny", "w0", "mist", 2, dtype, (2, channels))
    batch = encode(meta, ["a"], [0], np.ones((1, 2, channels), np.float32))
    packed = np.asarray(batch.column("features").to_numpy_ndarray()).copy()
    code = packed.copy()
    code[0, 0, 0] = (code[0, 0, 0] & 0xF0) | 0x08  # channel 0 := -8
    cases = {"code -8": code}
    if channels % 2:
        pad = packed.copy()
        pad[0, 1, -1] |= 0x10  # the padding nibble of token 1's last byte
        cases["padding nibble"] = pad
    for match, p in cases.items():
        cols = {
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(p),
            "scale": batch.column("scale"),
        }
        # Execute / Assert
        with pytest.raises(WireError, match=match):
            decode(assemble_batch(meta, ["a"], [0], cols))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_non_finite_features_are_refused_both_ways(bad, dtype):
    # Prepare: one bad value; for the decoder, a stream built past the encoder's check
    meta = WireMeta("tiny", "w0", "mist", 2, dtype, (3, 4))
    x = np.ones((3, 3, 4), np.float32)
    x[1, 2, 3] = bad
    if base_dtype(dtype) in QUANTIZED:
        cols = encode_arrays(meta, np.ones_like(x))
        scale = np.ones((3, *scale_shape(meta.shape, dtype)), np.float32)
        scale[1, 2] = bad
        cols["scale"] = pa.FixedShapeTensorArray.from_numpy_ndarray(scale)
    else:
        cols = {
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(x.astype(base_dtype(dtype)))
        }
    stream = _ipc(assemble_batch(meta, ["a", "b", "c"], [0, 1, 2], cols))
    # Execute / Assert
    with pytest.raises(WireError, match="NaN or Inf"):
        encode(meta, ["a", "b", "c"], [0, 1, 2], x)
    with pytest.raises(WireError, match="1 of 3 feature rows hold NaN or Inf"):
        decode_ipc(stream)


def test_arrow_ipc_never_unpickles_extension_metadata(pickle_bomb):
    # Prepare: a stream whose field claims pyarrow's old pickle-based extension type
    _, batch = _good()
    field = pa.field(
        "features",
        pa.binary(),
        metadata={
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps(pickle_bomb()),
        },
    )
    schema = pa.schema(
        [batch.schema.field("id"), batch.schema.field("label"), field]
    ).with_metadata(META.to_metadata())
    evil = pa.record_batch([batch.column(0), batch.column(1), pa.array([b"x"] * 4)], schema=schema)
    # Execute
    table = pa.ipc.open_stream(_ipc(evil)).read_all()
    # Assert: read as plain storage, nothing unpickled, and the decoder refuses it
    assert not pickle_bomb.ran
    assert table.schema.field("features").type == pa.binary()
    with pytest.raises(WireError, match="features"):
        decode(table)
    assert not pickle_bomb.ran


# -- a live server under junk -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_limits_cloud(tiny_backbone, tmp_path_factory):
    cfg = ServeConfig(
        port=0,
        random_init=True,
        cache_dir=str(tmp_path_factory.mktemp("fuzz")),
        rows_per_batch=8,
        max_ticket_bytes=4096,
        max_ids_per_ticket=16,
    )
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        yield loc


LIVE = {"calls": 0, "refused": 0, "served": 0, "crashes": 0}
GOOD = {"task": "synthetic", "split": "val", "gather": "mist", "k": 2}


@pytest.fixture(scope="module", autouse=True)
def reliability_line():
    """After the module's tests (in whatever order they ran): what they tried and counted."""
    yield
    print(
        f"\nRELIABILITY fuzz: tickets={TRIED['tickets']} ipc_inputs={TRIED['ipc_bytes'] * 3} "
        f"schemas={TRIED['schemas']} packed_int4={TRIED['packed'] * 3} "
        f"projected={TRIED['projected']} live_calls={LIVE['calls']} "
        f"live_refused={LIVE['refused']} live_served={LIVE['served']} crashes={LIVE['crashes']}"
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=tickets)
@pytest.mark.network
def test_live_server_answers_junk_tickets_with_clear_errors(small_limits_cloud, raw):
    client = flight.connect(small_limits_cloud)
    try:
        for call in (
            lambda: client.do_get(flight.Ticket(raw)).read_all(),
            lambda: client.get_flight_info(flight.FlightDescriptor.for_command(raw)),
        ):
            LIVE["calls"] += 1
            try:
                call()
                LIVE["served"] += 1  # junk that happens to be a valid request
            except flight.FlightServerError as e:
                assert "bad request" in str(e)
                LIVE["refused"] += 1
            except flight.FlightError:  # unreachable, internal, cancelled: the server broke
                LIVE["crashes"] += 1
        assert LIVE["crashes"] == 0
        list(client.list_flights())  # and it still answers
    finally:
        client.close()


@pytest.mark.network
def test_live_server_refuses_oversize_and_still_serves(small_limits_cloud):
    client = flight.connect(small_limits_cloud)
    big = json.dumps({**GOOD, "ids": ["x" * 100] * 100}).encode()
    many = json.dumps({**GOOD, "ids": [f"val-{i:06d}" for i in range(17)]}).encode()
    with pytest.raises(flight.FlightServerError, match="over the limit of 4096"):
        client.do_get(flight.Ticket(big)).read_all()
    with pytest.raises(flight.FlightServerError, match="17 ids in one request, over the limit"):
        client.do_get(flight.Ticket(many)).read_all()
    with pytest.raises(flight.FlightServerError, match="unknown task"):
        client.do_get(
            flight.Ticket(json.dumps({**GOOD, "task": "synthetic:train=99999999"}).encode())
        ).read_all()
    table = client.do_get(flight.Ticket(json.dumps(GOOD).encode())).read_all()
    assert table.num_rows == 8 and len(decode(table)) == 8
