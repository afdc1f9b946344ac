"""What every fleet run needs before its rounds: its assets and a cloud.

:func:`resolve_assets` keeps the spec when its tasks and backbone load here, else gives its
synthetic fallback; :func:`cloud_service` finds or starts the cloud feature service the devices
dial (an embedded one with the spec's backbone, built once per process). The run session
(:mod:`mist_fed.fleet.runtime.session`) uses both, on every run path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.cloud.backbone import Backbone, BackboneSpec, create_backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.errors import BackboneError, ConfigError, MistError, TaskError
from mist_fed.fleet.spec import FleetSpec
from mist_fed.wire.flight import FeatureClient

log = logging.getLogger(__name__)

StatsFn = Callable[[], dict[str, Any]]

_BACKBONES: dict[str, Backbone] = {}


def load_backbone(cfg: BackboneSpec) -> Backbone:
    """The embedded cloud's backbone (built once per process; devices never build one)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _BACKBONES:
        _BACKBONES[key] = create_backbone(
            cfg.name,
            weights=cfg.weights,
            random_init=cfg.random_init,
            seed=cfg.seed,
            **cfg.model_kwargs,
        )
    return _BACKBONES[key]


def resolve_assets(spec: FleetSpec) -> FleetSpec:
    """The spec itself when its tasks and backbone load here, else its synthetic fallback."""
    from mist_fed.data import get_task

    try:
        for f in spec.fleets:
            get_task(f.task)
        load_backbone(spec.backbone)
        return spec
    except (TaskError, BackboneError) as e:
        if spec.fallback_task is None or spec.fallback_backbone is None:
            raise
        log.warning("real assets unavailable (%s); running the synthetic fallback fleet", e)
        fleets = tuple(
            dataclasses.replace(f, task=spec.fallback_task, name="") for f in spec.fleets
        )
        names = [f.name for f in fleets]
        if len(set(names)) != len(names):  # several real tasks collapse onto one synthetic
            fleets = tuple(
                dataclasses.replace(f, name=f"{f.name}#{i}") for i, f in enumerate(fleets)
            )
        return dataclasses.replace(
            spec,
            fleets=fleets,
            backbone=spec.fallback_backbone,
            fallback_task=None,
            fallback_backbone=None,
        )


def serve_config(spec: FleetSpec, host: str = DEFAULT_HOST) -> ServeConfig:
    """The embedded cloud's config: the spec's backbone, a free port on ``host`` (loopback)."""
    b = spec.backbone
    return ServeConfig(
        host=host,
        port=0,
        backbone=b.name,
        weights=b.weights,
        random_init=b.random_init,
        seed=b.seed,
        model_kwargs=dict(b.model_kwargs),
        tasks=tuple(dict.fromkeys(f.task for f in spec.fleets)),
        default_dtype=spec.wire_dtype,
    )


def cloud_stats(location: str) -> dict[str, Any]:
    """The service's counters (images embedded, cache hits, bytes served)."""
    try:
        with FeatureClient(location, retries=1) as c:
            return c.stats()
    except MistError as e:
        log.warning("could not read the cloud's counters: %s", e)
        return {}


def with_host(location: str, host: str) -> str:
    """``location`` with its host replaced (``grpc+tcp://0.0.0.0:41234`` -> ``...//HOST:41234``)."""
    url = urlsplit(location)
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return urlunsplit(url._replace(netloc=f"{name}:{url.port}"))


@contextlib.contextmanager
def cloud_service(
    spec: FleetSpec,
    address: str | None,
    bind: str = DEFAULT_HOST,
    advertise: str | None = None,
) -> Iterator[tuple[str, StatsFn]]:
    """Yield ``(location, stats)``: ``address`` when given, else an embedded cloud for the run.

    The embedded cloud listens on ``bind`` (loopback by default; ``0.0.0.0`` for devices on
    other machines) and ``location`` names ``advertise``, the host devices dial (default:
    ``bind``, or for a wildcard bind this machine's IP as Ray names it). The run's own counters
    are read over loopback when the bind host allows it.
    """
    if address:
        if bind != DEFAULT_HOST or advertise:
            raise ConfigError(
                "--cloud-bind and --cloud-advertise are for the embedded cloud; with --cloud "
                f"{address} the devices dial that address"
            )
        yield address, lambda: cloud_stats(address)
        return
    from mist_fed.fleet.runtime.cluster import advertised_host, is_wildcard

    if advertise is not None and is_wildcard(advertise):
        raise ConfigError(f"--cloud-advertise {advertise!r} is not a host devices can dial")
    host = advertise or advertised_host(bind)
    with running_cloud(serve_config(spec, bind), backbone=load_backbone(spec.backbone)) as bound:
        location = with_host(bound, host)
        here = with_host(bound, DEFAULT_HOST) if is_wildcard(bind) else location
        log.info("embedded cloud feature service on %s; devices dial %s", bound, location)
        yield location, lambda: cloud_stats(here)
