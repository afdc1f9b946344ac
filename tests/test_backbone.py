"""The frozen backbone: weight sources, freezing, and no task state in the cloud."""

import pytest
import torch
from safetensors.torch import save_file

from mist_fed.cloud.backbone import create_backbone
from mist_fed.cloud.gather import GatherSpec, gather
from mist_fed.core.methods import build_edge_net, method_gather
from mist_fed.errors import BackboneError, WeightsUnavailableError
from tests.conftest import TINY_VIT


def test_backbone_is_frozen_and_receives_no_gradient(tiny_backbone):
    # Prepare
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    n_params = sum(p.numel() for p in tiny_backbone.parameters())
    net = build_edge_net("mist", tiny_backbone.geometry, num_classes=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    # Execute: one training step of the edge net on gathered features
    tiny_backbone.train()
    feats = gather(tiny_backbone, x, method_gather("mist", tiny_backbone.num_blocks, 2))
    loss = torch.nn.functional.cross_entropy(net(feats.clone()), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    # Assert
    assert not tiny_backbone.training and not tiny_backbone.model.training
    assert all(not p.requires_grad and p.grad is None for p in tiny_backbone.parameters())
    assert not feats.requires_grad
    for k, v in tiny_backbone.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert sum(p.numel() for p in tiny_backbone.parameters()) == n_params
    assert isinstance(tiny_backbone.model.head, torch.nn.Identity)  # no task head in the cloud


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_round_trip(tiny_backbone, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    loaded = create_backbone("vit_tiny_patch16_224", weights=path, **TINY_VIT)
    x = torch.randn(2, 3, 32, 32)
    spec = GatherSpec("mist", 3)
    torch.testing.assert_close(gather(loaded, x, spec), gather(tiny_backbone, x, spec))
    assert loaded.weights_id.startswith("file:")


def test_hub_path_fails_offline_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="not reachable"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k", **TINY_VIT)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", weights=tmp_path / "missing.safetensors")
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("not_a_vit_at_all", random_init=True)
    bad = tmp_path / "w.safetensors"
    save_file({"foo": torch.zeros(2)}, str(bad))
    with pytest.raises(BackboneError, match="do not fit"):
        create_backbone("vit_tiny_patch16_224", weights=bad, **TINY_VIT)


def test_preprocessing_config_is_exposed(tiny_backbone):
    cfg = tiny_backbone.data_config
    assert cfg["input_size"] == (3, 32, 32)
    assert len(cfg["mean"]) == 3
    from PIL import Image

    img = Image.new("RGB", (50, 40), (255, 0, 0))
    assert tiny_backbone.transform()(img).shape == (3, 32, 32)
