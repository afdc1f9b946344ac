"""``ServeConfig``: the cloud service's frozen, validated configuration (``cloud/serve.toml``).

The TOML file has sections ``[server]``, ``[backbone]``, ``[store]``, ``[limits]`` and ``[tls]``;
their keys map one to one onto the flat dataclass fields below (unknown keys are errors).
Command-line flags override with :meth:`ServeConfig.override`.

Defaults that work offline with no file and no flag: loopback on port 8815; the backbone chosen
from local state (``backbone`` unset: :func:`mist_fed.assets.defaults.choose_backbone`); every
registered named task offered (``tasks`` unset). ``tasks`` narrows that list; a ``+SPEC``
entry adds a spec to it instead (``+imagefolder:/data/birds``): image folders and parametrised
specs (``synthetic:classes=4``) are served only when listed. The feature store keeps at most
``max_gb`` gigabytes, evicting the least recently used shards (32 GB by default: a full
comparison's features, about 17 GB, fit).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mist_fed.assets import defaults
from mist_fed.cloud.numerics import (
    check_numerics,
    check_runtime,
    resolve_numerics,
    resolve_runtime,
)
from mist_fed.errors import ConfigError
from mist_fed.wire.dtypes import check_wire

SECTIONS = ("server", "backbone", "store", "warm", "limits", "tls")
DEFAULT_MAX_GB = 32.0  # a full comparison's features (about 17 GB) fit


@dataclass(frozen=True)
class ServeConfig:
    # [server]
    host: str = defaults.DEFAULT_HOST
    port: int = defaults.DEFAULT_PORT
    tokens: str | None = None  # TOML file of [tokens.<name>] entries; None = open server
    # the task specs served; None: every registered named task; "+SPEC" entries add to those;
    # "*": any spec at all (parametrised ones and image folders included)
    tasks: tuple[str, ...] | None = None
    # [backbone]
    backbone: str | None = None  # None: chosen from local state (see the module docstring)
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where the backbone runs: cpu, cuda, cuda:N, or auto (cuda when present)
    # the backbone's precision (auto: float16 on CUDA, bfloat16 on a CPU with native bfloat16,
    # else float32) and what runs it (auto: openvino on a CPU); see mist_fed/cloud/numerics.py
    numerics: str = "auto"
    runtime: str = "auto"
    # [store]
    cache_dir: str | None = None  # None = <MIST_FED_CACHE>/features
    batch_size: int | None = None  # images per backbone forward; None: 8 on a CPU, 64 on CUDA
    rows_per_batch: int = 64  # rows per streamed record batch
    default_dtype: str = "float32"
    max_gb: float = DEFAULT_MAX_GB  # least recently used shards go beyond it
    # pca<D>- wires: the basis is fitted on this task's first projection_images training
    # images (pca<D>task-: on the requested task's); see mist_fed/cloud/projections.py
    projection_sample: str = "digits"
    projection_images: int = 1000
    # [warm]: a warm's embedding spread over a Ray cluster (see mist_fed/cloud/ray_warm.py)
    ray: str | None = None  # None: no Ray; "local": a Ray of the service's own; else an address
    warm_workers: int = 0  # Ray embedding workers per warm (0: the service embeds itself)
    # [limits]
    max_ticket_bytes: int = 1 << 20
    max_ids_per_ticket: int = 100_000
    max_upload_images: int = 10_000
    max_image_bytes: int = 16 << 20
    # [tls]
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside 0..65535 (0 picks a free port)")
        for name in ("batch_size", "rows_per_batch", "max_ticket_bytes", "max_ids_per_ticket"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.projection_images < 2:
            raise ConfigError(f"projection_images must be >= 2, got {self.projection_images}")
        if self.warm_workers < 0:
            raise ConfigError(f"warm_workers must be >= 0, got {self.warm_workers}")
        if self.warm_workers and self.ray is None:
            raise ConfigError("warm_workers needs a Ray to run on: set ray (an address or local)")
        if self.max_upload_images < 1 or self.max_image_bytes < 1:
            raise ConfigError("max_upload_images and max_image_bytes must be >= 1")
        check_wire(self.default_dtype, ConfigError, "default_dtype")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ConfigError(f"device {self.device!r} is not cpu, cuda, cuda:N or auto")
        check_numerics(self.numerics)
        check_runtime(self.runtime)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key (or neither)")
        if self.weights is not None and self.random_init:
            raise ConfigError("give either weights or random_init = true, not both")
        if not self.max_gb > 0:
            raise ConfigError(f"max_gb must be > 0, got {self.max_gb}")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))

    def offered_tasks(self) -> tuple[str, ...]:
        """The task specs this service offers (``tasks`` resolved against the registry)."""
        from mist_fed.data.tasks import named_tasks

        if self.tasks is None:
            return tuple(named_tasks())
        listed = [t for t in self.tasks if not t.startswith("+")]
        added = [t[1:] for t in self.tasks if t.startswith("+")]
        base = listed if listed else named_tasks()
        return tuple(dict.fromkeys([*base, *added]))

    def backbone_numerics(self) -> tuple[str, str, str]:
        """``(numerics, runtime, why)`` this config resolves to on this host."""
        device = self.torch_device()
        numerics, why_n = resolve_numerics(self.numerics, device)
        runtime, why_r = resolve_runtime(self.runtime, device, numerics)
        return numerics, runtime, f"numerics {numerics} ({why_n}), runtime {runtime} ({why_r})"

    def forward_batch(self) -> int:
        """Images per backbone forward: ``batch_size``, else 8 on a CPU (OpenVINO's best on the
        2-core host measured; larger batches were no faster) and 64 on CUDA."""
        if self.batch_size is not None:
            return self.batch_size
        return 64 if self.torch_device().type == "cuda" else 8

    def torch_device(self) -> torch.device:
        """The device the backbone runs on; ``auto`` picks CUDA when this host has it."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"device {self.device!r} asked for, but torch sees no CUDA device here; "
                "use device = 'cpu' (or 'auto') in [backbone], or --device cpu"
            )
        return torch.device(self.device)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def store_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return defaults.cache_dir() / "features"

    @property
    def location(self) -> str:
        scheme = "grpc+tls" if self.tls else "grpc+tcp"
        return f"{scheme}://{self.host}:{self.port}"

    def override(self, **changes: Any) -> ServeConfig:
        """A copy with the non-``None`` ``changes`` applied (flags override the file)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        flat: dict[str, Any] = {}
        for section, body in data.items():
            if section not in SECTIONS or not isinstance(body, dict):
                raise ConfigError(
                    f"unknown section [{section}] in the serve config; use {', '.join(SECTIONS)}"
                )
            for key, value in body.items():
                if key not in names:
                    raise ConfigError(f"unknown key {key!r} in [{section}]; known: {sorted(names)}")
                flat[key] = tuple(value) if key == "tasks" else value
        try:
            return cls(**flat)
        except TypeError as e:
            raise ConfigError(f"bad serve config: {e}") from e

    @classmethod
    def from_toml(cls, path: str | Path) -> ServeConfig:
        p = Path(path)
        try:
            with p.open("rb") as f:
                return cls.from_dict(tomllib.load(f))
        except FileNotFoundError as e:
            raise ConfigError(f"serve config {p} does not exist; pass --config PATH") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"serve config {p} is not valid TOML: {e}") from e
