"""The #17 wire formats: int4/int4ch and Arrow IPC compressed dtypes, their round trips on
random and adversarial maps, and their bytes, counted by the client, against the cost model
(fixed-size) and against the IPC stream a live cloud sends (compressed), the latter also
checked against the TCP bytes that crossed a counting proxy. Projected wires (``pca<D>-...``,
the rest of their tests in ``test_projection.py``) are counted the same way."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.server import FeatureServer
from mist_fed.commands import build_parser
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FlightSource
from mist_fed.errors import ConfigError
from mist_fed.fleet.spec import FleetSpec, TaskFleet
from mist_fed.wire.codec import (
    WireMeta,
    batch_nbytes,
    decode_ipc,
    encode,
    ipc_body_nbytes,
    ipc_options,
)
from mist_fed.wire.dtypes import (
    CODECS,
    FIXED_SIZE,
    LEVELS,
    WIRE_DTYPES,
    base_dtype,
    feature_bytes,
    scale_shape,
    wire_shape,
)
from mist_fed.wire.flight import FeatureClient
from mist_fed.wire.request import FeatureRequest

NEW = ("int4", "int4ch", *(d for d in WIRE_DTYPES if "+" in d))
TASK = "synthetic:train=24,val=8,test=12"


def _maps(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *shape)).astype(np.float32)
    if kind == "outlier channels":  # ViT-like: two channels 60x the rest
        x[..., [0, shape[-1] - 1]] *= 60.0
    elif kind == "constant":
        x[:] = 3.25
        x[1] = -0.5
        x[2] = 0.0  # an all-zero map: absmax 0 must not divide by zero
    return x


def _round_trip(dtype: str, x: np.ndarray) -> np.ndarray:
    meta = WireMeta("b", "w", "mist", 1, dtype, tuple(x.shape[1:]))
    batch = encode(meta, [str(i) for i in range(len(x))], [0] * len(x), x)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=ipc_options(dtype)) as w:
        w.write_batch(batch)
    fs = decode_ipc(sink.getvalue())
    assert fs.meta["dtype"] == dtype and fs.features.dtype.is_floating_point
    return fs.features.float().numpy()


@pytest.mark.parametrize("kind", ["random", "outlier channels", "constant"])
@pytest.mark.parametrize("shape", [(5, 8), (5, 7), (7,), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("dtype", NEW)
def test_round_trip_within_half_a_step_and_never_nan(dtype, shape, kind):
    # Prepare
    x = _maps(kind, shape)
    base = base_dtype(dtype)
    # Execute
    y = _round_trip(dtype, x)
    # Assert: finite, and within half a quantization step of its scale group (exact for floats)
    assert y.shape == x.shape and np.isfinite(y).all()
    if base in LEVELS:
        axis = -2 if base.endswith("ch") and len(shape) >= 2 else -1
        step = np.abs(x).max(axis=axis, keepdims=True) / LEVELS[base]
        assert (np.abs(y - x) <= step / 2 + 1e-6 * np.abs(x).max()).all()
    else:
        np.testing.assert_allclose(y, x.astype(base).astype(np.float32))
    if kind == "constant":  # one level hits the absmax exactly: constants survive, zero is zero
        np.testing.assert_allclose(y, x, rtol=1e-6)


def test_int4ch_beats_int4_on_outlier_channels_and_packs_two_per_byte():
    # Prepare
    x = _maps("outlier channels", (20, 63))
    # Execute
    err = {d: np.linalg.norm(_round_trip(d, x) - x) for d in ("int4", "int4ch")}
    small = {d: np.abs(_round_trip(d, x)[..., 1:-1] - x[..., 1:-1]).mean() for d in err}
    # Assert: per-channel scales keep the ordinary channels' resolution
    assert small["int4ch"] < small["int4"] / 5
    assert feature_bytes((20, 63), "int4") == 20 * 32 + 4 * 20
    assert feature_bytes((20, 63), "int4ch") == 20 * 32 + 4 * 63
    assert scale_shape((20, 63), "int4ch+zstd") == (63,)


@pytest.mark.parametrize("dtype", [d for d in WIRE_DTYPES if "+" in d])
def test_compressed_sizes_are_measured_not_predicted(dtype):
    with pytest.raises(ValueError, match="measured"):
        feature_bytes((257, 384), dtype)


def test_dtypes_are_selectable_by_name_in_the_fleet_spec_and_the_client_cli():
    # Prepare
    fleet = TaskFleet(task=TASK, devices=1, name="a")
    # Execute / Assert
    for name in ("int4", "int4ch", "int8ch+lz4", "int4ch+zstd", "float16+zstd", "pca16-int4ch"):
        assert FleetSpec(fleets=(fleet,), wire_dtype=name).wire_dtype == name
        args = build_parser().parse_args(["client", "--task", TASK, "--dtype", name])
        assert args.dtype == name
    with pytest.raises(ConfigError, match="wire_dtype"):
        FleetSpec(fleets=(fleet,), wire_dtype="int4+gzip")
    with pytest.raises(ConfigError, match="wire_dtype"):
        FleetSpec(fleets=(fleet,), wire_dtype="pca0-int4ch")


# -- live: the bytes a cloud sends ----------------------------------------------------------------
class RecordingServer(FeatureServer):
    """Keeps each batch the cloud streams (before Flight serializes it)."""

    sent: list[pa.RecordBatch]

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent = []

    def _stream(self, *a, **kw):
        for batch in super()._stream(*a, **kw):
            self.sent.append(batch)
            yield batch


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts the bytes flowing from the server to the client."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.down = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._socks: list[socket.socket] = [self._sock]
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._sock.accept()
                server = socket.create_connection(self.target, timeout=30)
                self._socks += [client, server]
                threading.Thread(
                    target=self._pipe, args=(client, server, False), daemon=True
                ).start()
                threading.Thread(
                    target=self._pipe, args=(server, client, True), daemon=True
                ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if down:
                    with self._lock:
                        self.down += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture(scope="module")
def cloud(tiny_backbone, tmp_path_factory) -> Iterator[tuple[str, RecordingServer]]:
    cfg = ServeConfig(
        port=0,
        random_init=True,
        cache_dir=str(tmp_path_factory.mktemp("store")),
        rows_per_batch=8,
        tasks=(TASK,),
        projection_sample=TASK,  # pca wires: a basis fitted on 16 of its training images
        projection_images=16,
    )
    servers: list[RecordingServer] = []

    def make(*a, **kw):
        servers.append(RecordingServer(*a, **kw))
        return servers[-1]

    with running_cloud(cfg, backbone=tiny_backbone, server_cls=make) as loc:  # type: ignore[arg-type]
        yield loc, servers[0]


def _fetch(cloud, dtype: str) -> tuple[FeatureClient, list[pa.RecordBatch], int]:
    """One do_get of the train split through a counting proxy: (client, sent batches, TCP bytes)."""
    loc, server = cloud
    proxy = CountingProxy(int(loc.rsplit(":", 1)[1]))
    server.sent.clear()
    try:
        with FeatureClient(f"grpc+tcp://127.0.0.1:{proxy.port}", retries=0) as client:
            fs = client.get(TASK, "train", "mist", 2, dtype)
            assert len(fs) == 24 and fs.features.dtype.is_floating_point
            assert bool(fs.features.isfinite().all())
    finally:
        proxy.close()
    return client, list(server.sent), proxy.down


PROJECTED_FIXED = ("pca8-int4ch", "pca5-int8", "pca16-float16")


@pytest.mark.network
@pytest.mark.parametrize("dtype", FIXED_SIZE + PROJECTED_FIXED)
def test_fixed_size_bytes_per_image_equal_the_cost_model(cloud, tiny_backbone, dtype):
    # Prepare: the per-image shape as the wire sends it (a pca wire's [tokens, D])
    shape = wire_shape((tiny_backbone.num_tokens, tiny_backbone.embed_dim), dtype)
    req = FeatureRequest(TASK, "train", "mist", 2, dtype)
    # Execute
    client, sent, tcp = _fetch(cloud, dtype)
    with flight.connect(cloud[0]) as raw:
        info = raw.get_flight_info(flight.FlightDescriptor.for_command(req.to_json()))
    # Assert: counted = the Arrow buffers sent; their feature columns = rows x the cost model,
    # which is also what the cloud announced for the stream
    assert client.last.rows == 24 and client.last.bytes == sum(b.nbytes for b in sent)
    cols = sum(b.column(c).nbytes for b in sent for c in b.schema.names[2:])
    assert cols / 24 == feature_bytes(shape, dtype)
    assert info.total_bytes == cols and info.total_records == 24
    assert client.last.bytes < tcp  # framing, headers and schema on top
    meta = WireMeta.from_schema(sent[0].schema)
    assert meta.shape == shape and bool(meta.basis) == dtype.startswith("pca")


COMPRESSED = (
    *(f"{b}+{c}" for c in CODECS for b in ("float32", "float16", "int8ch", "int4ch")),
    "pca8-int8ch+zstd",
    "pca16task-float16+lz4",
)


@pytest.mark.network
@pytest.mark.parametrize("dtype", COMPRESSED)
def test_compressed_bytes_counted_equal_the_ipc_stream_sent(cloud, dtype):
    # Execute
    client, sent, tcp = _fetch(cloud, dtype)
    # The IPC stream the cloud sent: its batches, written with the dtype's options
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, sent[0].schema, options=ipc_options(dtype)) as w:
        for b in sent:
            w.write_batch(b)
    stream = sink.getvalue()
    msgs = list(pa.ipc.MessageReader.open_stream(stream))
    bodies = sum(m.body.size for m in msgs if m.type == "record batch")
    headers = sum(m.metadata.size for m in msgs if m.type == "record batch")
    schema_msg = next(m for m in msgs if m.type == "schema")
    # Assert: counted = the sum of the record-batch message bodies, exactly; the rest of the
    # stream is one schema message, one flatbuffer header per batch (8-byte prefix each) and
    # the 8-byte end-of-stream marker
    assert client.last.bytes == bodies == sum(batch_nbytes(b, dtype) for b in sent)
    overhead = 8 + schema_msg.metadata.size + 8 * len(sent) + headers + 8
    assert stream.size == bodies + overhead
    # ... and what crossed TCP: the counted bytes, plus gRPC/HTTP2 framing and headers
    assert bodies < tcp < bodies + overhead + 4096 + 256 * len(sent)
    assert bodies != sum(ipc_body_nbytes(b) for b in sent)  # compressed: not the raw bodies
    if dtype == "float32+zstd":  # compressible (low mantissa bits): fewer bytes on TCP than raw
        assert tcp < sum(b.nbytes for b in sent)


@pytest.mark.network
@pytest.mark.parametrize(
    "dtype", ["int4ch", "int8ch+zstd", "int4+lz4", "pca8-int4ch", "pca6-int8ch+zstd"]
)
def test_a_device_fetches_a_new_dtype_by_name_and_pays_what_crossed(cloud, tmp_path, dtype):
    # Prepare
    loc, _ = cloud
    with FlightSource(loc) as src, EdgeDevice(load_profile("rpi4"), src, tmp_path / "d") as dev:
        # Execute: the device pulls a split into its cache (decoded to float32 when read)
        split = dev.features(TASK, "train", "mist", 2, dtype)
        paid = dev.report().feature_bytes
        counted = src.client.last.bytes
        net = dev.new_net("mist", 10, 2, wire=dtype)
        acc = dev.evaluate(net, split)
        shape = dev.feature_shape("mist", 2, dtype)
    # Assert
    assert split.rows == 24 and paid == counted > 0
    assert 0.0 <= acc <= 1.0
    assert split.shape == shape and bool(split.meta.basis) == dtype.startswith("pca")
    if "+" not in dtype:
        assert paid > 24 * feature_bytes(shape, dtype)
