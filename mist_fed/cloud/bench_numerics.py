"""``mist-fed bench cloud``, part (c): the cloud's numerics and runtime against plain float32 timm.

For each configuration (numerics, runtime; ``auto`` resolved on this host), side by side and
interleaved, ``reps`` times:

* **service**: a cold-store ``do_get`` of the first ``images`` rows of a task's split (Gather*
  at every candidate k from one pass, float16 on the wire) through a fresh feature service,
  image decoding and preprocessing included, timed from request to last batch;
* **timm**: ``forward_features`` of the same architecture in float32 torch eager, the same
  images (already preprocessed, in memory) in batches of the service's forward batch.

Then the fidelity of each configuration: the relative L2 error of every Gather* map (each
candidate k, and the final class token) against the float32 torch forward of the same images;
and achieved GFLOP/s (the backbone's counted FLOPs per image x images/s) as a fraction of this
machine's torch matrix-multiply peak in the same numerics, measured in the same run.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mist_fed.cloud.backbone import Backbone, create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.gather import gather_many
from mist_fed.cloud.macs import cloud_macs
from mist_fed.cloud.runner import running_cloud
from mist_fed.core.specs import GatherSpec, candidate_ks
from mist_fed.data import get_task, task_entry
from mist_fed.wire.flight import FeatureClient

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic:classes=4,train=8,val=8,test=256,size=28"


@dataclass(frozen=True)
class NumericsBenchConfig:
    backbone: str = "dinov2_s14_imgfocus"  # real weights: fidelity on real features
    random_init: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm kwargs (tests: tiny ViTs)
    task: str | None = None  # None: fashion-mnist when its data is here, else synthetic
    split: str = "test"
    images: int = 256  # rows per cold stream (over 32 a request's fixed costs weigh more)
    reps: int = 2  # interleaved rounds (best and median kept)
    fidelity_images: int = 16
    numerics: tuple[str, ...] = ("auto",)
    runtime: str = "auto"
    batch_size: int | None = None  # None: the service's default forward batch
    peak_n: int = 1536  # matrix size of the matmul peak


def _task(cfg: NumericsBenchConfig) -> str:
    if cfg.task is not None:
        return cfg.task
    entry = task_entry("fashion-mnist")
    return "fashion-mnist" if entry.availability().available else SYNTHETIC


def matmul_peak(dtype: torch.dtype, n: int = 1536, reps: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` matrix multiply in ``dtype`` with torch's threads."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _rel_errors(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    diff = (got - want).flatten(1).norm(dim=1)
    return (diff / want.flatten(1).norm(dim=1).clamp_min(1e-12)).tolist()


def bench_numerics(cfg: NumericsBenchConfig, host: str) -> dict[str, Any]:
    """Run part (c); returns one dict per configuration plus the shared figures."""
    task = _task(cfg)
    split = get_task(task).split(cfg.split)
    n = min(cfg.images, len(split))
    ids = list(split.ids[:n])
    base = create_backbone(cfg.backbone, random_init=cfg.random_init, **cfg.model_kwargs)
    kwargs = dict(base.spec.model_kwargs)
    transform = base.transform()
    x = torch.stack([transform(split.image(i).convert("RGB")) for i in range(n)])
    flops = 2 * cloud_macs(base, "mist", base.num_blocks)  # one image, float32 torch counting
    configs = []
    for requested in cfg.numerics:
        serve = ServeConfig(
            port=0,
            host=host,
            tasks=(task,),
            backbone=cfg.backbone,
            random_init=cfg.random_init,
            model_kwargs=kwargs,
            numerics=requested,
            runtime=cfg.runtime,
            batch_size=cfg.batch_size,
        )
        numerics, runtime, why = serve.backbone_numerics()
        configs.append((requested, serve, numerics, runtime, why))
    batch = configs[0][1].forward_batch()
    model = base.model
    specs = [GatherSpec("mist", k) for k in candidate_ks(base.num_blocks)]

    def timm_f32() -> float:
        def run() -> None:
            with torch.inference_mode():
                for s in range(0, n, batch):
                    model.forward_features(x[s : s + batch])

        return _timed(run)

    def service(serve: ServeConfig) -> float:
        with tempfile.TemporaryDirectory() as store:
            config = serve.override(cache_dir=store)
            with running_cloud(config, backbone=base) as loc, FeatureClient(loc) as client:
                t = time.perf_counter()
                got = client.get(task, cfg.split, "mist", base.num_blocks, "float16", ids=ids)
                took = time.perf_counter() - t
                stats = client.stats()
        if len(got) != n or stats["images_embedded"] != n:
            raise RuntimeError(f"cold stream embedded {stats['images_embedded']} of {n} images")
        return took

    # warm up: compile each configuration's graph once, and torch's kernels
    timm_f32()
    for _, serve, *_ in configs:
        service(serve)
    timm_t: list[float] = []
    service_t: dict[str, list[float]] = {c[0]: [] for c in configs}
    for rep in range(cfg.reps):
        timm_t.append(timm_f32())
        for requested, serve, *_ in configs:
            service_t[requested].append(service(serve))
        log.info("bench numerics: round %d of %d done", rep + 1, cfg.reps)
    peaks = {
        name: matmul_peak(dtype, cfg.peak_n)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
        if name == "float32" or any(c[2] == name for c in configs)
    }
    m = min(cfg.fidelity_images, n)
    ref = gather_many(base.configured("float32", "torch"), x[:m], [*specs, GatherSpec("final")])
    timm_ips = n / min(timm_t)
    out: dict[str, Any] = {
        "task": task,
        "split": cfg.split,
        "images": n,
        "batch": batch,
        "backbone": base.name,
        "weights": base.base_weights_id,
        "gflop_per_image": flops / 1e9,
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_gflops": peaks,
        "timm_float32_images_per_s": timm_ips,
        "timm_float32_median_s": statistics.median(timm_t),
        "timm_float32_peak_fraction": flops * timm_ips / 1e9 / peaks["float32"],
        "configs": [],
    }
    for requested, _, numerics, runtime, why in configs:
        times = service_t[requested]
        ips = n / min(times)
        configured: Backbone = base.configured(numerics, runtime)
        got = gather_many(configured, x[:m], [*specs, GatherSpec("final")])
        fidelity = {}
        for spec, want in ref.items():
            errs = _rel_errors(got[spec], want)
            fidelity[spec.label()] = {"max": max(errs), "mean": statistics.fmean(errs)}
        peak = peaks.get(numerics, peaks["float32"])
        out["configs"].append(
            {
                "requested": requested,
                "numerics": numerics,
                "runtime": runtime,
                "why": why,
                "service_images_per_s": ips,
                "ratio_best": ips / timm_ips,
                "ratio_median": statistics.median(timm_t) / statistics.median(times),
                "fidelity": fidelity,
                "peak_fraction": flops * ips / 1e9 / peak,
                "peak_numerics": numerics if numerics in peaks else "float32",
            }
        )
    return out


def _pct(v: float) -> str:
    return f"{v * 100:.3g}%"


def format_numerics(r: dict[str, Any], reps: int) -> list[str]:
    """The printed lines of part (c)."""
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_peak_gflops"].items())
    lines = [
        f"(c) cold-store embedding of {r['images']} {r['task']}/{r['split']} images through the "
        f"service (decoding included), {r['backbone']} ({r['gflop_per_image']:.1f} GFLOP/img), "
        f"forward batch {r['batch']}, {r['torch_threads']} threads, best of {reps} interleaved "
        f"rounds; torch matmul peak GFLOP/s: {peaks}",
        f"    plain timm float32 forward_features: {r['timm_float32_images_per_s']:.2f} img/s "
        f"({r['timm_float32_peak_fraction']:.0%} of the float32 matmul peak)",
    ]
    for c in r["configs"]:
        worst = max(f["max"] for f in c["fidelity"].values())
        per_map = ", ".join(f"{k} {_pct(v['max'])}" for k, v in c["fidelity"].items())
        lines.append(
            f"    service, asked {c['requested']}: {c['why']}: "
            f"{c['service_images_per_s']:.2f} img/s -> ratio {c['ratio_best']:.2f} "
            f"(median {c['ratio_median']:.2f}; target >= 1.6, stretch 2.0); "
            f"{c['peak_fraction']:.0%} of the {c['peak_numerics']} matmul peak"
        )
        lines.append(
            f"      fidelity vs float32 torch (max relative L2 over images, per map): {per_map}; "
            f"worst {_pct(worst)} (target <= 1%)"
        )
    return lines
