"""`mist-fed bench edge`: peak memory of the EdgeDevice path itself, each case in a fresh process.

Every case runs in its own subprocess (``python -m mist_fed.device.bench CASE``) that first
imports torch, resets the kernel's peak-RSS mark, records that baseline, then runs the case and
reports ``VmHWM - baseline``: the rise above a process that has only imported torch. Inputs are
ViT-B/16-shaped Gather* maps ``[197, 768]`` in a device cache file the parent writes first; the
LAE is the paper's (M=4, ~0.39M params).

Cases: ``imports`` (what the client imports), ``train`` (the client's path: an
:class:`~mist_fed.device.edge.EdgeDevice` finds the split in its cache, streams it batch by
batch into the trainer: fp16 on the wire, micro-batches of 8, LeanAdamW, the memory meter on),
``infer`` (what ``client predict`` does for one image: load the saved model, run it on an
:class:`~mist_fed.device.edge.EdgeDevice` (meter, clock) that decodes the
cloud's one-row reply, classify), and ``train-naive`` for reference
(the plain PyTorch loop: fp32 features held in memory, whole batch of 32 in one
forward/backward, ``torch.optim.AdamW``). The paper's Raspberry Pi 4 totals are 663 MB
(training) and 255 MB (inference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mist_fed.errors import MistError

PAPER_RPI4_MB = {"train": 663.0, "infer": 255.0, "imports": 0.0}
TARGET_RISE_MB = {"imports": 60.0, "train": 250.0, "infer": 80.0}
CASES = ("imports", "train", "infer", "train-naive")
TASK, BACKBONE = "bench", "bench-vit"


def _geometry(tokens: int, dim: int) -> Any:
    from mist_fed.core.specs import Geometry

    return Geometry(BACKBONE, "random:bench", 12, dim, tokens, num_heads=12)


class _CachedOnly:
    """A source for a device whose features are all in its cache: it may not fetch. Asked to
    embed an image, it answers with the cloud's one-row reply saved in ``storage``."""

    def __init__(self, tokens: int, dim: int, storage: str | Path = "") -> None:
        self.g = _geometry(tokens, dim)
        self.storage = Path(storage)
        self.bytes_received = 0

    def geometry(self) -> Any:
        return self.g

    def stream(self, *a: Any, **kw: Any) -> Any:
        raise MistError("bench device asked the cloud for features its cache should hold")

    edge_init = stream

    def embed(self, *a: Any, **kw: Any) -> Any:
        import pyarrow as pa

        from mist_fed.wire.codec import decode

        with pa.OSFile(str(self.storage / "one.arrows"), "rb") as f:
            return decode(pa.ipc.open_stream(f).read_all())


def prepare(storage: Path, tokens: int, dim: int, rows: int, classes: int) -> None:
    """Write ``rows`` random fp16 Gather* maps into the bench device's cache, 64 per batch."""
    import numpy as np

    from mist_fed.core.specs import GatherSpec
    from mist_fed.device.cache import CacheKey, FeatureCache
    from mist_fed.wire.codec import WireMeta, encode, feature_schema

    g = _geometry(tokens, dim)
    meta = WireMeta(g.backbone, g.weights, "mist", 12, "float16", (tokens, dim))
    rng = np.random.default_rng(0)

    def batches() -> Any:
        for start in range(0, rows, 64):
            n = min(64, rows - start)
            x = rng.normal(size=(n, tokens, dim)).astype(np.float32)
            yield encode(
                meta,
                [str(start + i) for i in range(n)],
                [(start + i) % classes for i in range(n)],
                x,
            )

    spec = GatherSpec("mist", 12)
    key = CacheKey(g.backbone, g.weights, TASK, "train", spec.kind, spec.k, "float16")
    FeatureCache(storage / "features").store(key, feature_schema(meta), batches())
    # what `client predict` has for one image: a saved model and the cloud's one-row reply
    import pyarrow as pa
    import torch

    from mist_fed.core.methods import build_edge_net
    from mist_fed.device.checkpoint import EdgeModelConfig, save_checkpoint

    torch.manual_seed(0)
    mcfg = EdgeModelConfig("mist", classes, g, k=12, dtype="float16")
    save_checkpoint(build_edge_net("mist", g, classes), mcfg, storage / "model")
    one = encode(meta, ["photo"], [None], rng.normal(size=(1, tokens, dim)).astype(np.float32))
    with pa.OSFile(str(storage / "one.arrows"), "wb") as f, pa.ipc.new_stream(f, one.schema) as w:
        w.write_batch(one)


def _child(
    case: str, storage: str, tokens: int, dim: int, batch: int, classes: int, steps: int
) -> dict:
    import torch  # the baseline: a process that has only imported torch

    from mist_fed.device.memory import peak_rss_mb, reset_peak_rss, rss_mb

    reset_peak_rss()
    base = rss_mb()
    t0 = time.perf_counter()
    if case == "train-naive":  # the plain PyTorch loop, for reference
        from mist_fed.core.edge_nets import LAE

        torch.set_num_threads(1)
        torch.manual_seed(0)
        naive = LAE(dim=dim, tokens=tokens, num_classes=classes)
        x = torch.randn(batch, tokens, dim)
        y = torch.arange(batch) % classes
        opt = torch.optim.AdamW(naive.parameters(), lr=2e-3, weight_decay=0.05)
        naive.train()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(naive(x), y).backward()
            opt.step()
    else:
        from mist_fed.device import client  # noqa: F401  (the client's imports: counted)
        from mist_fed.device.edge import EdgeDevice
        from mist_fed.device.profiles import load_profile
        from mist_fed.device.trainer import TrainConfig

        if case == "train":
            with EdgeDevice(load_profile("rpi4"), _CachedOnly(tokens, dim), storage) as dev:
                data = dev.features(TASK, "train", "mist", 12, "float16")
                net = dev.new_net("mist", classes, 12)
                dev.train(net, data, TrainConfig(epochs=1, batch_size=batch, micro_batch=8))
        elif case == "infer":  # `client predict`: the saved model on one image, on the device
            from mist_fed.device.checkpoint import load_checkpoint

            net, m = load_checkpoint(Path(storage) / "model")
            src = _CachedOnly(tokens, dim, storage)
            with EdgeDevice(load_profile("rpi4"), src, storage) as dev:
                for _ in range(steps):
                    dev.predict(net, m.method, m.k, m.dtype, [("photo", b"")], m.basis)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "case": case,
        "baseline_mb": base,
        "peak_mb": peak,
        "rise_mb": peak - base,
        "seconds": seconds,
        "steps": steps,
    }


def measure(
    case: str,
    storage: Path,
    tokens: int = 197,
    dim: int = 768,
    batch: int = 32,
    classes: int = 100,
    steps: int = 3,
) -> dict[str, Any]:
    """Run one case in a fresh interpreter; returns its JSON record."""
    cmd = [sys.executable, "-m", "mist_fed.device.bench", case, str(storage)]
    cmd += [str(v) for v in (tokens, dim, batch, classes, steps)]
    root = str(Path(__file__).resolve().parents[2])  # this checkout, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    if proc.returncode != 0:
        raise MistError(f"bench case {case} failed: {proc.stderr.strip()[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_edge(
    tokens: int = 197,
    dim: int = 768,
    batch: int = 32,
    classes: int = 100,
    steps: int = 3,
    rows: int = 256,
) -> dict[str, Any]:
    """Every case, each in a fresh process, with targets and the paper's Pi 4 totals."""
    out: dict[str, Any] = {"shape": [tokens, dim], "batch": batch, "classes": classes, "rows": rows}
    with tempfile.TemporaryDirectory(prefix="mist-bench-edge-") as tmp:
        storage = Path(tmp)
        prepare(storage, tokens, dim, rows, classes)
        for case in CASES:
            n = 20 if case == "infer" else steps
            out[case] = measure(case, storage, tokens, dim, batch, classes, n)
    out["train_vs_naive"] = out["train"]["rise_mb"] / max(out["train-naive"]["rise_mb"], 1e-9)
    for case in ("imports", "train", "infer"):
        out[f"{case}_vs_target"] = out[case]["rise_mb"] / TARGET_RISE_MB[case]
    out["paper_rpi4_mb"] = PAPER_RPI4_MB
    out["target_rise_mb"] = TARGET_RISE_MB
    return out


def report_lines(r: dict[str, Any]) -> list[str]:
    b = r["train"]["baseline_mb"]
    lines = [
        f"EdgeDevice path, LAE (M=4) on {r['shape'][0]}x{r['shape'][1]} fp16 features "
        f"({r['rows']} cached rows), batch {r['batch']}; rise of peak RSS above a torch-only "
        f"process ({b:.0f} MB here), fresh process per case",
        f"{'case':<13}{'rise':>10}{'total':>10}{'target rise':>13}{'ratio':>8}{'paper Pi 4 total':>18}",
    ]
    for case in ("imports", "train", "infer", "train-naive"):
        c = r[case]
        target = TARGET_RISE_MB.get(case)
        tgt = f"{target:.0f} MB" if target else "-"
        ratio = f"{c['rise_mb'] / target:.2f}" if target else "-"
        paper = PAPER_RPI4_MB.get(case.removesuffix("-naive"), 0.0)
        lines.append(
            f"{case:<13}{c['rise_mb']:>7.0f} MB{c['peak_mb']:>7.0f} MB{tgt:>13}{ratio:>8}"
            f"{(f'{paper:.0f} MB' if paper else '-'):>18}"
        )
    lines.append(
        f"training rise vs the naive fp32 loop: {r['train_vs_naive']:.2f}x; imports/target "
        f"{r['imports_vs_target']:.2f}, train/target {r['train_vs_target']:.2f}, infer/target "
        f"{r['infer_vs_target']:.2f} (<= 1 meets the target)"
    )
    return lines


if __name__ == "__main__":
    case, where, *nums = sys.argv[1:]
    if case not in CASES:
        raise SystemExit(f"unknown case {case!r}; choose one of {', '.join(CASES)}")
    print(json.dumps(_child(case, where, *map(int, nums))))
