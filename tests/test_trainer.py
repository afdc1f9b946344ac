"""The edge trainer, checkpoints and the device clock, on random features and tiny LAEs."""

import pytest
import torch

from mist_fed.core.edge_nets import LAE
from mist_fed.core.methods import build_edge_net
from mist_fed.core.specs import Geometry
from mist_fed.device.checkpoint import EdgeModelConfig, build_net, load_checkpoint, save_checkpoint
from mist_fed.device.clock import DeviceClock
from mist_fed.device.profiles import load_profile
from mist_fed.device.trainer import TrainConfig, evaluate, fit
from mist_fed.errors import ConfigError
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


def test_extra_loss_joins_every_step():
    # Prepare: a strong proximal term to the starting weights, as FedProx's to the global ones
    data = _data()
    plain, prox = _net(), _net()
    start = [p.detach().clone() for p in prox.parameters()]
    cfg = TrainConfig(epochs=3, lr=1e-2, micro_batch=0)
    calls = []

    def pull(net):
        calls.append(1)
        return 1e3 * sum(
            (p - p0).pow(2).sum() for p, p0 in zip(net.parameters(), start, strict=True)
        )

    def moved(net):
        return sum(
            float((p.detach() - p0).norm()) for p, p0 in zip(net.parameters(), start, strict=True)
        )

    # Execute
    plain_fit = fit(plain, data, cfg)
    fit(prox, data, cfg, extra_loss=pull)
    # Assert: added once per optimizer step, and it held the weights near where they began
    assert len(calls) == plain_fit.steps
    assert moved(prox) < 0.5 * moved(plain)


def test_train_config_validates_and_reads_kebab_case():
    assert TrainConfig.from_dict({"batch-size": 8, "epochs": 2}).batch_size == 8
    assert TrainConfig.for_method("linear").lr > TrainConfig.for_method("mist").lr
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def _geometry(**kw):
    return Geometry(
        **{
            "backbone": "tiny",
            "weights": "random:tiny",
            "num_blocks": 3,
            "embed_dim": SHAPE[1],
            "num_tokens": SHAPE[0],
            **kw,
        }
    )


def test_checkpoint_round_trip(tmp_path):
    # Prepare
    cfg = EdgeModelConfig(
        method="mist",
        num_classes=3,
        geometry=_geometry(),
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


def test_partial1_block_in_plain_torch_equals_timms(tiny_backbone):
    # Prepare: the cloud's last block and final norm, as edge_init serves them
    init = tiny_backbone.edge_init_state("partial1")
    geometry = tiny_backbone.geometry
    x = torch.randn(2, geometry.num_tokens, geometry.embed_dim)
    # Execute: the edge rebuilds the block from the weights alone (no timm on the device)
    net = build_edge_net("partial1", geometry, 3, init).eval()
    # Assert
    want = tiny_backbone.model.norm(tiny_backbone.model.blocks[-1](x))
    got = net.norm(net.block(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="pretrained weights"):
        build_edge_net("partial1", geometry, 3)
    with pytest.raises(ConfigError, match="final norm"):
        build_edge_net("partial1", geometry, 3, {k: v for k, v in init.items() if k[:5] != "norm."})


def test_partial1_checkpoint_round_trips_without_a_backbone(tiny_backbone, tmp_path):
    # Prepare
    init = tiny_backbone.edge_init_state("partial1")
    cfg = EdgeModelConfig(method="partial1", num_classes=3, geometry=tiny_backbone.geometry)
    net = build_net(cfg, init=init)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, tiny_backbone.num_tokens, tiny_backbone.embed_dim, generator=g)
    data = FeatureSet([f"r{i}" for i in range(8)], torch.arange(8) % 3, x)
    fit(net, data, TrainConfig(epochs=1, batch_size=8, micro_batch=0))
    # Execute
    save_checkpoint(net, cfg, tmp_path)
    again, cfg2 = load_checkpoint(tmp_path)
    # Assert
    assert cfg2.geometry == tiny_backbone.geometry
    torch.testing.assert_close(net.eval()(x), again(x))
    with pytest.raises(ConfigError, match="lacks"):
        build_net(cfg, init={**init, "extra.weight": torch.zeros(1)})


def test_device_clock_charges_flops_and_link_not_host_speed():
    # Prepare
    rpi4 = load_profile("rpi4")
    clock = DeviceClock(rpi4)
    # Execute: the same work, done slowly and quickly on the host
    slow = clock.add_compute(9.0, flops=int(6e9))
    fast = clock.add_compute(0.5, flops=int(6e9))
    link = clock.add_download(5_000_000, requests=2)
    # Assert
    assert slow == fast == pytest.approx(6.0 / rpi4.gflops)
    assert clock.host_gflops == pytest.approx(12e9 / 9.5 / 1e9)
    assert link == pytest.approx(2 * rpi4.latency_ms / 1e3 + 40e6 / (rpi4.downlink_mbps * 1e6))
    assert clock.total_device_s == pytest.approx(slow + fast + link)


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
