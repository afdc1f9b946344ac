"""Projected wire formats (#17): ``pca<D>-<dtype>`` sends each token's first ``D`` principal
coordinates of a basis the cloud fits once and names by id.

Pure: round trips of every projected format on random and adversarial maps, what a fitted
basis reconstructs, its id, its file. Live (tiny ViT cloud on 127.0.0.1): a basis is fitted
once, served by id, loaded again by a restarted cloud; a refitted one is refused by a device
pinned to the old id and by a model saved on it; a task-fitted wire is refused on an upload.
Then which methods and names take a projection at all.

The ``test_bug_*`` tests pin defects found while writing these, since fixed: a full-width
projection fed to Partial-1, long task names sharing a basis, a NaN basis file loaded, a
too-wide projection escaping the error hierarchy.
"""

from __future__ import annotations

import argparse
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.numpy import save_file

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.projections import Projections
from mist_fed.cloud.runner import running_cloud
from mist_fed.commands import build_parser
from mist_fed.core.methods import METHODS, PROJECTABLE_EDGES, build_edge_net, starts_from_backbone
from mist_fed.data import get_task
from mist_fed.device.checkpoint import EdgeModelConfig, save_checkpoint
from mist_fed.device.client import ClientConfig, predict_images
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import load_profile
from mist_fed.device.source import FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.errors import CloudRequestError, ConfigError, WireError
from mist_fed.fleet.spec import FleetSpec, TaskFleet
from mist_fed.wire.codec import WireMeta, decode_ipc, encode, encode_png, ipc_options
from mist_fed.wire.dtypes import (
    LEVELS,
    MAX_PROJECTED_DIM,
    feature_bytes,
    parse_wire,
    stored_dtype,
    wire_arg,
    wire_dim,
    wire_shape,
)
from mist_fed.wire.flight import FeatureClient
from mist_fed.wire.projection import Basis, BasisFit, projection_id
from tests.fakes import MemorySource

TOKENS, CHANNELS = 6, 12
#: several D (odd ones pad int4's last byte; 12 = every axis), every base dtype, two codecs
FORMATS = (
    "pca1-int8",
    "pca4-float32",
    "pca12-float32",
    "pca8-float16",
    "pca3-int8",
    "pca12-int8ch",
    "pca5-int4",
    "pca7-int4ch",
    "pca8task-int4ch+zstd",
    "pca6-int8ch+lz4",
    "pca9-float16+zstd",
)
KINDS = ("random", "outlier channels", "constant")


def _maps(kind: str, seed: int = 0, n: int = 5) -> np.ndarray:
    """``[n, TOKENS, CHANNELS]`` maps: random, ViT-like outliers, or constants and a zero map."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, TOKENS, CHANNELS)).astype(np.float32)
    if kind == "outlier channels":  # two channels 60x the rest
        x[..., [0, CHANNELS - 1]] *= 60.0
    elif kind == "constant":
        x[:] = 3.25
        x[1] = -0.5
        x[2] = 0.0  # an all-zero map
    return x


def _fit(maps: np.ndarray, chunks: int = 1) -> Basis:
    fit = BasisFit(maps.shape[-1])
    for part in np.array_split(maps, chunks):
        fit.add(part)
    return fit.finish("test maps")


def _ipc(batch: pa.RecordBatch, dtype: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=ipc_options(dtype)) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


# -- pure: round trips, the basis, its id and file ---------------------------------------------
@pytest.mark.parametrize("fitted_on", ["a random sample", "the maps themselves"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FORMATS)
def test_projected_round_trip_within_half_a_step_and_never_nan(dtype, kind, fitted_on):
    # Prepare: the cloud's basis (fixed sample, or the maps' own), the maps' coordinates in it
    wire = parse_wire(dtype)
    x = _maps(kind)
    sample = _maps("random", seed=1) if fitted_on == "a random sample" else x
    proj = _fit(sample).projection(wire.dims)
    y = proj.apply(x)
    meta = WireMeta("b", "w", "mist", 2, dtype, (TOKENS, wire.dims), proj.id)
    # Execute
    fs = decode_ipc(_ipc(encode(meta, [f"i{j}" for j in range(len(x))], [0] * len(x), y), dtype))
    got = fs.features.float().numpy()
    # Assert: finite, the claimed basis and shape, within half a step of its scale group
    assert fs.meta["basis"] == proj.id and fs.meta["shape"] == [TOKENS, wire.dims]
    assert got.shape == (len(x), TOKENS, wire.dims) and np.isfinite(got).all()
    if wire.base in LEVELS:
        axis = -2 if wire.base.endswith("ch") else -1
        step = np.abs(y).max(axis=axis, keepdims=True) / LEVELS[wire.base]
        assert (np.abs(got - y) <= step / 2 + 1e-6 * np.abs(y).max() + 1e-30).all()
    else:
        np.testing.assert_array_equal(got, y.astype(wire.base).astype(np.float32))
    if wire.dims == CHANNELS and wire.base == "float32":  # every axis: x comes back
        back = proj.mean + got @ proj.axes.T
        np.testing.assert_allclose(back, x, atol=1e-4 * max(1.0, float(np.abs(x).max())))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_a_basis_fitted_on_rank_r_maps_reconstructs_them_from_r_coordinates(rank):
    # Prepare: maps = mean + rank-r signal; channels of very different sizes
    rng = np.random.default_rng(rank)
    mean = rng.normal(size=16) * 5
    signal = rng.normal(size=(9, 10, rank)) * np.geomspace(8, 1, rank)
    x = (mean + signal @ rng.normal(size=(rank, 16))).astype(np.float32)
    scale = float(np.abs(x).max())
    # Execute
    basis = _fit(x, chunks=3)
    # Assert: orthonormal axes, all the variance in the first r, exact for any D >= r
    np.testing.assert_allclose(basis.axes.T @ basis.axes, np.eye(16), atol=1e-5)
    assert basis.kept(rank) == pytest.approx(1.0, abs=1e-6)
    assert (basis.variance[rank:] <= 1e-6 * basis.variance[0]).all()
    for d in sorted({rank, rank + 2, 16}):
        p = basis.projection(d)
        back = p.mean + p.apply(x) @ p.axes.T
        np.testing.assert_allclose(back, x, atol=2e-5 * scale)
    if rank > 1:  # one axis short: the last direction is lost, far beyond float error
        p = basis.projection(rank - 1)
        assert np.abs(p.mean + p.apply(x) @ p.axes.T - x).max() > 1e-2 * scale


def test_projection_id_names_exactly_the_numbers_it_applies():
    # Prepare
    maps = _maps("outlier channels")
    basis = _fit(maps)
    p = basis.projection(6)

    def nudged(a: np.ndarray, where: tuple[int, ...]) -> np.ndarray:
        a = a.copy()
        a[where] = np.nextafter(a[where], np.float32(np.inf))  # one ulp
        return a

    # Execute
    ids = {
        "refit": _fit(maps.copy()).projection(6).id,
        "copy": Basis(basis.mean.copy(), basis.axes.copy(), basis.variance, "x").projection(6).id,
        "by hand": projection_id(basis.mean, basis.axes[:, :6]),
        "mean + 1 ulp": projection_id(nudged(basis.mean, (3,)), basis.axes[:, :6]),
        "axis + 1 ulp": projection_id(basis.mean, nudged(basis.axes, (2, 5))[:, :6]),
        "unused axis + 1 ulp": projection_id(basis.mean, nudged(basis.axes, (2, 6))[:, :6]),
        "D = 5": basis.projection(5).id,
    }
    # Assert: same numbers, same id (16 hex digits); one applied number changed, another id
    assert len(p.id) == 16 and int(p.id, 16) >= 0
    assert ids["refit"] == ids["copy"] == ids["by hand"] == ids["unused axis + 1 ulp"] == p.id
    changed = [ids["mean + 1 ulp"], ids["axis + 1 ulp"], ids["D = 5"]]
    assert p.id not in changed and len(set(changed)) == 3


def test_basis_save_load_round_trip(tmp_path):
    # Prepare
    basis = _fit(_maps("random"))
    path = tmp_path / "deep" / "b.safetensors"
    # Execute
    basis.save(path)
    loaded = Basis.load(path)
    # Assert: the same numbers, so the same ids; nothing half-written left beside it
    np.testing.assert_array_equal(loaded.mean, basis.mean)
    np.testing.assert_array_equal(loaded.axes, basis.axes)
    np.testing.assert_array_equal(loaded.variance, basis.variance)
    assert loaded.fitted_on == "test maps" and loaded.channels == CHANNELS
    assert loaded.projection(5).id == basis.projection(5).id
    assert [p.name for p in path.parent.iterdir()] == ["b.safetensors"]


def _damage(path: Path, how: str, basis: Basis) -> None:
    c = basis.channels
    good = {"mean": basis.mean, "axes": basis.axes, "variance": basis.variance}
    if how == "truncated":
        basis.save(path)
        path.write_bytes(path.read_bytes()[:-40])
    elif how == "junk":
        path.write_bytes(b"\x00\x01not a safetensors file" * 20)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no axes":
        save_file({k: v for k, v in good.items() if k != "axes"}, str(path))
    elif how == "axes not square":
        save_file({**good, "axes": np.ascontiguousarray(basis.axes[:, : c - 1])}, str(path))
    elif how == "variance too short":
        save_file({**good, "variance": basis.variance[:-1].copy()}, str(path))
    elif how == "mean not a vector":
        save_file({**good, "mean": basis.mean.reshape(1, c).copy()}, str(path))
    # "missing": no file at all


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "junk",
        "empty",
        "no axes",
        "axes not square",
        "variance too short",
        "mean not a vector",
        "missing",
    ],
)
def test_a_damaged_basis_file_raises_wire_error(tmp_path, how):
    # Prepare
    path = tmp_path / "b.safetensors"
    _damage(path, how, _fit(_maps("random")))
    # Execute / Assert
    with pytest.raises(WireError, match=r"projection basis .*b\.safetensors"):
        Basis.load(path)


@pytest.mark.parametrize("tensor", ["mean", "axes"])
def test_bug_a_basis_file_holding_nan_raises_wire_error(tmp_path, tensor):
    # Prepare: a bit-flipped file, the damage landing in one value (safetensors has no checksum)
    basis = _fit(_maps("random"))
    arrays = {"mean": basis.mean.copy(), "axes": basis.axes.copy(), "variance": basis.variance}
    arrays[tensor].reshape(-1)[0] = np.nan
    path = tmp_path / "b.safetensors"
    save_file(arrays, str(path))
    # Execute / Assert
    with pytest.raises(WireError):
        Basis.load(path)


@pytest.mark.parametrize("value", [0.0, 2.5, -1e6])
def test_basis_fit_on_constant_maps_gives_finite_orthonormal_axes(value):
    # Prepare: no variance at all (cov == 0)
    x = np.full((3, TOKENS, CHANNELS), value, np.float32)
    # Execute
    basis = _fit(x)
    p = basis.projection(4)
    # Assert: a usable basis: finite, orthonormal, every map projects to 0
    assert np.isfinite(basis.axes).all() and np.isfinite(basis.mean).all()
    np.testing.assert_allclose(basis.axes.T @ basis.axes, np.eye(CHANNELS), atol=1e-5)
    np.testing.assert_allclose(basis.mean, value, rtol=1e-6)
    assert (basis.variance == 0).all() and basis.kept(1) == 1.0
    np.testing.assert_allclose(p.apply(x), 0.0, atol=1e-6 * max(1.0, abs(value)))


def test_basis_fit_refuses_what_it_cannot_fit():
    fit = BasisFit(4)
    with pytest.raises(WireError, match=r"\[\.\.\., 4\] maps"):
        fit.add(np.zeros((2, 3, 5)))
    bad = np.zeros((2, 3, 4))
    bad[1, 1, 1] = np.nan
    with pytest.raises(WireError, match="NaN or Inf"):
        fit.add(bad)
    fit.add(np.ones((1, 4)))  # one row
    with pytest.raises(WireError, match="two feature rows"):
        fit.finish("x")
    with pytest.raises(WireError, match=r"1\.\.4"):
        _fit(np.zeros((2, 3, 4))).projection(5)
    with pytest.raises(WireError, match="expects 4"):
        _fit(np.zeros((2, 3, 4))).projection(2).apply(np.zeros((3, 5)))


# -- live: fitted once, pinned by id ------------------------------------------------------------
TASK = "synthetic:train=24,val=8,test=12"
SAMPLE = "synthetic:train=16,val=1,test=1,seed=3"  # the cloud's fixed sample; not offered
WIRE = "pca8-int4ch"


def _serve(store: Path, **kw) -> ServeConfig:
    base = dict(
        port=0,
        random_init=True,
        cache_dir=str(store),
        rows_per_batch=8,
        tasks=(TASK,),
        projection_sample=SAMPLE,
        projection_images=16,
    )
    return ServeConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fits(monkeypatch) -> list[str]:
    """Every basis fit a cloud in this process runs, by image set."""
    seen: list[str] = []
    real = Projections._fit

    def counted(self, spec, task):
        seen.append(task)
        return real(self, spec, task)

    monkeypatch.setattr(Projections, "_fit", counted)
    return seen


@pytest.mark.network
def test_a_basis_is_fitted_once_served_by_id_and_loaded_by_a_restarted_cloud(
    tiny_backbone, tmp_path, fits, monkeypatch
):
    # Prepare
    cfg = _serve(tmp_path / "store")
    # Execute: the same wire twice, the same D in another dtype, a smaller D
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc, retries=0) as c:
        first = c.get(TASK, "val", "mist", 2, "pca8-int8")
        after_first = c.stats()
        second = c.get(TASK, "val", "mist", 2, "pca8-int8")
        after_second = c.stats()
        same_d = c.get(TASK, "val", "mist", 2, "pca8-float16")
        smaller = c.get(TASK, "val", "mist", 2, "pca4-int8")
        after_all = c.stats()
    (saved,) = (tmp_path / "store").rglob("projections/*.safetensors")
    written = saved.stat().st_mtime_ns
    # ... and a restarted cloud on the same store, which must not fit at all
    monkeypatch.setattr(Projections, "_fit", lambda *a: pytest.fail("a restarted cloud refit"))
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc, retries=0) as c:
        fresh = c.stats()
        restarted = c.get(TASK, "val", "mist", 2, "pca8-int8")
        after_restart = c.stats()
    # Assert: one fit, on the fixed sample's 16 images (+ the 8 val images served)
    basis = first.meta["basis"]
    assert fits == [SAMPLE]
    assert after_first["images_embedded"] == 16 + 8
    assert after_second["images_embedded"] == after_all["images_embedded"] == 16 + 8
    assert list(after_all["projections"].values()) == [
        {"fitted_on": f"mist2 of 16 {SAMPLE} training images", "channels": 48}
    ]
    # one id per applied numbers: the same for the same D, another for another D
    assert second.meta["basis"] == same_d.meta["basis"] == basis != smaller.meta["basis"]
    assert tuple(first.features.shape) == (8, 17, 8) and tuple(smaller.features.shape) == (8, 17, 4)
    assert torch.equal(first.features, second.features)
    assert (first.features - same_d.features.float()).abs().max() < 0.1 * first.features.abs().max()
    # the restarted cloud loaded the file: same id, no fit, nothing embedded, file untouched
    assert fresh["projections"] == {} and restarted.meta["basis"] == basis
    assert after_restart["images_embedded"] == 0 and len(after_restart["projections"]) == 1
    assert torch.equal(restarted.features, first.features)
    assert saved.stat().st_mtime_ns == written


@pytest.mark.network
def test_concurrent_first_requests_share_one_fit(tiny_backbone, tmp_path, fits):
    # Prepare
    cfg = _serve(tmp_path / "store")
    got: list[str] = []
    errors: list[BaseException] = []
    with running_cloud(cfg, backbone=tiny_backbone) as loc:
        gate = threading.Barrier(3)

        def pull() -> None:
            try:
                with FeatureClient(loc, retries=0) as c:
                    gate.wait(timeout=10)
                    got.append(c.get(TASK, "train", "mist", 3, "pca6-float16").meta["basis"])
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=pull) for _ in range(3)]
        # Execute
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    # Assert
    assert not errors and len(got) == 3 and len(set(got)) == 1
    assert fits == [SAMPLE]


@pytest.mark.network
def test_a_refitted_basis_is_refused_by_a_pinned_device_and_a_saved_model(tiny_backbone, tmp_path):
    # Prepare: a cloud that the device and a saved model know, then the same address and
    # store restarted with another projection_images: a new fit, so a new basis id
    port = _free_port()
    loc = f"grpc+tcp://127.0.0.1:{port}"
    cfg = _serve(tmp_path / "store", port=port)
    image = tmp_path / "x.png"
    get_task(TASK).split("test").image(1).save(image)
    model = tmp_path / "model"
    src = FlightSource(loc, retries=3, backoff_s=0.05)
    with src, EdgeDevice(load_profile("laptop"), src, tmp_path / "device") as dev:
        with running_cloud(cfg, backbone=tiny_backbone):
            train = dev.features(TASK, "train", "mist_pool", 3, WIRE)
            net = dev.new_net("mist_pool", 4, 3, wire=WIRE)
            dev.train(net, train, TrainConfig(epochs=1))
            old = train.meta.basis
            mcfg = EdgeModelConfig(
                "mist_pool", 4, dev.geometry, "mistpool", 3, WIRE, basis=old, task=TASK
            )
            save_checkpoint(net, mcfg, model)
            predicted = predict_images(model, loc, [image])  # the control: same basis
        with running_cloud(cfg.override(projection_images=12), backbone=tiny_backbone):
            # Execute
            with pytest.raises(WireError) as device_refused:
                dev.features(TASK, "test", "mist_pool", 3, WIRE)
            with pytest.raises(WireError) as model_refused:
                predict_images(model, loc, [image])
            with FeatureClient(loc, retries=0) as c:
                new = c.get(TASK, "test", "mistpool", 3, WIRE).meta["basis"]
    # Assert: both refusals name both ids; before the refit the model did predict
    assert old and new and old != new
    for refused in (device_refused, model_refused):
        assert old in str(refused.value) and new in str(refused.value)
    assert "pinned" in str(device_refused.value) and "retrain" in str(model_refused.value)
    assert predicted[0]["image"] == str(image) and len(predicted[0]["top"]) == 4


@pytest.mark.network
def test_a_task_fitted_wire_is_refused_on_an_upload_and_a_sample_one_is_served(
    tiny_backbone, tmp_path
):
    # Prepare
    blob = encode_png(get_task(TASK).split("test").image(0))
    with (
        running_cloud(_serve(tmp_path / "store"), backbone=tiny_backbone) as loc,
        FeatureClient(loc, retries=0) as c,
    ):
        # Execute
        with pytest.raises(CloudRequestError) as refused:
            c.embed([("x", blob)], "mist", 2, "pca8task-int8")
        uploaded = c.embed([("x", blob)], "mist", 2, "pca8-int8")
        by_reference = c.get(TASK, "test", "mist", 2, "pca8-int8", ids=["test-000000"])
    # Assert: the refusal says why and what to use; the fixed sample's basis serves both ways
    assert "uploaded images have no task" in str(refused.value)
    assert "use pca8-int8" in str(refused.value)
    assert uploaded.meta["basis"] == by_reference.meta["basis"] != ""
    assert tuple(uploaded.features.shape) == (1, 17, 8)
    torch.testing.assert_close(uploaded.features, by_reference.features)


def _long_synthetic(seed: int) -> str:
    """A valid synthetic task spec over 80 characters; two seeds differ only at its end."""
    return "synthetic:" + "classes=4," * 8 + f"train=6,val=1,test=1,seed={seed}"


@pytest.mark.network
def test_a_task_fitted_wire_fits_on_the_tasks_own_images(tiny_backbone, tmp_path, fits):
    # Prepare
    other = "synthetic:train=6,val=1,test=1,seed=9"
    cfg = _serve(tmp_path / "store", tasks=(TASK, other))
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc, retries=0) as c:
        # Execute
        ids = {
            t: c.get(t, "val", "mist", 1, "pca6task-float32").meta["basis"] for t in (TASK, other)
        }
        ids["sample"] = c.get(TASK, "val", "mist", 1, "pca6-float32").meta["basis"]
        again = c.get(TASK, "train", "mist", 1, "pca6task-int8").meta["basis"]
        stats = c.stats()
    # Assert: one basis per image set, each fitted once; the split asked for does not matter
    assert sorted(fits) == sorted([TASK, other, SAMPLE])
    assert len(set(ids.values())) == 3 and again == ids[TASK]
    assert len(stats["projections"]) == 3


@pytest.mark.network
def test_bug_two_long_task_names_get_their_own_task_bases(tiny_backbone, tmp_path, fits):
    # Prepare: two valid specs with other images (seed), alike for their first 80+ characters
    a, b = _long_synthetic(1), _long_synthetic(2)
    pixels = [np.asarray(get_task(t).split("train").image(0)) for t in (a, b)]
    assert len(a) > 90 and not np.array_equal(*pixels)
    cfg = _serve(tmp_path / "store", tasks=(a, b))
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc, retries=0) as c:
        # Execute
        ids = [c.get(t, "val", "mist", 1, "pca6task-float32").meta["basis"] for t in (a, b)]
    # Assert
    assert sorted(fits) == sorted([a, b]) and ids[0] != ids[1]


# -- which methods and names take a projection --------------------------------------------------
@pytest.mark.parametrize("method", ["partial1", "side", "linear"])
def test_methods_that_need_the_backbones_channels_refuse_a_projection(
    tiny_backbone, tmp_path, method
):
    # Prepare
    init = tiny_backbone.edge_init_state(method) if starts_from_backbone(method) else None
    source = MemorySource(geometry=tiny_backbone.geometry, init=init)
    dev = EdgeDevice(load_profile("laptop"), source, tmp_path)
    # Execute / Assert: the net builder, and a device asked for the net of a pca wire
    with pytest.raises(ConfigError, match="48 channels, not a projection: a projected wire is"):
        build_edge_net(method, tiny_backbone.geometry, 4, init, projection=8)
    with pytest.raises(ConfigError, match="a projected wire is for"):
        dev.new_net(method, 4, wire="pca8-int8")
    assert dev.new_net(method, 4, wire="int8") is not None  # the control: its own channels


@pytest.mark.parametrize(
    "method", [m.name for m in METHODS.values() if m.edge in PROJECTABLE_EDGES]
)
def test_projectable_methods_build_a_net_of_d_channels_that_runs(method, tmp_path):
    # Prepare
    source = MemorySource()
    dev = EdgeDevice(load_profile("laptop"), source, tmp_path)
    # Execute
    net = dev.new_net(method, 3, 2, wire="pca5-int4ch")
    logits = net(torch.randn(2, *dev.feature_shape(method, 2, "pca5-int4ch")))
    # Assert
    tokens = source.g.shape(dev.spec(method, 2))[0]  # mist_pool: the pooled grid's
    assert dev.feature_shape(method, 2, "pca5-int4ch") == (tokens, 5)
    assert tuple(logits.shape) == (2, 3) and bool(logits.isfinite().all())


def test_bug_partial1_refuses_a_projection_to_the_full_width(tiny_backbone, tmp_path):
    # Prepare: D == the backbone's 48 channels: still a rotation of z_{N-1}
    init = tiny_backbone.edge_init_state("partial1")
    source = MemorySource(geometry=tiny_backbone.geometry, init=init)
    dev = EdgeDevice(load_profile("laptop"), source, tmp_path)
    # Execute / Assert
    with pytest.raises(ConfigError):
        dev.new_net("partial1", 4, wire="pca48-int8")


def test_bug_a_projection_wider_than_the_backbone_is_a_config_error(tmp_path):
    dev = EdgeDevice(load_profile("laptop"), MemorySource(), tmp_path)  # 16 channels
    with pytest.raises(ConfigError, match="32 channels"):
        dev.new_net("mist", 3, 2, wire="pca32-int8")


@pytest.mark.parametrize(
    "bad",
    [
        "pca0-int8",
        "pca8-foo",
        "pca99999-int8",
        f"pca{MAX_PROJECTED_DIM + 1}-int8",
        "pca08-int8",
        "pca-int8",
        "pca8",
        "pca8-",
        "pca8task",
        "pca8sample-int8",
        "PCA8-int8",
        "pca8-pca8-int8",
        "pca8-int4ch+gzip",
        "pca8task-int8+zstd+lz4",
        " pca8-int8",
    ],
)
def test_bad_projected_names_are_refused_by_name(bad):
    with pytest.raises(argparse.ArgumentTypeError, match=r"wire dtype|over 4096"):
        wire_arg(bad)
    with pytest.raises(ValueError):
        parse_wire(bad)
    with pytest.raises(ConfigError, match="--dtype"):
        ClientConfig(TASK, "grpc+tcp://127.0.0.1:1", "laptop", "out", dtype=bad)


def test_a_projected_name_parses_into_its_parts_and_sizes():
    # Execute
    w = parse_wire("pca16task-int4ch+zstd")
    # Assert
    assert (w.dims, w.scope, w.base, w.codec, w.encoded) == (
        16,
        "task",
        "int4ch",
        "zstd",
        "int4ch+zstd",
    )
    assert parse_wire("pca16-int4ch").scope == "sample" and parse_wire("int4ch").dims is None
    assert parse_wire(f"pca{MAX_PROJECTED_DIM}-float16").dims == MAX_PROJECTED_DIM
    assert wire_arg("pca16-int4ch") == "pca16-int4ch"
    assert wire_dim("pca16-int8", 48) == 16 and wire_dim("int8", 48) == 48
    assert (
        wire_shape((17, 48), "pca16-int8") == (17, 16) and stored_dtype("pca16-int8") == "float16"
    )
    assert feature_bytes((17, 16), "pca16-int4ch") == feature_bytes((17, 16), "int4ch")
    with pytest.raises(ValueError, match="measured"):
        feature_bytes((17, 16), "pca16-int4ch+zstd")
    with pytest.raises(ValueError, match="49 channels"):
        wire_dim("pca49-int8", 48)
    for shape in ((48,), (4, 17, 48)):  # final, side: no [tokens, channels] map to project
        with pytest.raises(ValueError, match="projects a"):
            wire_shape(shape, "pca16-int8")


def test_the_clis_and_the_fleet_spec_take_a_projected_name(capsys):
    # Prepare
    parser = build_parser()
    fleet = TaskFleet(task=TASK, devices=1, name="a")
    # Execute
    args = parser.parse_args(["client", "--task", TASK, "--dtype", "pca16-int4ch"])
    sim = parser.parse_args(["simulate", "--wire-dtype", "pca8task-int8ch+zstd"])
    spec = FleetSpec(fleets=(fleet,), wire_dtype="pca16-int4ch")
    # Assert
    assert args.dtype == "pca16-int4ch" and sim.wire_dtype == "pca8task-int8ch+zstd"
    assert spec.wire_dtype == "pca16-int4ch"
    with pytest.raises(ConfigError, match="wire_dtype"):
        FleetSpec(fleets=(fleet,), wire_dtype="pca0-int8")
    with pytest.raises(SystemExit):
        parser.parse_args(["client", "--task", TASK, "--dtype", "pca8-foo"])
    assert "pca8-foo" in capsys.readouterr().err


@pytest.mark.network
def test_a_fleet_trains_and_averages_nets_on_a_projected_wire(tiny_backbone, tmp_path, monkeypatch):
    # Prepare: two FedAvg devices over two rounds on pca8-int4ch, through the plain fleet loop
    from mist_fed.fleet.runtime.session import run_plain
    from mist_fed.fleet.spec import spec_from_dict

    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    spec = spec_from_dict(
        {
            "fleets": [{"task": TASK, "devices": 2, "method": "mist"}],
            "profiles": "laptop",
            "backbone": {
                "name": tiny_backbone.name,
                "random_init": True,
                "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48,
                                 "num_heads": 3},
            },
            "wire_dtype": WIRE,
            "k": 2,
            "train_per_device": 8,
            "test_per_device": 4,
            "rounds": 2,
            "local_epochs": 1,
        }
    )  # fmt: skip
    # Execute
    with running_cloud(_serve(tmp_path / "store"), backbone=tiny_backbone) as loc:
        records = run_plain(spec, cloud=loc).records
    # Assert: every device-round ok, on nets of 8 channels, the two devices averaged alike
    assert [d["status"] for d in records.devices] == ["ok"] * 4
    (state,) = records.final_states.values()
    assert state["input_norm.weight"].shape == (8,)
    second = [d["received_digest"] for d in records.devices if d["round"] == 2]
    assert len(second) == 2 and len(set(second)) == 1
