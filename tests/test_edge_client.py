"""`mist-fed client` end to end against a real local feature server on a synthetic task."""

import dataclasses
import json
import socket
from typing import ClassVar

import pyarrow.flight as flight
import pytest
import torch

from mist_fed.cli import main
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.server import FeatureServer
from mist_fed.device.checkpoint import load_checkpoint
from mist_fed.device.client import ClientConfig, run_client
from mist_fed.device.trainer import TrainConfig, evaluate
from mist_fed.errors import CloudUnavailableError, ResourceLimitError, WireError
from mist_fed.wire.flight import FeatureClient
from tests.conftest import served_id

pytestmark = [pytest.mark.network, pytest.mark.slow]

TASK = "synthetic:train=24,val=8,test=12"
FAST = TrainConfig(epochs=3, micro_batch=0, grad_checkpointing=False)


def _serve(tmp_path, **kw):
    return ServeConfig(
        port=0,
        random_init=True,
        cache_dir=str(tmp_path / "store"),
        rows_per_batch=8,
        tasks=(TASK,),
        **kw,
    )


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test's devices keep their features under its own MIST_FED_CACHE."""
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cloud(tiny_backbone, tmp_path_factory):
    with running_cloud(_serve(tmp_path_factory.mktemp("cloud")), backbone=tiny_backbone) as loc:
        yield loc


def test_client_command_trains_evaluates_and_saves(cloud, tiny_backbone, tmp_path, capsys):
    # Prepare
    out = tmp_path / "run"
    argv = ["client", "--task", TASK, "--cloud", cloud, "--profile", "rpi4", "--out", str(out)]
    argv += ["--epochs", "3", "--micro-batch", "8", "--time-scale", "1000", "--dtype", "float16"]
    argv += ["--method", "mist"]  # the full map (the default is mist_pool)
    argv += ["--device-dir", str(tmp_path / "device")]
    # Execute: a run, and a rerun into another --out
    rc = main(argv)
    rerun = main([str(tmp_path / "again") if a == str(out) else a for a in argv])
    # Assert
    assert rc == rerun == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["k"] in (1, 2, 3) and set(m["val_accuracy"]) == {"1", "2", "3"}
    assert 0.0 <= m["accuracy"] <= 1.0 and m["test_rows"] == 12
    rows = 3 * (24 + 8) + 12
    per_row = tiny_backbone.num_tokens * tiny_backbone.embed_dim * 2
    assert rows * per_row <= m["bytes_down"] <= rows * (per_row + 64)
    assert m["requests"] == 7 and m["bytes_up"] == 0 and m["feature_bytes"] == m["bytes_down"]
    rpi4 = m["profile"]
    want = 7 * rpi4["latency_ms"] / 1e3 + m["bytes_down"] * 8 / (rpi4["downlink_mbps"] * 1e6)
    assert m["transfer_s"] == pytest.approx(want)
    assert m["compute_s"] == pytest.approx(m["host_compute_s"] * m["host_gflops"] / rpi4["gflops"])
    assert m["peak_rss_mb"] > m["peak_mem_mb"] >= 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["feature_bytes"] == again["bytes_down"] == again["requests"] == 0
    assert again["accuracy"] == pytest.approx(m["accuracy"], abs=0.1)
    net, cfg = load_checkpoint(out)
    assert cfg.k == m["k"] and cfg.backbone == tiny_backbone.name and cfg.dtype == "float16"
    test = FeatureClient(cloud).get(TASK, "test", "mist", m["k"], "float16")
    assert evaluate(net, test) == pytest.approx(m["accuracy"])
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["linear", "side"])
def test_client_runs_the_baselines(cloud, tmp_path, method):
    cfg = ClientConfig(
        TASK,
        cloud,
        "phone-mid",
        str(tmp_path),
        method=method,
        train=FAST,
        device_dir=str(tmp_path / "d"),
    )
    m = run_client(cfg)
    assert m["k"] is None and m["edge_params"] > 0
    assert (tmp_path / "lae.safetensors").is_file()


def test_partial1_model_of_a_custom_sized_backbone_loads_from_its_checkpoint(
    cloud, tiny_backbone, tmp_path
):
    # Prepare: the cloud's backbone is a custom-sized ViT (not vit_tiny's default width)
    cfg = ClientConfig(TASK, cloud, "laptop", str(tmp_path), method="partial1", train=FAST)
    m = run_client(cfg)
    # Execute: rebuild with nothing but the checkpoint (no backbone at hand)
    net, saved = load_checkpoint(tmp_path)
    # Assert: the cloud's backbone, in the numerics it chose for this host (its weights id says
    # which: ``@bfloat16-openvino`` on a CPU with bfloat16, none in float32)
    served = dataclasses.replace(tiny_backbone.geometry, weights=served_id(tiny_backbone))
    assert saved.geometry == served
    test = FeatureClient(cloud).get(TASK, "test", "block", tiny_backbone.num_blocks - 1)
    assert evaluate(net, test) == pytest.approx(m["accuracy"])


def test_partial1_client_starts_from_the_clouds_pretrained_last_block(
    tiny_backbone, tmp_path, monkeypatch
):
    # Prepare: a cloud whose backbone is not the seed-0 random init of the same architecture
    # (a client that built its own random backbone would get that one)
    from mist_fed.cloud.backbone import create_backbone
    from mist_fed.device import edge

    cloud_bb = create_backbone(
        tiny_backbone.name, random_init=True, seed=5, **tiny_backbone.spec.model_kwargs
    )
    built = []

    def spy(*args, **kw):
        net = real_build(*args, **kw)
        built.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return net

    real_build = edge.build_edge_net
    monkeypatch.setattr(edge, "build_edge_net", spy)
    cfg = ClientConfig(TASK, "", "laptop", str(tmp_path), method="partial1", train=FAST)
    # Execute
    with running_cloud(_serve(tmp_path / "cloud"), backbone=cloud_bb) as loc:
        m = run_client(dataclasses.replace(cfg, cloud=loc))
    # Assert: the net the client trains starts as the cloud's last block and final norm
    assert len(built) == 1
    own = create_backbone(tiny_backbone.name, random_init=True, **tiny_backbone.spec.model_kwargs)
    for prefix, module in (("block", cloud_bb.model.blocks[-1]), ("norm", cloud_bb.model.norm)):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(built[0][f"{prefix}.{k}"], v, rtol=0, atol=0)
    own_qkv = own.model.blocks[-1].attn.qkv.weight
    assert not torch.equal(built[0]["block.attn.qkv.weight"], own_qkv)
    # ... and its one-off download is counted in the device's transfer bytes
    block_bytes = sum(v.numel() * 4 for v in cloud_bb.model.blocks[-1].state_dict().values())
    assert m["init_bytes_down"] > block_bytes
    assert m["bytes_down"] > m["init_bytes_down"] and m["requests"] == 4


def test_client_upload_and_predict(cloud, tmp_path, capsys):
    # Prepare
    cfg = ClientConfig(TASK, cloud, "laptop", str(tmp_path), upload=True, ks=(2,), train=FAST)
    m = run_client(cfg)
    from mist_fed.data import get_task

    img = tmp_path / "x.png"
    get_task(TASK).split("test").image(1).save(img)
    # Execute
    rc = main(["client", "predict", "--model", str(tmp_path), "--cloud", cloud, str(img)])
    # Assert
    assert m["bytes_up"] > 0 and m["k"] == 2
    assert rc == 0
    assert capsys.readouterr().out.startswith(f"{img}: c")


def test_predict_runs_on_the_device_that_charges_link_clock_and_meter(cloud, tmp_path):
    # Prepare: a saved model and one local image
    from mist_fed.data import get_task
    from mist_fed.device.edge import EdgeDevice
    from mist_fed.device.profiles import load_profile
    from mist_fed.device.source import FlightSource
    from mist_fed.device.trainer import predict
    from mist_fed.wire.codec import encode_png

    run_client(ClientConfig(TASK, cloud, "laptop", str(tmp_path / "m"), ks=(2,), train=FAST))
    net, mcfg = load_checkpoint(tmp_path / "m")
    png = encode_png(get_task(TASK).split("test").image(1))
    # Execute
    src = FlightSource(cloud)
    with src, EdgeDevice(load_profile("rpi4"), src, tmp_path / "dev") as dev:
        got = dev.predict(net, mcfg.method, mcfg.k, mcfg.dtype, [("x", png)], mcfg.basis)
        with pytest.raises(WireError, match="retrain"):
            dev.predict(net, mcfg.method, mcfg.k, mcfg.dtype, [("x", png)], "another-basis")
    # Assert: the saved model's probabilities on the cloud's features, and the device paid
    fs = FeatureClient(cloud).embed([("x", png)], "mist", mcfg.k, mcfg.dtype)
    assert got.ids == ["x"] and not got.errors
    assert torch.allclose(got.probs, predict(net, fs.features).softmax(1))
    m = dev.report()
    assert m.bytes_up == 2 * len(png) and m.feature_bytes > 0 and m.images_down == 2
    assert m.compute_s > 0 and m.peak_rss_mb > 0 and m.edge_params > 0


def test_unreachable_cloud_retries_then_fails_clearly(tmp_path):
    # Prepare: a port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ClientConfig(
        TASK, f"grpc+tcp://127.0.0.1:{port}", "rpi4", str(tmp_path), retries=2, backoff_s=0.01
    )
    # Execute / Assert
    with pytest.raises(CloudUnavailableError, match="unreachable after 3 tries"):
        run_client(cfg)


class _CutFirstStreams(FeatureServer):
    """Drops every first-try stream after one batch, as a flaky link would."""

    offsets: ClassVar[list[int]] = []

    def _stream(self, context, principal, req, split, rows, *rest):
        type(self).offsets.append(req.offset)
        inner = super()._stream(context, principal, req, split, rows, *rest)
        if req.offset:
            yield from inner
            return
        yield next(inner)
        raise flight.FlightUnavailableError("connection dropped")


def test_client_resumes_cut_streams_and_trains_on_whole_data(tiny_backbone, tmp_path):
    # Prepare: the server's log of offsets starts empty, whatever ran before
    _CutFirstStreams.offsets.clear()
    with running_cloud(
        _serve(tmp_path), backbone=tiny_backbone, server_cls=_CutFirstStreams
    ) as loc:
        cfg = ClientConfig(TASK, loc, "rpi4", str(tmp_path / "o"), ks=(3,), backoff_s=0.01)
        # Execute
        m = run_client(ClientConfig(**{**cfg.__dict__, "train": FAST}))
    # Assert: each split cut after 8 rows and resumed there; every row arrived once
    assert _CutFirstStreams.offsets == [0, 8, 0, 8, 0, 8]
    assert m["test_rows"] == 12 and m["train_steps"] == 3  # 24 rows / 32 per batch x 3 epochs


def test_memory_cap_refuses_an_oversize_job(cloud, tmp_path):
    # Prepare: a device with less memory than the runtime itself
    prof = tmp_path / "tiny.toml"
    src = "[sources]\n" + "".join(
        f'{k} = "test"\n'
        for k in ("cores", "memory_mb", "downlink_mbps", "uplink_mbps", "latency_ms", "gflops")
    )
    prof.write_text(
        'name = "watch"\ncores = 1\nmemory_mb = 64\ndownlink_mbps = 1.0\nuplink_mbps = 1.0\n'
        "latency_ms = 10\ngflops = 1.0\n" + src
    )
    cfg = ClientConfig(TASK, cloud, str(prof), str(tmp_path / "o"), train=FAST)
    # Execute / Assert
    with pytest.raises(ResourceLimitError, match=r"exceeds device memory.*measured peak"):
        run_client(cfg)
    assert not (tmp_path / "o" / "lae.safetensors").exists()


class _WrongK(FeatureServer):
    """Answers every request with the features of k=1, whatever was asked."""

    def _parse(self, raw, upload=False):
        from mist_fed.wire.request import FeatureRequest

        req = super()._parse(raw, upload)
        k = 1 if req.k is not None else None
        return FeatureRequest(req.task, req.split, req.gather, k, req.dtype, req.ids, req.offset)


def test_client_refuses_features_of_another_k(tiny_backbone, tmp_path):
    with running_cloud(_serve(tmp_path), backbone=tiny_backbone, server_cls=_WrongK) as loc:
        cfg = ClientConfig(TASK, loc, "rpi4", str(tmp_path / "o"), ks=(3,), train=FAST)
        with pytest.raises(WireError, match="k 1"):
            run_client(cfg)
    assert not (tmp_path / "o" / "lae.safetensors").exists()
