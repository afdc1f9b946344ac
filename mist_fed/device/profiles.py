"""Device profiles: what an edge device has (cores, memory, link, compute), loaded from TOML.

A profile is a frozen, validated :class:`DeviceProfile` read with ``tomllib`` from
``edge_profiles/<name>.toml``. Every number carries a ``sources`` note. A profile may also name
an unreliable link (``loss_pct``, ``reset_every_mb``, ``stall_every_mb`` with ``stall_s``; see
:mod:`mist_fed.wire.link_faults`), each with its note: the device's streams then lose, resend, reset
and stall on the way, and its clock pays for it (:meth:`DeviceProfile.downlink_seconds`). The directory is found,
in order, from ``$MIST_FED_PROFILES``, the source checkout (``<repo>/edge_profiles``), and an
installed copy (``<prefix>/share/mist-fed/edge_profiles``).

:func:`profile_resources` is the one function that maps a profile to what the host gives it:
torch threads, Ray ``num_cpus`` and Ray ``memory``. It fails loudly, with a fix hint, when the
profile cannot fit on the host.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mist_fed.errors import ConfigError, ResourceLimitError
from mist_fed.wire.link_faults import MB, MSS, LinkFaults

PROFILES_ENV = "MIST_FED_PROFILES"
NUMERIC_FIELDS = (
    "cores",
    "memory_mb",
    "downlink_mbps",
    "uplink_mbps",
    "latency_ms",
    "gflops",
)
LINK_FAULT_FIELDS = ("loss_pct", "reset_every_mb", "stall_every_mb", "stall_s")


@dataclass(frozen=True)
class DeviceProfile:
    """One device kind. Rates in Mbit/s, memory in MB (2**20 bytes), compute in GFLOP/s."""

    name: str
    cores: int
    memory_mb: int
    downlink_mbps: float
    uplink_mbps: float
    latency_ms: float
    gflops: float
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    loss_pct: float = 0.0  # packets lost on the downlink, percent (TCP resends them)
    reset_every_mb: float = 0.0  # the connection drops every this many MB (0: never)
    stall_every_mb: float = 0.0  # the link stalls for stall_s every this many MB (0: never)
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"{where}: field 'name' must be a non-empty string")
        for name, typ in (("cores", int), ("memory_mb", int)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, typ) or v < 1:
                raise ConfigError(f"{where}: field {name!r} must be a positive integer, got {v!r}")
        for name in ("downlink_mbps", "uplink_mbps", "gflops"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ConfigError(f"{where}: field {name!r} must be a positive number, got {v!r}")
            if not math.isfinite(v):
                raise ConfigError(f"{where}: field {name!r} must be finite, got {v!r}")
        lat = self.latency_ms
        if isinstance(lat, bool) or not isinstance(lat, int | float) or not 0 <= lat < 60_000:
            raise ConfigError(
                f"{where}: field 'latency_ms' must be a number in [0, 60000), got {lat!r}"
            )
        self.link_faults()  # validates them
        named = [f for f in LINK_FAULT_FIELDS if getattr(self, f)]
        missing = [f for f in (*NUMERIC_FIELDS, *named) if f not in self.sources]
        if missing:
            raise ConfigError(
                f"{where}: field 'sources' needs a note for every number; missing {', '.join(missing)}"
            )

    def link_faults(self) -> LinkFaults:
        """What goes wrong on this device's downlink (nothing, unless the profile says)."""
        try:
            return LinkFaults(self.loss_pct, self.reset_every_mb, self.stall_every_mb, self.stall_s)
        except ConfigError as e:
            raise ConfigError(f"profile {self.name!r}: {e}") from None

    def downlink_mbps_under_loss(self) -> float:
        """The downlink's rate as TCP gets it with ``loss_pct`` loss: the Mathis et al. (1997)
        bound ``MSS / RTT * sqrt(3 / (2 p))``, capped at ``downlink_mbps`` (RTT: ``latency_ms``;
        no loss or no latency: the link's own rate)."""
        p, rtt = self.loss_pct / 100, self.latency_ms / 1e3
        if p <= 0 or rtt <= 0:
            return self.downlink_mbps
        return min(self.downlink_mbps, MSS * 8 / rtt * math.sqrt(1.5 / p) / 1e6)

    def downlink_seconds(self, nbytes: int, requests: int = 1) -> float:
        """Time to receive ``nbytes`` over this device's downlink, one latency per request;
        on a faulty link at TCP's rate under loss, plus a round trip per reset (the stream
        resumes) and ``stall_s`` per stall."""
        s = requests * self.latency_ms / 1e3 + nbytes * 8 / (self.downlink_mbps_under_loss() * 1e6)
        if self.reset_every_mb:
            s += nbytes // int(self.reset_every_mb * MB) * self.latency_ms / 1e3
        if self.stall_every_mb:
            s += nbytes // int(self.stall_every_mb * MB) * self.stall_s
        return s

    def uplink_seconds(self, nbytes: int, requests: int = 1) -> float:
        return requests * self.latency_ms / 1e3 + nbytes * 8 / (self.uplink_mbps * 1e6)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def profiles_dir() -> Path:
    """The edge_profiles directory (``$MIST_FED_PROFILES``, source checkout, installed copy)."""
    env = os.environ.get(PROFILES_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [
        Path(__file__).resolve().parents[2] / "edge_profiles",
        Path(sys.prefix) / "share" / "mist-fed" / "edge_profiles",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    raise ConfigError(
        f"no edge_profiles directory found (looked in {', '.join(map(str, candidates))}); "
        f"set {PROFILES_ENV}=/path/to/edge_profiles or pass a profile file path"
    )


def list_profiles() -> list[str]:
    """Names of the profiles in :func:`profiles_dir`."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def parse_profile(data: dict[str, Any], origin: str = "<dict>") -> DeviceProfile:
    """Build a profile from parsed TOML, naming the offending field on error."""
    known = {f.name for f in fields(DeviceProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{origin}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    missing = [f for f in ("name", *NUMERIC_FIELDS) if f not in data]  # link faults: optional
    if missing:
        raise ConfigError(f"{origin}: missing field(s) {', '.join(missing)}")
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ConfigError(f"{origin}: field 'sources' must be a table of strings")
    try:
        return DeviceProfile(**{**data, "sources": dict(sources)})
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (``rpi4``) or from a TOML file path."""
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml" and os.sep not in str(name_or_path):
        path = profiles_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(
                f"unknown device profile {str(name_or_path)!r}; choose one of "
                f"{', '.join(list_profiles())} or pass a .toml file"
            )
    if not path.is_file():
        raise ConfigError(f"profile file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile file {path} is not valid TOML: {e}") from None
    return parse_profile(data, origin=str(path))


# -- the one mapping from a profile to host resources -----------------------------------------


@dataclass(frozen=True)
class ResourcePlan:
    """What one device of ``profile`` gets on this host."""

    profile: str
    torch_threads: int  # torch.set_num_threads / interop threads
    ray_num_cpus: float  # Ray client resource "num_cpus"
    ray_memory_bytes: int  # Ray client resource "memory"
    capped_cores: bool  # the host has fewer cores than the profile
    max_parallel: int  # devices of this profile that fit at once

    def ray_resources(self) -> dict[str, float]:
        """Flower's ``backend_config["client_resources"]``."""
        return {"num_cpus": self.ray_num_cpus, "memory": float(self.ray_memory_bytes)}


def detect_host_memory_mb() -> int:
    """Memory available to this host (MemAvailable, else total physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def detect_host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def profile_resources(
    profile: DeviceProfile,
    host_cores: int | None = None,
    host_memory_mb: int | None = None,
    memory_mb: int | None = None,
) -> ResourcePlan:
    """Map ``profile`` to torch threads and Ray resources on this host.

    ``memory_mb`` is what one device reserves (default: the profile's full memory; a fleet
    may pass an estimate of the job's peak instead). Raises :class:`ResourceLimitError` with
    a fix hint when one device cannot fit on the host.
    """
    cores = detect_host_cores() if host_cores is None else host_cores
    mem_host = detect_host_memory_mb() if host_memory_mb is None else host_memory_mb
    if cores < 1:
        raise ResourceLimitError(
            f"host reports {cores} CPU cores; pass host_cores >= 1 (check CPU affinity / cgroup)"
        )
    need_mb = profile.memory_mb if memory_mb is None else memory_mb
    if need_mb < 1:
        raise ResourceLimitError(f"memory_mb must be >= 1 MB, got {need_mb}")
    if need_mb > profile.memory_mb:
        raise ResourceLimitError(
            f"a job of {need_mb} MB exceeds device memory of profile {profile.name!r} "
            f"({profile.memory_mb} MB); use a larger profile or shrink the job "
            "(smaller batch or micro-batch, fp16 features)"
        )
    if need_mb > mem_host:
        raise ResourceLimitError(
            f"profile {profile.name!r} reserves {need_mb} MB but this host has {mem_host} MB "
            "available; pass memory_mb=<the job's estimated peak> (a fleet rarely needs the "
            "device's full memory), pick a smaller profile, or run on a larger host"
        )
    threads = min(profile.cores, cores)
    return ResourcePlan(
        profile=profile.name,
        torch_threads=threads,
        ray_num_cpus=float(threads),
        ray_memory_bytes=need_mb * 2**20,
        capped_cores=threads < profile.cores,
        max_parallel=max(1, min(cores // threads, mem_host // need_mb)),
    )
