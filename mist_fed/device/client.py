"""The standalone edge client: one :class:`EdgeDevice` pulls, trains, evaluates, saves.

:func:`run_client` is what ``mist-fed client`` calls. The device works under its profile: torch
threads, a token bucket on the feature stream at the downlink (``time_scale`` to run faster
than real time), the memory meter against the device memory. Features land once in the
device's cache (``device_dir``, default under ``MIST_FED_CACHE``): a rerun, with any ``--out``,
downloads nothing. It chooses ``k`` on the validation split, reports accuracy on test, and
charges the virtual clock. :func:`predict_images` classifies local images with a saved model
through the same device (:meth:`EdgeDevice.predict`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mist_fed.assets.defaults import DEFAULT_PROFILE, STUDIED_WIRE, cache_dir
from mist_fed.core.methods import PROJECTABLE_EDGES, get_method
from mist_fed.core.specs import Geometry
from mist_fed.device.checkpoint import EdgeModelConfig, load_checkpoint, save_checkpoint
from mist_fed.device.edge import EdgeDevice
from mist_fed.device.profiles import DeviceProfile, load_profile
from mist_fed.device.source import FlightSource
from mist_fed.device.trainer import TrainConfig
from mist_fed.errors import ConfigError
from mist_fed.wire.codec import encode_png
from mist_fed.wire.dtypes import check_wire, parse_wire
from mist_fed.wire.shaping import LinkShaper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    task: str
    cloud: str
    profile: str
    out: str
    method: str = "mist"
    dtype: str | None = None  # None: default_dtype (the studied wire where it fits)
    token: str | None = None
    ks: tuple[int, ...] | None = None  # None: the method's candidates {N/3, 2N/3, N}
    upload: bool = False  # send the device's own images instead of asking by reference
    time_scale: float = 1.0
    hard_memory_limit: bool = True
    retries: int = 4
    backoff_s: float = 0.25
    device_dir: str | None = None  # the device's storage (feature cache); None: under the cache
    # bars on stderr (the CLI: when it is a terminal); else a stream logs its rows ready /
    # total and rate every 30 s (mist_fed.wire.progress)
    progress: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.dtype is not None:
            check_wire(self.dtype, ConfigError, "--dtype")
        if not self.time_scale > 0:
            raise ConfigError(f"--time-scale must be > 0, got {self.time_scale}")

    @property
    def storage(self) -> Path:
        return Path(self.device_dir) if self.device_dir else default_device_dir()


def default_dtype(method: str, geometry: Geometry) -> str:
    """The wire a client uses unless told: the one the wire study chose
    (:data:`~mist_fed.assets.defaults.STUDIED_WIRE`) for a method whose edge net reads a projection,
    on a backbone wide enough for it; float16 otherwise (half of float32's bytes at no
    measured cost)."""
    projectable = get_method(method).edge in PROJECTABLE_EDGES
    if projectable and geometry.embed_dim >= (parse_wire(STUDIED_WIRE).dims or 0):
        return STUDIED_WIRE
    return "float16"


def default_device_dir() -> Path:
    """Where a client keeps what it downloaded (``$MIST_FED_CACHE/device``)."""
    return cache_dir() / "device"


def _task_info(task: str) -> tuple[int | None, list[str]]:
    """Class count and names from the local task registry, if this device knows the task.

    Imported only here: a device that asks by reference needs no dataset code at all.
    """
    try:
        from mist_fed.data import get_task

        t = get_task(task)
    except Exception as e:  # data (or its reader) may be absent on a device asking by reference
        log.info("task %s is not available locally (%s); classes come from labels", task, e)
        return None, []
    return t.num_classes, list(t.classes)


def _local_images(task: str, split: str) -> list[tuple[str, bytes, int]]:
    from mist_fed.data import get_task

    s = get_task(task).split(split)
    return [(s.ids[i], encode_png(s.image(i)), int(s.labels[i])) for i in range(len(s))]


def run_client(cfg: ClientConfig) -> dict[str, Any]:
    """Train and evaluate one edge model under ``cfg.profile``; writes ``lae.*`` and metrics."""
    profile = load_profile(cfg.profile)
    out = Path(cfg.out)
    shaper = LinkShaper(profile.downlink_mbps, profile.latency_ms, cfg.time_scale)
    source = FlightSource(
        cfg.cloud,
        cfg.token,
        shaper,
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        progress=cfg.progress,  # a stream's rows ready / total: a bar, else a line every 30 s
    )
    device = EdgeDevice(
        profile,
        source,
        cfg.storage,
        hard_memory_limit=cfg.hard_memory_limit,
        local_images=_local_images if cfg.upload else None,
        progress=cfg.progress,
    )
    with source, device:
        geometry = device.geometry
        dtype = cfg.dtype or default_dtype(cfg.method, geometry)
        log.info("%s on the %s wire", cfg.method, dtype)
        num_classes, classes = _task_info(cfg.task)
        if num_classes is None:  # learn it from the labels the cloud sends
            seen = device.features(cfg.task, "train", cfg.method, _first_k(device, cfg), dtype)
            num_classes = seen.max_label + 1
        sel = device.select_k(cfg.task, cfg.method, dtype, num_classes, cfg.train, ks=cfg.ks)
        test = device.features(cfg.task, "test", cfg.method, sel.k, dtype)
        accuracy = device.evaluate(sel.net, test)
        spec = device.spec(cfg.method, sel.k)
        mcfg = EdgeModelConfig(
            method=cfg.method,
            num_classes=num_classes,
            geometry=geometry,
            gather=spec.kind,
            k=sel.k,
            dtype=dtype,
            basis=test.meta.basis,
            classes=classes,
            task=cfg.task,
        )
        save_checkpoint(sel.net, mcfg, out)
    report = device.report()
    metrics = {
        "task": cfg.task,
        "method": cfg.method,
        "profile": profile.as_dict(),
        "accuracy": accuracy,
        "k": sel.k,
        "val_accuracy": {str(k): v for k, v in sel.val_acc.items()},
        "dtype": dtype,
        "epochs": cfg.train.epochs,
        "backbone": geometry.backbone,
        "weights": geometry.weights,
        "test_rows": len(test),
        **report.as_dict(),
        "time_scale": cfg.time_scale,
        "transfer_wait_s": shaper.waited_s,
        "device_dir": str(cfg.storage),
        "train_config": asdict(cfg.train),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s and %s", out / "lae.safetensors", out / "metrics.json")
    return metrics


def _first_k(device: EdgeDevice, cfg: ClientConfig) -> int | None:
    return device.candidate_ks(cfg.method, cfg.ks)[0]


def predict_images(
    model_dir: str | Path,
    cloud: str,
    images: Sequence[str | Path],
    token: str | None = None,
    top: int = 5,
    profile: DeviceProfile | None = None,
    storage: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Classify local image files with a saved model, through the device that runs it
    (``profile``, default the client's; its link shaped, clock and memory meter on)."""
    from PIL import Image

    net, mcfg = load_checkpoint(model_dir)
    profile = profile or load_profile(DEFAULT_PROFILE)
    blobs = []
    for p in images:
        with Image.open(p) as im:
            blobs.append((str(p), encode_png(im.convert("RGB"))))
    source = FlightSource(
        cloud,
        token,
        LinkShaper(profile.downlink_mbps, profile.latency_ms),
        expect_backbone=mcfg.backbone,
        expect_weights=mcfg.weights_id,
    )
    device = EdgeDevice(profile, source, storage or default_device_dir())
    with source, device:
        got = device.predict(net, mcfg.method, mcfg.k, mcfg.dtype, blobs, mcfg.basis)
    out: list[dict[str, Any]] = []
    for i, row in zip(got.ids, got.probs, strict=True):
        p, c = row.topk(min(top, len(row)))
        names = [mcfg.classes[j] if j < len(mcfg.classes) else str(j) for j in c.tolist()]
        out.append({"image": i, "top": list(zip(names, p.tolist(), strict=True))})
    out.extend({"image": i, "error": reason} for i, reason in got.errors.items())
    return out
