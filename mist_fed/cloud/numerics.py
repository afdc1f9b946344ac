"""The backbone's numerics and runtime: chosen per device kind, named in the features' identity.

*Numerics* is the precision the backbone's matrix multiplies run in: ``float32``, ``bfloat16``
or ``float16`` (torch autocast, or OpenVINO's inference precision hint; the residual stream,
norms and the Gather* sums stay float32 under autocast). ``auto`` resolves per device kind:

* CUDA: ``float16``;
* a CPU with native bfloat16 (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``):
  ``bfloat16``;
* any other CPU: ``float32`` (without those instructions bfloat16 is emulated and runs several
  times slower than float32: measured 0.41 vs 2.65 images/s for DINOv2-S/14 on an AVX2 EPYC).

Features computed in other numerics differ (about 1% relative error for bfloat16), so they
never share a store partition, a device cache or a projection basis: :func:`features_id`
appends the numerics and the runtime to the backbone's weights id (float32 keeps the bare id,
so stores and caches filled before numerics existed stay valid).

*Runtime* is what runs the forward: ``torch`` (eager) or ``openvino`` (the backbone exported
once to ONNX and compiled for this CPU; see :mod:`mist_fed.cloud.engine`). ``auto``: OpenVINO
on a CPU for float32 (and bfloat16 where the CPU has it), torch otherwise (CUDA; emulated
bfloat16, which OpenVINO would silently run in float32). In float32 the runtime does not
change the features beyond float32 rounding (relative error 2e-7 measured), so a float32 id
leaves it out; in reduced precision the runtimes round different ops (DINOv2-S/14 Gather* at
k = 12 on 16 Fashion-MNIST images, worst relative error from float32: torch autocast 2.1%,
OpenVINO 1.3%), so the id names it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from mist_fed.errors import ConfigError, one_of

if TYPE_CHECKING:  # torch is imported where it runs: the CLI's parsers import this module
    import torch

NUMERICS = ("float32", "bfloat16", "float16")
NUMERICS_CHOICES = (*NUMERICS, "auto")
RUNTIMES = ("torch", "openvino")
RUNTIME_CHOICES = (*RUNTIMES, "auto")
NUMERICS_HELP = (
    "the backbone's numerics: float32, bfloat16, float16 or auto (float16 on CUDA, bfloat16 "
    "on a CPU with native bfloat16, else float32); features of other numerics are stored apart"
)
RUNTIME_HELP = (
    "what runs the backbone: torch, openvino or auto (openvino on a CPU for the numerics it "
    "runs there, else torch)"
)

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux: its flags; elsewhere False)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(flag in line.split() for flag in _BF16_FLAGS)
    return False


def check_numerics(value: str, field: str = "numerics") -> str:
    return one_of(field, value, NUMERICS_CHOICES)


def check_runtime(value: str, field: str = "runtime") -> str:
    return one_of(field, value, RUNTIME_CHOICES)


def resolve_numerics(requested: str, device: torch.device) -> tuple[str, str]:
    """``(numerics, why)`` for ``requested`` (``auto`` or a name) on ``device``."""
    check_numerics(requested)
    if requested != "auto":
        return requested, "asked for"
    if device.type == "cuda":
        return "float16", "auto: float16 on CUDA"
    if cpu_has_bf16():
        return "bfloat16", "auto: this CPU multiplies bfloat16 natively"
    return "float32", "auto: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16)"


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(
    requested: str, device: torch.device, numerics: str = "float32"
) -> tuple[str, str]:
    """``(runtime, why)`` for ``requested`` on ``device``; OpenVINO runs on CPUs only.

    ``auto`` picks OpenVINO for the numerics it runs on this CPU (float32; bfloat16 where the
    CPU has it): OpenVINO would run float32 for a precision the CPU lacks, so emulated
    bfloat16 or float16 stays with torch's autocast.
    """
    check_runtime(requested)
    if requested == "openvino":
        if device.type != "cpu":
            raise ConfigError(
                f"runtime openvino runs the backbone on the CPU, not {device}; "
                "use --runtime torch (or auto) with a CUDA device"
            )
        if not openvino_available():
            raise ConfigError(
                "runtime openvino asked for, but the openvino package is not installed; "
                "run `make install` (or pip install openvino), or use --runtime torch"
            )
        return "openvino", "asked for"
    if requested == "torch":
        return "torch", "asked for"
    if device.type != "cpu" or not openvino_available():
        return "torch", f"auto: torch on {device.type}"
    if numerics == "float32" or (numerics == "bfloat16" and cpu_has_bf16()):
        return "openvino", "auto: OpenVINO on a CPU"
    return "torch", f"auto: torch, as OpenVINO would not run {numerics} on this CPU"


def features_id(weights_id: str, numerics: str, runtime: str = "torch") -> str:
    """The identity of features: the weights, and the numerics and runtime unless float32."""
    one_of("numerics", numerics, NUMERICS)
    one_of("runtime", runtime, RUNTIMES)
    return weights_id if numerics == "float32" else f"{weights_id}@{numerics}-{runtime}"


def autocast_dtype(numerics: str) -> torch.dtype | None:
    """The autocast dtype of ``numerics`` (None: float32, no autocast)."""
    import torch

    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[numerics]
