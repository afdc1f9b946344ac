"""A local fleet run starts its own Ray unless told of a cluster (no Ray started here)."""

from __future__ import annotations

from typing import Any

import pytest

from mist_fed.fleet import ray_env


class FakeRay:
    def __init__(self) -> None:
        self.kw: dict[str, Any] = {}

    def init(self, **kw: Any) -> None:
        self.kw = kw

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
