"""`mist-fed bench edge`: peak memory of LAE training and inference, each in a fresh process.

Every case runs in its own subprocess (``python -m mist_fed.device.bench CASE``) that first
imports torch, resets the kernel's peak-RSS mark, records that baseline, then runs the case and
reports ``VmHWM - baseline``: the rise above a process that has only imported torch. Inputs are
ViT-B/16-shaped Gather* maps ``[197, 768]``, the LAE is the paper's (M=4, ~0.39M params).

Cases: ``train-naive`` (the plain PyTorch loop: fp32 features, whole batch of 32 in one
forward/backward, ``torch.optim.AdamW``, default allocator), ``train`` (the client's set-up: fp16-resident features, micro-batches of 8 with
gradient accumulation, :class:`~mist_fed.device.optim.LeanAdamW` (torch's update without the
~155 MB its import costs), :func:`~mist_fed.device.memory.tune_allocator`; same loss and update),
``infer`` (one image, ``inference_mode``). The paper's Raspberry Pi 4
totals are 663 MB (training) and 255 MB (inference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mist_fed.errors import MistError

PAPER_RPI4_MB = {"train": 663.0, "infer": 255.0}
TARGET_RISE_MB = {"train": 250.0, "infer": 40.0}
NAIVE_RISE_MB = 650.0  # the brief's figure for a naive fp32 step
CASES = ("train-naive", "train", "infer")


def _child(case: str, tokens: int, dim: int, batch: int, classes: int, steps: int) -> dict:
    import torch  # the baseline: a process that has only imported torch

    from mist_fed.device.memory import peak_rss_mb, reset_peak_rss, rss_mb, tune_allocator

    torch.set_num_threads(1)
    if case != "train-naive":
        tune_allocator()
    reset_peak_rss()
    base = rss_mb()
    from mist_fed.device.trainer import TrainConfig, fit
    from mist_fed.model.lae import LAE
    from mist_fed.wire.features import FeatureSet

    torch.manual_seed(0)
    net = LAE(dim=dim, tokens=tokens, num_classes=classes)
    t0 = time.perf_counter()
    if case == "infer":
        x = torch.randn(1, tokens, dim)
        with torch.inference_mode():
            for _ in range(steps):
                net.eval()(x)
    elif case == "train-naive":  # the plain PyTorch loop
        x = torch.randn(batch, tokens, dim)
        y = torch.arange(batch) % classes
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
        net.train()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    else:
        feats = torch.randn(batch, tokens, dim, dtype=torch.float16)
        data = FeatureSet([str(i) for i in range(batch)], torch.arange(batch) % classes, feats)
        fit(net, data, TrainConfig(epochs=steps, batch_size=batch))
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
    tokens: int = 197,
    dim: int = 768,
    batch: int = 32,
    classes: int = 100,
    steps: int = 3,
) -> dict[str, Any]:
    """Run one case in a fresh interpreter; returns its JSON record."""
    cmd = [sys.executable, "-m", "mist_fed.device.bench", case]
    cmd += [str(v) for v in (tokens, dim, batch, classes, steps)]
    root = str(Path(__file__).resolve().parents[2])  # this checkout, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    if proc.returncode != 0:
        raise MistError(f"bench case {case} failed: {proc.stderr.strip()[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_edge(
    tokens: int = 197, dim: int = 768, batch: int = 32, classes: int = 100, steps: int = 3
) -> dict[str, Any]:
    """Every case, each in a fresh process, with targets and the paper's Pi 4 totals."""
    out: dict[str, Any] = {"shape": [tokens, dim], "batch": batch, "classes": classes}
    for case in CASES:
        out[case] = measure(case, tokens, dim, batch, classes, steps if case != "infer" else 20)
    out["train_vs_naive"] = out["train"]["rise_mb"] / max(out["train-naive"]["rise_mb"], 1e-9)
    out["train_vs_target"] = out["train"]["rise_mb"] / TARGET_RISE_MB["train"]
    out["infer_vs_target"] = out["infer"]["rise_mb"] / TARGET_RISE_MB["infer"]
    out["paper_rpi4_mb"] = PAPER_RPI4_MB
    out["target_rise_mb"] = TARGET_RISE_MB
    return out


def report_lines(r: dict[str, Any]) -> list[str]:
    b = r["train"]["baseline_mb"]
    lines = [
        f"LAE (M=4) on {r['shape'][0]}x{r['shape'][1]} features, batch {r['batch']}; "
        f"rise of peak RSS above a torch-only process ({b:.0f} MB here), fresh process per case",
        f"{'case':<13}{'rise':>10}{'total':>10}{'target rise':>13}{'ratio':>8}{'paper Pi 4 total':>18}",
    ]
    rows = [
        ("train-naive", None, "train"),
        ("train", TARGET_RISE_MB["train"], "train"),
        ("infer", TARGET_RISE_MB["infer"], "infer"),
    ]
    for case, target, paper in rows:
        c = r[case]
        tgt = f"{target:.0f} MB" if target else "-"
        ratio = f"{c['rise_mb'] / target:.2f}" if target else "-"
        lines.append(
            f"{case:<13}{c['rise_mb']:>7.0f} MB{c['peak_mb']:>7.0f} MB{tgt:>13}{ratio:>8}"
            f"{PAPER_RPI4_MB[paper]:>15.0f} MB"
        )
    lines.append(
        f"training rise vs naive fp32 step: {r['train_vs_naive']:.2f}x; "
        f"train/target {r['train_vs_target']:.2f}, infer/target {r['infer_vs_target']:.2f} "
        "(<= 1 meets the target)"
    )
    return lines


def add_parser(bsub: Any) -> None:
    """Add the ``edge`` target to ``mist-fed bench``'s sub-parsers."""
    e = bsub.add_parser("edge", help="peak memory of LAE training/inference vs the paper's Pi 4")
    e.add_argument("--tokens", type=int, default=197)
    e.add_argument("--dim", type=int, default=768)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--steps", type=int, default=3, help="training steps per case")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=run_command)


def run_command(args: Any) -> int:
    r = bench_edge(args.tokens, args.dim, args.batch, steps=args.steps)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print("\n".join(report_lines(r)))
    return 0


if __name__ == "__main__":
    case, *nums = sys.argv[1:]
    if case not in CASES:
        raise SystemExit(f"unknown case {case!r}; choose one of {', '.join(CASES)}")
    print(json.dumps(_child(case, *map(int, nums))))
