"""How a fleet run meets Ray, with no Ray started: its own local Ray unless told of a cluster,
the code and variables its workers get, the resources one device asks of the cluster's nodes,
and the cloud address the devices dial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mist_fed.assets.defaults import DEFAULT_HOST
from mist_fed.errors import ConfigError, ResourceLimitError
from mist_fed.fleet.runtime import cluster as ray_env
from mist_fed.fleet.runtime import provision as lifecycle
from mist_fed.fleet.spec import spec_from_dict
from tests.conftest import TINY_VIT

GiB = float(2**30)


class FakeRay:
    def __init__(self) -> None:
        self.kw: dict[str, Any] = {}
        self.shipped: list[str] = []

    def init(self, **kw: Any) -> None:
        self.kw = kw
        code = Path(kw["runtime_env"]["working_dir"])  # staged until init returns
        self.shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*"))

    def is_initialized(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("flag", "env", "address", "cpus"),
    [
        (None, None, "local", True),  # stale `ray start` state is never joined
        ("ray://head:10001", None, "ray://head:10001", False),
        (None, "10.0.0.5:6379", "10.0.0.5:6379", False),  # Ray's own variable names a cluster
    ],
)
def test_a_local_run_starts_its_own_ray_unless_a_cluster_is_named(
    flag: str | None,
    env: str | None,
    address: str,
    cpus: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    import ray

    fake = FakeRay()
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    # Execute
    with ray_env.ray_runtime(flag, 2, verbose=0):
        pass
    # Assert: num_cpus only for a Ray of our own (Ray refuses it when joining a cluster)
    assert fake.kw["address"] == address and ("num_cpus" in fake.kw) == cpus


def test_workers_get_the_package_and_profiles_and_no_driver_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: a driver whose environment names its checkout and its cache
    import ray

    fake = FakeRay()
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setenv("PYTHONPATH", str(Path.cwd()))
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIST_FED_FAULTS", "exit:device=1,round=1")
    # Execute
    with ray_env.ray_runtime(None, 1, verbose=0):
        pass
    # Assert: only mist_fed's code and the profiles travel; switches, never paths, as variables
    env = fake.kw["runtime_env"]["env_vars"]
    assert env == {"FLWR_TELEMETRY_ENABLED": "0", "MIST_FED_FAULTS": "exit:device=1,round=1"}
    tops = {p.split("/")[0] for p in fake.shipped}
    assert tops == {"mist_fed", "edge_profiles"} and "edge_profiles/rpi4.toml" in fake.shipped
    assert "mist_fed/fleet/runtime/cluster.py" in fake.shipped
    assert not [p for p in fake.shipped if "__pycache__" in p]
    assert not Path(fake.kw["runtime_env"]["working_dir"]).exists()  # removed after the upload


@pytest.mark.parametrize(
    ("nodes", "cpus", "memory"),
    [
        ([{"CPU": 4.0, "memory": 16 * GiB}], 2.0, 4 * GiB),  # fits as the profile asks
        ([{"CPU": 2.0, "memory": 2 * GiB}], 2.0, 2 * GiB),  # one actor slot: its memory
        # a two-node cluster of 1-CPU nodes (and a head kept free of tasks): 1 CPU per device
        (
            [{"CPU": 0.0}, {"CPU": 1.0, "memory": 8 * GiB}, {"CPU": 1.0, "memory": 3 * GiB}],
            1.0,
            3 * GiB,
        ),
        ([{"CPU": 8.0, "memory": 64 * GiB}, {"CPU": 2.0, "memory": 4 * GiB}], 2.0, 4 * GiB),
    ],
)
def test_a_device_ask_fits_every_node(
    nodes: list[dict[str, float]], cpus: float, memory: float
) -> None:
    # Prepare: an rpi4's ask on a host with 2 or more cores
    res = {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 4 * GiB}
    # Execute
    fitted = ray_env.fit_cluster(res, nodes)
    # Assert
    assert (fitted["num_cpus"], fitted["memory"]) == (cpus, memory)


def test_a_cluster_without_cpus_is_refused_in_one_line() -> None:
    with pytest.raises(ResourceLimitError, match="ray start --address"):
        ray_env.fit_cluster({"num_cpus": 1.0, "memory": GiB}, [{"CPU": 0.0, "memory": GiB}])


def test_a_loopback_cloud_is_refused_when_nodes_live_on_other_machines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    import ray
    import ray.util

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.5"}]
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda *a: "10.0.0.5")
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    # Execute / Assert: one machine: loopback is fine; a second one: refused, with the fix
    ray_env.check_cloud_reachable("grpc+tcp://127.0.0.1:8815")
    nodes.append({"Alive": True, "NodeManagerAddress": "10.0.0.6"})
    ray_env.check_cloud_reachable("grpc+tcp://10.0.0.5:8815")
    with pytest.raises(ConfigError, match=r"--cloud-bind 0\.0\.0\.0"):
        ray_env.check_cloud_reachable("grpc+tcp://localhost:8815")


def test_a_wildcard_bind_advertises_this_machines_ray_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray.util

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda *a: "10.0.0.5")
    assert ray_env.advertised_host("0.0.0.0") == "10.0.0.5"
    assert ray_env.advertised_host(DEFAULT_HOST) == DEFAULT_HOST
    assert lifecycle.with_host("grpc+tcp://0.0.0.0:41234", "10.0.0.5") == (
        "grpc+tcp://10.0.0.5:41234"
    )


def test_bind_and_advertise_are_refused_with_a_running_cloud() -> None:
    spec = spec_from_dict({"fleets": [{"task": "synthetic:classes=2", "devices": 1}]})
    running = lifecycle.cloud_service(spec, "grpc://gpu-host:8815", advertise="10.0.0.5")
    with pytest.raises(ConfigError, match="--cloud"), running:
        pass


@pytest.mark.network
def test_devices_dial_the_advertised_host_of_the_embedded_cloud() -> None:
    # Prepare: the embedded cloud on loopback, advertised by name
    spec = spec_from_dict(
        {
            "fleets": [{"task": "synthetic:classes=2,train=4,test=2,size=32", "devices": 1}],
            "backbone": {
                "name": "vit_tiny_patch16_224",
                "random_init": True,
                "model_kwargs": TINY_VIT,
            },
        }
    )
    # Execute
    with lifecycle.cloud_service(spec, None, DEFAULT_HOST, "localhost") as (location, stats):
        counters = stats()
    # Assert: the location names the advertised host and the service answers there
    assert location.startswith("grpc+tcp://localhost:") and "bytes_served" in counters
