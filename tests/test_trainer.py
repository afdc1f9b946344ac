"""The edge trainer, checkpoints and the device clock, on random features and tiny LAEs."""

import pytest
import torch

from mist_fed.device.checkpoint import EdgeModelConfig, build_net, load_checkpoint, save_checkpoint
from mist_fed.device.clock import DeviceClock, calibrate_host
from mist_fed.device.profiles import load_profile
from mist_fed.device.trainer import TrainConfig, evaluate, fit, select_k
from mist_fed.errors import ConfigError
from mist_fed.core.edge_nets import LAE
from mist_fed.wire.features import FeatureSet

SHAPE = (5, 16)  # tokens, dim


def _data(n=48, classes=3, seed=0, signal=3.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, *SHAPE, generator=g)
    x[:, 0, :classes] += signal * torch.nn.functional.one_hot(labels, classes)
    return FeatureSet([f"r{i}" for i in range(n)], labels, x.half())


def _net(classes=3):
    torch.manual_seed(0)
    return LAE(dim=SHAPE[1], tokens=SHAPE[0], num_classes=classes, depth=2, qkv_dim=8)


def test_fit_learns_and_ignores_unlabelled_rows():
    # Prepare
    data = _data()
    data.labels[:6] = -1
    net = _net()
    # Execute
    result = fit(
        net, data, TrainConfig(epochs=15, lr=1e-2, micro_batch=0, grad_checkpointing=False)
    )
    # Assert
    assert result.losses[-1] < result.losses[0] / 2
    assert result.steps == 15 * 2 and result.samples == 15 * 42
    assert evaluate(net, _data(seed=1)) > 0.6  # chance is 1/3


def test_micro_batches_and_checkpointing_keep_the_math():
    # Prepare
    data = _data(n=32)
    base = dict(epochs=1, lr=1e-2, batch_size=32)
    grads = {}

    def grab(name, net):
        return lambda step, loss: grads.setdefault(name, [p.grad.clone() for p in net.parameters()])

    # Execute: one step each; gradients are compared before AdamW normalises them
    whole, lean = _net(), _net()
    fit(whole, data, TrainConfig(**base, micro_batch=0, grad_checkpointing=False), grab("w", whole))
    fit(lean, data, TrainConfig(**base, micro_batch=5, grad_checkpointing=True), grab("l", lean))
    # Assert
    for a, b in zip(grads["w"], grads["l"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_select_k_keeps_the_best_on_validation():
    # Prepare: k=2 carries the signal, k=1 is noise
    good = (_data(seed=0), _data(seed=1))
    bad = (_data(seed=0, signal=0.0), _data(seed=1, signal=0.0))
    # Execute
    sel = select_k(_net, {1: bad, 2: good}, [2, 1], TrainConfig(epochs=10, lr=1e-2, micro_batch=0))
    # Assert
    assert sel.k == 2 and sel.val_acc[2] > sel.val_acc[1]
    assert set(sel.fits) == {1, 2} and sel.train_seconds > 0


def test_train_config_validates_and_reads_kebab_case():
    assert TrainConfig.from_dict({"batch-size": 8, "epochs": 2}).batch_size == 8
    assert TrainConfig.for_method("linear").lr > TrainConfig.for_method("mist").lr
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_checkpoint_round_trip(tmp_path):
    # Prepare
    cfg = EdgeModelConfig(
        method="mist",
        num_classes=3,
        backbone="tiny",
        weights_id="random:tiny",
        num_blocks=3,
        tokens=SHAPE[0],
        dim=SHAPE[1],
        k=2,
        edge_kwargs={"depth": 2, "qkv_dim": 8},
        classes=["a", "b", "c"],
    )
    net = build_net(cfg)
    fit(net, _data(), TrainConfig(epochs=2))
    # Execute
    save_checkpoint(net, cfg, tmp_path)
    again, cfg2 = load_checkpoint(tmp_path)
    # Assert
    assert cfg2 == cfg
    x = _data(seed=3).features.float()
    torch.testing.assert_close(net.eval()(x), again(x))
    with pytest.raises(ConfigError, match="not an edge model"):
        load_checkpoint(tmp_path / "missing")


def test_partial1_checkpoint_of_a_custom_sized_vit_round_trips(tmp_path):
    # Prepare: a ViT far from its timm name's default size, and Partial-1 on its last block
    from mist_fed.model.backbone import create_backbone

    kw = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    backbone = create_backbone("vit_tiny_patch16_224", random_init=True, seed=1, **kw)
    cfg = EdgeModelConfig.for_backbone("partial1", backbone, num_classes=3)
    net = build_net(cfg, backbone)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, backbone.num_tokens, backbone.embed_dim, generator=g)
    data = FeatureSet([f"r{i}" for i in range(8)], torch.arange(8) % 3, x)
    fit(net, data, TrainConfig(epochs=1, batch_size=8, micro_batch=0, grad_checkpointing=False))
    # Execute: save, then rebuild without the backbone
    save_checkpoint(net, cfg, tmp_path)
    again, cfg2 = load_checkpoint(tmp_path)
    # Assert
    assert cfg2.backbone_kwargs == kw
    torch.testing.assert_close(net.eval()(x), again(x))


def test_partial1_net_without_backbone_needs_its_pretrained_block(tiny_backbone):
    # Prepare

    cfg = EdgeModelConfig.for_backbone("partial1", tiny_backbone, num_classes=3)
    init = tiny_backbone.edge_init_state("partial1")
    # Execute: shapes from the meta device, weights from the cloud's edge_init state
    net = build_net(cfg, init=init)
    # Assert
    state = net.state_dict()
    assert not any(v.is_meta for v in state.values())
    for k, v in init.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert torch.isfinite(state["head.weight"]).all() and state["head.weight"].abs().sum() > 0
    x = torch.randn(2, tiny_backbone.num_tokens, tiny_backbone.embed_dim)
    torch.testing.assert_close(
        net.eval()(x), build_net(cfg, tiny_backbone, init=net.state_dict()).eval()(x)
    )
    with pytest.raises(ConfigError, match="pretrained last block"):
        build_net(cfg)
    with pytest.raises(ConfigError, match="pretrained last block"):
        build_net(cfg, init={k: v for k, v in init.items() if k != "norm.bias"})
    with pytest.raises(ConfigError, match="lacks"):
        build_net(cfg, init={**init, "extra.weight": torch.zeros(1)})


def test_device_clock_scales_by_compute_and_link():
    # Prepare
    rpi4 = load_profile("rpi4")
    cal = calibrate_host(_net(), SHAPE, 3, batch=8, micro_batch=4, repeats=1)
    clock = DeviceClock(rpi4, host_gflops=2 * rpi4.gflops)
    # Execute
    dev = clock.add_compute(1.5)
    link = clock.add_download(5_000_000, requests=2)
    # Assert
    assert cal.step_flops > 0 and cal.gflops > 0
    assert dev == pytest.approx(3.0)
    assert link == pytest.approx(2 * rpi4.latency_ms / 1e3 + 40e6 / (rpi4.downlink_mbps * 1e6))
    assert clock.total_device_s == pytest.approx(dev + link)


def test_lean_adamw_matches_torch_adamw():
    # Prepare
    from mist_fed.device.optim import LeanAdamW

    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(
        [{"params": [a.weight], "weight_decay": 0.05}, {"params": [a.bias], "weight_decay": 0.0}],
        lr=3e-3,
    )
    lean = LeanAdamW([([b.weight], 0.05), ([b.bias], 0.0)], lr=3e-3)
    # Execute
    for i in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        for net, opt in ((a, ref), (b, lean)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    # Assert
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)
