"""The standalone edge client: pull features under a device profile, train, evaluate, save.

:func:`run_client` is what ``mist-fed client`` calls. Under the profile it sets torch threads,
shapes the Flight stream with a token bucket at the downlink (``time_scale`` to run faster than
real time), keeps the process under the device memory (:class:`MemoryGuard`), chooses ``k`` on
the validation split, reports accuracy on test, and scales the measured training time to the
device. Partial-1 first downloads the backbone's pretrained last block and final norm from the
cloud, once (``edge_init``; counted in ``bytes_down``, and alone in ``init_bytes_down``).
:func:`predict_images` classifies local images with a saved model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mist_fed.edge.checkpoint import EdgeModelConfig, build_net, load_checkpoint, save_checkpoint
from mist_fed.edge.device import DeviceClock, apply_threads, calibrate_lae_step
from mist_fed.edge.memory import (
    MemoryGuard,
    check_fits,
    estimate_train_mb,
    rss_mb,
    tune_allocator,
)
from mist_fed.edge.profiles import DeviceProfile, load_profile, profile_resources
from mist_fed.edge.trainer import TrainConfig, evaluate, predict, select_k
from mist_fed.errors import ConfigError, TaskError
from mist_fed.model.gather import GatherSpec, candidate_ks
from mist_fed.model.methods import get_method, starts_from_backbone
from mist_fed.wire.client import FeatureClient, encode_png
from mist_fed.wire.dtypes import WIRE_DTYPES
from mist_fed.wire.edge_init import EdgeInit
from mist_fed.wire.features import FeatureSet
from mist_fed.wire.shaping import LinkShaper

log = logging.getLogger(__name__)

REAL_DEFAULT_TASKS = ("fashion-mnist", "flowers102")


@dataclass(frozen=True)
class ClientConfig:
    task: str
    cloud: str
    profile: str
    out: str
    method: str = "mist"
    dtype: str = "float32"
    token: str | None = None
    ks: tuple[int, ...] | None = None  # None: the method's candidates {N/3, 2N/3, N}
    upload: bool = False  # send the device's own images instead of asking by reference
    time_scale: float = 1.0
    hard_memory_limit: bool = True
    retries: int = 4
    backoff_s: float = 0.25
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.dtype not in WIRE_DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}; choose {', '.join(WIRE_DTYPES)}")
        if not self.time_scale > 0:
            raise ConfigError(f"--time-scale must be > 0, got {self.time_scale}")


def default_task() -> str:
    """The real offline task when this build registers one, else a clear error."""
    from mist_fed.data import registered_tasks

    try:  # the data package's own choice, where this build has it
        from mist_fed.data.defaults import default_task as data_default  # type: ignore[import-not-found,unused-ignore]

        return str(data_default())
    except ImportError:
        pass
    for name in REAL_DEFAULT_TASKS:
        if name in registered_tasks():
            return name
    raise TaskError(
        "no real offline task is registered in this build (looked for "
        f"{', '.join(REAL_DEFAULT_TASKS)}); pass --task, e.g. --task synthetic:classes=4"
    )


def _task_info(task: str) -> tuple[int | None, list[str]]:
    """Class count and names from the local task registry, if this device knows the task."""
    from mist_fed.data import get_task

    try:
        t = get_task(task)
    except Exception as e:  # data may be absent on a device asking by reference
        log.info("task %s is not available locally (%s); classes come from labels", task, e)
        return None, []
    return t.num_classes, list(t.classes)


def _depth_from_cloud(client: FeatureClient, task: str) -> int:
    """The backbone depth N: the cloud offers each task's Gather* at k = N."""
    for entry in client.list_sets():
        if entry.get("task") == task and entry.get("gather") == "mist" and entry.get("k"):
            return int(entry["k"])
    raise ConfigError(
        f"the cloud does not list task {task!r}, so its backbone depth is unknown; "
        "pass --k K[,K...] explicitly or add the task to the cloud's [server] tasks"
    )


class _Fetcher:
    """Fetches one split at one k, by reference or by uploading local images."""

    def __init__(
        self,
        client: FeatureClient,
        cfg: ClientConfig,
        n: int,
        shaper: LinkShaper,
        clock: DeviceClock,
    ) -> None:
        self.client, self.cfg, self.n, self.shaper, self.clock = client, cfg, n, shaper, clock

    def spec(self, k: int | None) -> GatherSpec:
        return get_method(self.cfg.method).gather(self.n, k)

    def __call__(self, split: str, k: int | None) -> FeatureSet:
        spec = self.spec(k)
        self.shaper.on_request()
        if self.cfg.upload:
            fs = self._upload(split, spec)
        else:
            fs = self.client.get(self.cfg.task, split, spec.kind, spec.k, self.cfg.dtype)
        log.info("%s %s: %d rows, %d bytes", split, spec.label(), len(fs), fs.meta["wire"]["bytes"])
        return fs

    def _upload(self, split: str, spec: GatherSpec) -> FeatureSet:
        from mist_fed.data import get_task

        s = get_task(self.cfg.task).split(split)
        images = [(s.ids[i], encode_png(s.image(i))) for i in range(len(s))]
        self.clock.add_upload(sum(len(b) for _, b in images), what=f"upload {split}")
        fs = self.client.embed(images, spec.kind, spec.k, self.cfg.dtype)
        label_of = dict(zip(s.ids, s.labels, strict=True))
        fs.labels = torch.tensor([label_of[i] for i in fs.ids], dtype=torch.long)
        return fs


def run_client(cfg: ClientConfig) -> dict[str, Any]:
    """Train and evaluate one edge model under ``cfg.profile``; writes ``lae.*`` and metrics."""
    profile = load_profile(cfg.profile)
    plan = profile_resources(profile)
    apply_threads(plan)
    tune_allocator()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shaper = LinkShaper(profile.downlink_mbps, profile.latency_ms, cfg.time_scale)
    clock = DeviceClock(profile, time_scale=cfg.time_scale)
    method = get_method(cfg.method)
    micro = cfg.train.micro_batch or cfg.train.batch_size
    with (
        MemoryGuard(profile.memory_mb, profile.name, hard=cfg.hard_memory_limit) as guard,
        FeatureClient(
            cfg.cloud,
            cfg.token,
            on_batch=shaper.on_batch,
            retries=cfg.retries,
            backoff_s=cfg.backoff_s,
        ) as client,
    ):
        server = client.stats()  # CloudUnavailableError after retries with backoff
        # Pin the backbone: every later stream must come from the same backbone and weights.
        client.expect_backbone, client.expect_weights = server["backbone"], server["weights"]
        n = _depth_from_cloud(client, cfg.task)
        init = _fetch_init(client, cfg.method, shaper)
        ks: list[int | None] = list(cfg.ks) if cfg.ks else []
        if not ks:
            ks = list(candidate_ks(n)) if method.tunes_k else [None]
        fetch = _Fetcher(client, cfg, n, shaper, clock)
        num_classes, classes = _task_info(cfg.task)
        state: dict[str, Any] = {}

        def splits(k: int | None) -> tuple[FeatureSet, FeatureSet]:
            train, val = fetch("train", k), fetch("val", k)
            state["shape"] = tuple(train.features.shape[1:])
            state["gather"] = fetch.spec(k).kind
            found = int(max(train.labels.max(), val.labels.max())) + 1
            state["num_classes"] = max(num_classes or 0, found)
            work = estimate_train_mb(0, state["shape"], 4, micro, cfg.train.grad_checkpointing)
            check_fits(rss_mb() + work, profile.memory_mb, profile.name, "training")
            return train, val

        def new_net() -> torch.nn.Module:
            mcfg = _model_config(cfg, server, n, state, None, classes)
            return build_net(mcfg, init=init.state if init is not None else None)

        sel = select_k(new_net, splits, ks, cfg.train, on_step=guard.check)
        net = sel.net
        test = fetch("test", sel.k)
        t0 = time.perf_counter()
        accuracy = evaluate(net, test)
        eval_s = time.perf_counter() - t0
        guard.check()
        cal = calibrate_lae_step(state["shape"], state["num_classes"], cfg.train.batch_size, micro)
        clock.host_gflops = cal.gflops
        clock.add_compute(sel.train_seconds, "train")
        clock.add_compute(eval_s, "evaluate")
        clock.add_download(shaper.bytes, shaper.requests)
        save_checkpoint(net, _model_config(cfg, server, n, state, sel.k, classes), out)
    metrics = {
        "task": cfg.task,
        "method": cfg.method,
        "profile": profile.as_dict(),
        "accuracy": accuracy,
        "k": sel.k,
        "val_accuracy": {str(k): v for k, v in sel.val_acc.items()},
        "dtype": cfg.dtype,
        "epochs": cfg.train.epochs,
        "backbone": server["backbone"],
        "weights": server["weights"],
        "test_rows": len(test),
        "bytes_down": shaper.bytes,  # features and, for Partial-1, the one-off initial block
        "init_bytes_down": init.nbytes if init is not None else 0,
        "bytes_up": clock.bytes_up,
        "requests": shaper.requests,
        "transfer_s": clock.transfer_s,
        "transfer_wait_s": shaper.waited_s,
        "time_scale": cfg.time_scale,
        "train_s": sel.train_seconds,
        "train_device_s": clock.scale(sel.train_seconds),
        "eval_s": eval_s,
        "host_gflops": cal.gflops,
        "device_gflops": profile.gflops,
        "train_steps": sum(f.steps for f in sel.fits.values()),
        "peak_rss_mb": guard.peak_mb,
        "baseline_rss_mb": guard.baseline_mb,
        "memory_cap_mb": profile.memory_mb,
        "torch_threads": plan.torch_threads,
        "edge_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "train_config": asdict(cfg.train),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s and %s", out / "lae.safetensors", out / "metrics.json")
    return metrics


def _fetch_init(client: FeatureClient, method: str, shaper: LinkShaper) -> EdgeInit | None:
    """The pretrained weights the method's edge net starts from (Partial-1), else ``None``."""
    if not starts_from_backbone(method):
        return None
    shaper.on_request()
    init = client.edge_init(method)  # its bytes pass the shaper: counted in bytes_down
    log.info(
        "%s starts from the cloud backbone's pretrained weights (%s, %s): %d tensors, "
        "%d bytes downloaded once, counted in bytes_down",
        method,
        init.backbone,
        init.weights,
        len(init.state),
        init.nbytes,
    )
    return init


def _model_config(
    cfg: ClientConfig,
    server: dict[str, Any],
    n: int,
    state: dict[str, Any],
    k: int | None,
    classes: list[str],
) -> EdgeModelConfig:
    shape = state["shape"]
    return EdgeModelConfig(
        method=cfg.method,
        num_classes=state["num_classes"],
        backbone=server["backbone"],
        weights_id=server["weights"],
        num_blocks=n,
        tokens=shape[-2] if len(shape) >= 2 else 1,
        dim=shape[-1],
        gather=state["gather"],
        k=k,
        dtype=cfg.dtype,
        classes=classes,
        task=cfg.task,
        # Partial-1 rebuilds the backbone's last block from these (custom-sized ViTs too).
        backbone_kwargs=dict(server.get("model_kwargs") or {}),
    )


def predict_images(
    model_dir: str | Path,
    cloud: str,
    images: Sequence[str | Path],
    token: str | None = None,
    top: int = 5,
    profile: DeviceProfile | None = None,
) -> list[dict[str, Any]]:
    """Classify local image files: upload them, get their features, run the saved model."""
    from PIL import Image

    net, mcfg = load_checkpoint(model_dir)
    shaper = LinkShaper(profile.downlink_mbps, profile.latency_ms) if profile else None
    blobs = []
    for p in images:
        with Image.open(p) as im:
            blobs.append((str(p), encode_png(im.convert("RGB"))))
    with FeatureClient(
        cloud,
        token,
        expect_backbone=mcfg.backbone,
        expect_weights=mcfg.weights_id,
        on_batch=shaper.on_batch if shaper else None,
    ) as client:
        fs = client.embed(blobs, mcfg.gather, mcfg.k, mcfg.dtype)
    probs = predict(net, fs.features).softmax(1)
    out = []
    for i, row in zip(fs.ids, probs, strict=True):
        p, c = row.topk(min(top, len(row)))
        names = [mcfg.classes[j] if j < len(mcfg.classes) else str(j) for j in c.tolist()]
        out.append({"image": i, "top": list(zip(names, p.tolist(), strict=True))})
    for i, reason in fs.meta.get("errors", {}).items():
        out.append({"image": i, "error": reason})
    return out
