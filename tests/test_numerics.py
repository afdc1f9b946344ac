"""The backbone's numerics and runtime: fidelity against float32, and features kept apart."""

import pytest
import torch

from mist_fed.cloud import numerics as nm
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.gather import GatherSpec, candidate_ks, gather_many
from mist_fed.cloud.runner import running_cloud
from mist_fed.cloud.server import FeatureServer
from mist_fed.errors import ConfigError, WireError
from mist_fed.wire.flight import FeatureClient

TASK = "synthetic"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).norm(dim=1).max() / b.flatten(1).norm(dim=1).min())


def _maps(backbone, numerics, runtime, x):
    specs = [GatherSpec("mist", k) for k in candidate_ks(backbone.num_blocks)]
    specs.append(GatherSpec("final"))
    return gather_many(backbone.configured(numerics, runtime), x, specs)


def test_bfloat16_gather_maps_within_tolerance_of_float32(tiny_backbone):
    # Prepare
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # Execute
    ref = _maps(tiny_backbone, "float32", "torch", x)
    bf16 = _maps(tiny_backbone, "bfloat16", "torch", x)
    # Assert: every map within 2% (relative L2 per image), and bfloat16 did change them
    for spec, want in ref.items():
        got = bf16[spec]
        assert got.dtype == torch.float32 and got.shape == want.shape
        err = _rel(got, want)
        assert 0 < err < 0.02, (spec, err)


def test_openvino_float32_matches_torch(tiny_backbone):
    # Prepare
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # Execute
    ref = _maps(tiny_backbone, "float32", "torch", x)
    ov = _maps(tiny_backbone, "float32", "openvino", x)
    ov_small = _maps(tiny_backbone, "float32", "openvino", x[:2])  # another batch size
    # Assert: float32 rounding only
    for spec, want in ref.items():
        assert _rel(ov[spec], want) < 1e-4, spec
        assert _rel(ov_small[spec], want[:2]) < 1e-4, spec


def _runtime_precisions(compiled) -> dict[str, set[str]]:
    ran: dict[str, set[str]] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        ran.setdefault(info["layerType"].astype(str), set()).add(
            info["runtimePrecision"].astype(str)
        )
    return ran


def test_openvino_reduced_precision_keeps_patch_embedding_and_norms_float32(tiny_backbone):
    from mist_fed.cloud.engine import openvino_trunk

    # Execute: the bfloat16 graph of the tiny ViT (float32 where the CPU lacks bfloat16)
    trunk = openvino_trunk(tiny_backbone, "bfloat16", tiny_backbone.num_blocks)
    ran = _runtime_precisions(trunk.compiled)
    # Assert: its convolution and layer norms ran float32; on a CPU with bfloat16 the matrix
    # multiplies did not
    assert ran["Convolution"] == {"f32"} and ran["MVN"] == {"f32"}, ran
    if nm.cpu_has_bf16():
        assert "bf16" in ran["FullyConnected"], ran


def test_keep_float32_marks_exactly_the_named_layers(tmp_path):
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    from mist_fed.cloud.engine import keep_float32

    # Prepare: x -> layer norm (MVN) -> matmul -> out
    x = ops.parameter([2, 8], np.float32, name="x")
    norm = ops.mvn(x, ops.constant(np.array([1], np.int64)), True, 1e-6, "inside_sqrt")
    out = ops.matmul(norm, ops.constant(np.ones((8, 4), np.float32)), False, False)
    model = ov.Model([out], [x])
    # Execute
    marked = keep_float32(ov.Core(), model, tmp_path / "m.xml", ("MVN",))
    # Assert: the MVN carries the attribute after the IR round trip, the matmul does not
    keys = {op.get_type_name(): set(op.get_rt_info().keys()) for op in marked.get_ops()}
    assert any("DisablePrecisionConversion" in k for k in keys["MVN"]), keys
    assert not any("DisablePrecisionConversion" in k for k in keys["MatMul"]), keys


def test_features_id_names_numerics_and_runtime_and_keeps_float32_ids():
    assert nm.features_id("file:abc", "float32") == "file:abc"
    assert nm.features_id("file:abc", "float32", "openvino") == "file:abc"
    assert nm.features_id("file:abc", "bfloat16") == "file:abc@bfloat16-torch"
    assert nm.features_id("file:abc", "bfloat16", "openvino") == "file:abc@bfloat16-openvino"
    assert nm.features_id("file:abc", "float16") != nm.features_id("file:abc", "bfloat16")
    with pytest.raises(ConfigError):
        nm.features_id("file:abc", "auto")


def test_auto_numerics_follow_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert nm.resolve_numerics("auto", cuda)[0] == "float16"
    monkeypatch.setattr(nm, "cpu_has_bf16", lambda: True)
    assert nm.resolve_numerics("auto", cpu)[0] == "bfloat16"
    monkeypatch.setattr(nm, "cpu_has_bf16", lambda: False)
    assert nm.resolve_numerics("auto", cpu)[0] == "float32"
    assert nm.resolve_numerics("bfloat16", cpu)[0] == "bfloat16"  # forced
    assert nm.resolve_runtime("auto", cuda)[0] == "torch"
    assert nm.resolve_runtime("auto", cpu, "float32")[0] == "openvino"
    assert nm.resolve_runtime("auto", cpu, "bfloat16")[0] == "torch"  # emulated: autocast
    monkeypatch.setattr(nm, "cpu_has_bf16", lambda: True)
    assert nm.resolve_runtime("auto", cpu, "bfloat16")[0] == "openvino"
    with pytest.raises(ConfigError, match="CPU"):
        nm.resolve_runtime("openvino", cuda)
    with pytest.raises(ConfigError, match="numerics"):
        ServeConfig(numerics="int8")


def test_cpu_flags_are_read(tmp_path):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 vaes\n")
    without = tmp_path / "b"
    without.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert nm.cpu_has_bf16(str(with_bf16)) is True
    assert nm.cpu_has_bf16(str(without)) is False
    assert nm.cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.network
def test_store_keys_and_streams_differ_by_numerics(tiny_backbone, tmp_path):
    # Prepare: two clouds on one store directory, float32 and bfloat16
    def config(numerics):
        return ServeConfig(
            port=0,
            random_init=True,
            cache_dir=str(tmp_path / "store"),
            rows_per_batch=8,
            numerics=numerics,
            runtime="torch",
        )

    f32 = FeatureServer(config("float32"), backbone=tiny_backbone)
    bf16 = FeatureServer(config("bfloat16"), backbone=tiny_backbone)
    try:
        # Assert: separate store partitions, and the identity the wire carries differs
        assert f32.service.store.root != bf16.service.store.root
        assert f32.service.backbone.weights_id == tiny_backbone.weights_id  # float32: the bare id
        assert bf16.service.backbone.weights_id.endswith("@bfloat16-torch")
        assert bf16.service.stats()["numerics"] == "bfloat16"
    finally:
        f32.shutdown()
        bf16.shutdown()
    # Execute: stream from each; a client pinned to float32 refuses bfloat16 features
    with running_cloud(config("float32"), backbone=tiny_backbone) as loc, FeatureClient(loc) as c:
        a = c.get(TASK, "val", "mist", 2, "float32")
        stored_f32 = c.stats()["images_embedded"]
    with running_cloud(config("bfloat16"), backbone=tiny_backbone) as loc:
        with FeatureClient(loc) as c:
            b = c.get(TASK, "val", "mist", 2, "float32")
            stats = c.stats()
        pinned = FeatureClient(loc, expect_weights=a.meta["weights"])
        with pinned, pytest.raises(WireError, match="weights"):
            pinned.get(TASK, "val", "mist", 2, "float32")
    # the bfloat16 cloud embedded its own rows (no float32 row served), close to float32's
    assert stored_f32 > 0 and stats["images_embedded"] == stored_f32
    assert a.meta["weights"] != b.meta["weights"]
    assert 0 < _rel(b.features, a.features) < 0.02


@pytest.mark.network
def test_bench_numerics_reports_ratio_fidelity_and_peak_fraction():
    from mist_fed.assets.defaults import DEFAULT_HOST
    from mist_fed.cloud.bench_numerics import NumericsBenchConfig, bench_numerics, format_numerics
    from tests.conftest import TINY_VIT

    # Prepare
    cfg = NumericsBenchConfig(
        backbone="vit_tiny_patch16_224",
        random_init=True,
        model_kwargs=dict(TINY_VIT),
        task="synthetic:classes=2,train=4,val=4,test=12,size=16",
        images=12,
        reps=1,
        fidelity_images=4,
        numerics=("float32", "bfloat16"),
        runtime="torch",
        batch_size=4,
        peak_n=128,
    )
    # Execute
    r = bench_numerics(cfg, DEFAULT_HOST)
    lines = format_numerics(r, cfg.reps)
    # Assert
    f32, bf16 = r["configs"]
    assert r["timm_float32_images_per_s"] > 0 and r["gflop_per_image"] > 0
    assert f32["ratio_best"] > 0 and f32["peak_fraction"] > 0
    assert set(f32["fidelity"]) == {"mist1", "mist2", "mist3", "final"}
    assert max(v["max"] for v in f32["fidelity"].values()) < 1e-6  # float32 torch: itself
    assert 0 < max(v["max"] for v in bf16["fidelity"].values()) < 0.02
    assert bf16["peak_numerics"] == "bfloat16"
    assert any("ratio" in line for line in lines) and any("fidelity" in line for line in lines)
