"""Device profiles: loading, validation naming the field, and the resource mapping."""

from pathlib import Path

import pytest

from mist_fed.device.profiles import (
    list_profiles,
    load_profile,
    profile_resources,
    profiles_dir,
)
from mist_fed.errors import ConfigError, ResourceLimitError

GOOD = """
name = "tiny"
cores = 2
memory_mb = 512
downlink_mbps = 8.0
uplink_mbps = 2.0
latency_ms = 40
gflops = 1.5
[sources]
cores = "a"
memory_mb = "b"
downlink_mbps = "c"
uplink_mbps = "d"
latency_ms = "e"
gflops = "f"
"""


def test_shipped_profiles_load():
    # Prepare / Execute
    names = list_profiles()
    profiles = [load_profile(n) for n in names]
    # Assert
    assert {"rpi4", "rpi5", "jetson-nano", "phone-mid", "phone-low", "laptop"} <= set(names)
    for p in profiles:
        assert p.sources.keys() >= {"cores", "memory_mb", "gflops", "downlink_mbps"}
    assert load_profile("rpi4").cores == 4


def test_profile_from_path_and_env(tmp_path: Path, monkeypatch):
    # Prepare
    (tmp_path / "tiny.toml").write_text(GOOD)
    monkeypatch.setenv("MIST_FED_PROFILES", str(tmp_path))
    # Execute
    by_name = load_profile("tiny")
    by_path = load_profile(tmp_path / "tiny.toml")
    # Assert
    assert profiles_dir() == tmp_path
    assert list_profiles() == ["tiny"]
    assert by_name == by_path and by_name.memory_mb == 512


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("cores = 2", "cores = 0", "cores"),
        ("memory_mb = 512", 'memory_mb = "lots"', "memory_mb"),
        ("downlink_mbps = 8.0", "downlink_mbps = -1.0", "downlink_mbps"),
        ("gflops = 1.5", "", "gflops"),
        ('gflops = "f"', "", "gflops"),
        ("latency_ms = 40", "latency_ms = 40\nbogus = 1", "bogus"),
    ],
)
def test_bad_profile_names_the_field(tmp_path: Path, old: str, new: str, field: str):
    # Prepare
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new, 1))
    # Execute / Assert
    with pytest.raises(ConfigError, match=field):
        load_profile(path)


def test_unknown_profile_lists_choices():
    with pytest.raises(ConfigError, match="rpi4"):
        load_profile("toaster")


def test_resources_cap_threads_at_host_cores():
    # Prepare
    rpi4 = load_profile("rpi4")
    # Execute
    small_host = profile_resources(rpi4, host_cores=2, host_memory_mb=16_000)
    big_host = profile_resources(rpi4, host_cores=32, host_memory_mb=64_000)
    # Assert
    assert (small_host.torch_threads, small_host.capped_cores) == (2, True)
    assert (big_host.torch_threads, big_host.capped_cores) == (4, False)
    assert big_host.max_parallel == 8
    assert big_host.ray_resources() == {"num_cpus": 4.0, "memory": 4096 * 2**20}


def test_resources_fail_loudly_with_a_hint():
    rpi4 = load_profile("rpi4")
    with pytest.raises(ResourceLimitError, match="memory_mb=") as err:
        profile_resources(rpi4, host_cores=4, host_memory_mb=1000)
    assert "4096 MB" in str(err.value)
    with pytest.raises(ResourceLimitError, match="exceeds device memory"):
        profile_resources(rpi4, host_cores=4, host_memory_mb=10**6, memory_mb=5000)
    plan = profile_resources(rpi4, host_cores=4, host_memory_mb=1000, memory_mb=600)
    assert plan.ray_memory_bytes == 600 * 2**20


def test_profiles_command_lists_every_profile(capsys):
    from mist_fed.cli import main

    assert main(["profiles", "--sources"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("rpi4", "jetson-nano", "phone-low", "laptop"))
    assert "gflops:" in out
