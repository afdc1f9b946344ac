"""The OpenVINO runtime of the frozen backbone: ``z_0 .. z_depth`` from a compiled graph.

The backbone's trunk (token embedding and the first ``depth`` blocks, every block output an
output of the graph) is exported once to ONNX with torch's TorchScript-based exporter, read
by OpenVINO from a temporary file (``Core.read_model``; OpenVINO's model converter is not used, so its
telemetry never runs) and compiled for this CPU with the numerics' inference precision and
torch's thread count. The batch dimension is dynamic, so one compiled graph serves every
batch size. Graphs are kept per (backbone module, numerics, depth, threads) for the life of
the module: servers sharing a backbone compile once.

In reduced precision the patch embedding (a convolution) and the layer norms stay float32:
the graph is written once as OpenVINO IR, and those layers get the IR's
``DisablePrecisionConversion`` attribute (the one OpenVINO's own passes set to keep a node
out of f16 compression; the CPU plugin then keeps the node's float32 for bfloat16 too), and the
IR is read back. Measured on DINOv2-S/14, 16 Fashion-MNIST images, bfloat16 on an AVX-512 BF16
EPYC, worst relative error of a Gather* map from float32 torch: 1.13% -> 0.53% at k = 4,
1.51% -> 1.28% at k = 12, final class token 1.53% -> 1.23%, for at most 2% of the trunk's
images/s (0.98-0.99x median, interleaved; docs/results/bench-cloud-avx512bf16). The rest of the
error is the bfloat16 matrix multiplies themselves (torch autocast: 2.07% at k = 12).

Measured on a 2-core AVX2 EPYC shared with other work (DINOv2-S/14 at 224, float32): 1.3-2.1x
the images/s of torch eager at batch 8, less at 32; relative error of Gather* against torch
2e-7 (``mist-fed bench cloud``; docs/results/bench-cloud-numerics).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import warnings
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mist_fed.errors import BackboneError

log = logging.getLogger(__name__)

_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
KEEP_FLOAT32 = ("Convolution", "MVN")  # IR layer types kept float32 in reduced precision
# the IR attribute OpenVINO's passes use to keep a node out of low precision ("from any type
# to f16"); the CPU plugin keeps such a node's own precision under bfloat16 inference as well
_KEEP = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int, int], OpenVINOTrunk]] = (
    weakref.WeakKeyDictionary()
)
_GRAPHS_LOCK = threading.Lock()


class _Trunk(nn.Module):
    """``x -> (z_0, ..., z_depth)`` of a backbone (what the ONNX graph computes)."""

    def __init__(self, backbone: Any, depth: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.depth = depth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.backbone.embed(x)
        zs = [z]
        for blk in list(self.backbone.model.blocks)[: self.depth]:
            z = blk(z)
            zs.append(z)
        return tuple(zs)


class OpenVINOTrunk:
    """One compiled graph: ``__call__(images) -> [z_0, ..., z_depth]`` as float32 tensors."""

    def __init__(self, backbone: Any, numerics: str, depth: int, threads: int) -> None:
        import openvino as ov

        size = backbone.img_size
        example = torch.zeros(2, 3, size, size)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
            path = Path(tmp) / "trunk.onnx"
            warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
            try:
                torch.onnx.export(
                    _Trunk(backbone, depth).eval(),
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=["images"],
                    dynamic_axes={"images": {0: "batch"}},
                    opset_version=17,
                )
            except Exception as e:  # the exporter raises many kinds
                raise BackboneError(
                    f"backbone {backbone.name} does not export to ONNX for OpenVINO "
                    f"({type(e).__name__}: {e}); use --runtime torch"
                ) from e
            core = ov.Core()
            model = core.read_model(str(path))
            if numerics != "float32":
                model = keep_float32(core, model, Path(tmp) / "trunk.xml", KEEP_FLOAT32)
            self.compiled = core.compile_model(
                model,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": _PRECISION[numerics],
                    "INFERENCE_NUM_THREADS": threads,
                    # pinned threads stall when other processes share the cores (measured:
                    # 1.9 vs 2.6 images/s at batch 8 on a loaded 2-core host)
                    "ENABLE_CPU_PINNING": False,
                },
            )
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if ran != _PRECISION[numerics]:
            log.warning(
                "OpenVINO runs %s here, not the %s asked for (this CPU lacks it): the features "
                "are float32's, stored as %s; use --runtime torch for emulated %s",
                ran,
                numerics,
                numerics,
                numerics,
            )
        self.request = self.compiled.create_infer_request()
        self.depth = depth
        self._lock = threading.Lock()  # one infer request: one batch at a time

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.detach().to(torch.float32).contiguous().numpy()
        with self._lock:
            out = self.request.infer({0: x}, share_inputs=True)  # outputs are copies
            return [torch.from_numpy(out[o]) for o in self.compiled.outputs]


def keep_float32(core: Any, model: Any, xml: Path, types: tuple[str, ...]) -> Any:
    """``model`` with every layer of ``types`` marked to keep float32, through IR at ``xml``.

    OpenVINO's Python API cannot set a typed runtime attribute on a node; its IR reader can, so
    the model is saved as IR, the attribute added to those layers' ``rt_info`` and read back.
    """
    import openvino as ov

    ov.save_model(model, str(xml), compress_to_fp16=False)
    tree = ET.parse(xml)
    for layer in tree.getroot().iter("layer"):
        if layer.get("type") in types:
            rt_info = layer.find("rt_info")
            if rt_info is None:
                rt_info = ET.SubElement(layer, "rt_info")
            ET.SubElement(rt_info, "attribute", _KEEP)
    tree.write(xml)
    return core.read_model(str(xml))


def openvino_trunk(backbone: Any, numerics: str, depth: int) -> OpenVINOTrunk:
    """The compiled trunk of ``backbone`` up to ``depth`` (compiled on first use, then kept)."""
    threads = torch.get_num_threads()
    key = (numerics, depth, threads)
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.setdefault(backbone.model, {})
        trunk = graphs.get(key)
        if trunk is None:
            trunk = graphs[key] = OpenVINOTrunk(backbone, numerics, depth, threads)
        return trunk
