"""A fleet on a real two-node Ray cluster started outside the driver (``ray start``), as on
several machines: code reaches the workers through Ray's runtime_env only, devices run on
both nodes and store under each node's own cache, and stopping the cluster leaves no process
behind.

Both nodes run on this host (each with its own temp dir, cache dir, one CPU and a resource
naming it); the driver is ``mist-fed simulate --ray-address HEAD``, a process of its own, with
a cache dir of its own. Ray's own servers listen where Ray puts them; the embedded cloud binds
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.network]

ROOT = Path(__file__).resolve().parents[1]
PREFIX = Path(sys.prefix).resolve()  # the Python install every node has (here: the same one)
RAY = str(Path(sys.executable).with_name("ray"))
NODES = ("mf_head", "mf_worker")  # one custom resource per node: which node a job ran on
START_S = 120  # a node's `ray start` on a loaded host
PROBE_S = 120
RUN_S = 240  # the fleet run (driver start, embedding, 4 devices x 2 rounds)
STOP_S = 30
FLEET = """\
profiles = "rpi4"
train_per_device = 8
test_per_device = 4
rounds = 2
local_epochs = 1
seed = 0

[[fleets]]
task = "synthetic:classes=3,train=32,test=16"
devices = 4

[backbone]
name = "vit_tiny_patch16_224"
random_init = true
model_kwargs = { img_size = 32, patch_size = 8, depth = 2, embed_dim = 32, num_heads = 2 }
"""
PROBE = """\
import json, sys
import ray
from mist_fed.fleet.runtime.cluster import ray_runtime

@ray.remote(num_cpus=1)
def facts():
    import os, sys
    import mist_fed
    return {"node": ray.get_runtime_context().get_node_id(), "env": dict(os.environ),
            "path": list(sys.path), "cwd": os.getcwd(), "mist_fed": mist_fed.__file__}

with ray_runtime(sys.argv[1], None, 0):
    refs = [facts.options(resources={r: 1}).remote() for r in sys.argv[2:]]
    print(json.dumps(dict(zip(sys.argv[2:], ray.get(refs, timeout=90)))))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _tagged(tag: str) -> dict[int, str | None]:
    """Live processes whose environment carries ``tag`` (a node and all it started), with
    their start times (a pid reused later is not ours)."""
    needle = tag.encode()
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes():
                    found[int(d.name)] = _start_time(int(d.name))
            except OSError:  # gone, or not ours to read
                continue
    return found


@dataclass
class Cluster:
    """Two ``ray start --block`` nodes in their own sessions, stopped by their pids only."""

    tmp: Path
    tag: str = field(default_factory=lambda: f"mist-fed-cluster-{uuid.uuid4().hex}")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    address: str = ""
    seen: dict[int, str | None] = field(default_factory=dict)

    def cache(self, name: str) -> Path:
        """The node's own cache directory (its ``MIST_FED_CACHE``)."""
        return self.tmp / f"{name}-cache"

    def env(self, name: str) -> dict[str, str]:
        # What a node's shell would have: no PYTHONPATH, a cache dir of its own.
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "TMPDIR")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        env.update(
            MIST_FED_CACHE=str(self.cache(name)),
            MIST_FED_CLUSTER_TAG=self.tag,
            RAY_USAGE_STATS_ENABLED="0",
            FLWR_TELEMETRY_ENABLED="0",
            OMP_WAIT_POLICY="PASSIVE",
        )
        return env

    def start_node(self, name: str, *args: str) -> str:
        log = self.tmp / f"{name}.log"
        ports = {
            "--dashboard-agent-listen-port": _free_port(),
            "--metrics-export-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
        }
        cmd = [
            RAY,
            "start",
            "--block",
            *args,
            "--num-cpus=1",
            f"--memory={2 * 2**30}",
            f"--object-store-memory={80 * 2**20}",
            f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={self.tmp / name}",
            "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        with log.open("wb") as out:
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env(name),
                    cwd=self.tmp,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return text
            assert self.procs[-1].poll() is None, f"`ray start` for {name} exited:\n{text}"
            time.sleep(0.5)
        raise AssertionError(f"`ray start` for {name} not up in {START_S} s:\n{text[-3000:]}")

    def start(self) -> None:
        head = ["--head", f"--port={_free_port()}", "--include-dashboard=false"]
        text = self.start_node(NODES[0], *head, f"--ray-client-server-port={_free_port()}")
        match = re.search(r"ray start --address='([^']+)'", text)
        assert match, text
        self.address = match.group(1)
        self.start_node(NODES[1], f"--address={self.address}")
        self.seen = _tagged(self.tag)

    def stop(self) -> list[int]:
        """SIGTERM both nodes (as Ctrl-C on ``ray start --block``), then kill by pid whatever
        of theirs outlived ``STOP_S``; the pids that had to be killed."""
        self.seen.update(_tagged(self.tag))
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_S
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        left = []
        while time.monotonic() < deadline:
            left = [pid for pid, t in self.seen.items() if t and _start_time(pid) == t]
            if not left:
                break
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        return left


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not Path(RAY).is_file():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    # Ray's socket paths have a length limit: a short temp dir.
    tmp = Path(tempfile.mkdtemp(prefix="mfr", dir="/tmp"))
    c = Cluster(tmp)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _driver_env(cluster: Cluster) -> dict[str, str]:
    """The driver's environment: its own cache dir, and a PYTHONPATH naming this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        MIST_FED_CACHE=str(cluster.cache("driver")),
        PYTHONPATH=str(ROOT),
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        OMP_WAIT_POLICY="PASSIVE",
    )
    return env


def _driver_local(value: str, cache: Path) -> list[str]:
    """The parts of ``value`` that name the driver's checkout (its Python install aside) or
    its cache directory."""
    bad = []
    for part in value.split(os.pathsep):
        if str(cache) in part:
            bad.append(part)
        elif part.startswith(str(ROOT)):
            p = Path(part).resolve()
            if not (p == PREFIX or PREFIX in p.parents):
                bad.append(part)
    return bad


@pytest.fixture(scope="module")
def worker_facts(cluster: Cluster) -> dict[str, dict]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, cluster.address, *NODES],
        capture_output=True,
        text=True,
        env=_driver_env(cluster),
        cwd=ROOT,
        timeout=PROBE_S,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_workers_get_the_code_through_runtime_env_and_no_driver_path(
    cluster: Cluster, worker_facts: dict[str, dict]
) -> None:
    # Prepare: a driver with PYTHONPATH=<checkout> and its own MIST_FED_CACHE asked one task
    # on each node (worker_facts)
    cache = cluster.cache("driver")
    # Execute / Assert
    assert len({f["node"] for f in worker_facts.values()}) == 2
    for name, f in worker_facts.items():
        module = Path(f["mist_fed"]).resolve()
        assert ROOT not in module.parents, (name, module)
        assert "runtime_resources" in module.parts, (name, module)  # Ray's runtime_env copy
        assert module.parents[1] == Path(f["cwd"]).resolve()  # the job's working_dir
        leaks = {k: _driver_local(v, cache) for k, v in f["env"].items()}
        assert not {k: v for k, v in leaks.items() if v}, (name, leaks)
        assert not [p for p in f["path"] if _driver_local(p, cache)], (name, f["path"])
        assert f["env"].get("MIST_FED_CACHE") == str(cluster.cache(name))  # its node's own


@contextlib.contextmanager
def _watching(roots: dict[str, Path]) -> Iterator[dict[str, set[Path]]]:
    """While inside: every path seen under each root's ``devices/``, three levels deep (run,
    fleet, device), relative to it; a device's directory lives the whole run."""
    seen: dict[str, set[Path]] = {name: set() for name in roots}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            for name, root in roots.items():
                devices = root / "devices"
                for pattern in ("*", "*/*", "*/*/*"):
                    with contextlib.suppress(OSError):  # a run's directory going as we look
                        seen[name].update(p.relative_to(devices) for p in devices.glob(pattern))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def test_a_fleet_runs_on_both_nodes_of_a_cluster_each_with_its_own_storage(
    cluster: Cluster, worker_facts: dict[str, dict], tmp_path: Path
) -> None:
    # Prepare: the driver and each node have a cache dir of their own
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    cmd = [sys.executable, "-m", "mist_fed.cli", "simulate", "--fleet", str(fleet)]
    cmd += ["--ray-address", cluster.address, "--results", str(tmp_path), "--run-id", "cluster"]
    roots = {"driver": cluster.cache("driver"), **{n: cluster.cache(n) for n in NODES}}
    # Execute
    t0 = time.monotonic()
    with _watching(roots) as seen:
        run = subprocess.run(
            [*cmd, "--no-progress"],
            capture_output=True,
            text=True,
            env=_driver_env(cluster),
            cwd=ROOT,
            timeout=RUN_S,
        )
    wall = time.monotonic() - t0
    # Assert: every device-round ok, jobs on both nodes
    assert run.returncode == 0, run.stderr[-4000:]
    dev = pd.read_parquet(tmp_path / "cluster" / "devices.parquet")
    assert len(dev) == 4 * 2 and (dev["status"] == "ok").all(), dev[["status", "reason"]]
    nodes = {name: f["node"] for name, f in worker_facts.items()}
    per_node = {name: int((dev["node"] == node).sum()) for name, node in nodes.items()}
    print(f"cluster fleet: {wall:.1f} s wall, device-rounds per node {per_node}")
    assert set(dev["node"]) == set(nodes.values()) and min(per_node.values()) > 0, per_node
    # ... one run directory, named alike on every root; in the driver's only the server's
    # reference (and the stop file), each device's under the cache of the node it ran on
    assert len({p.parts[0] for paths in seen.values() for p in paths}) == 1, seen
    assert {p.parts[1] for p in seen["driver"] if len(p.parts) > 1} <= {"_server", ".stop"}
    for name, node in nodes.items():
        stored = {int(p.parts[2]) for p in seen[name] if len(p.parts) == 3}
        assert stored == set(dev.loc[dev["node"] == node, "device"]), (name, stored)
    # ... and gone from every root after the run
    for name, root in roots.items():
        assert (root / "devices").is_dir() and not list((root / "devices").iterdir()), name


WARM_TASK = "synthetic:classes=3,train=48,val=8,test=8"
SERVE = f"""\
[server]
port = 0
tasks = ["{WARM_TASK}"]

[backbone]
backbone = "vit_tiny_patch16_224"
random_init = true
model_kwargs = {{ img_size = 32, patch_size = 8, depth = 2, embed_dim = 32, num_heads = 2 }}
numerics = "float32"
runtime = "torch"

[store]
batch_size = 4
"""


def test_a_warm_spreads_over_both_nodes_and_the_service_writes_every_row(
    cluster: Cluster, tmp_path: Path
) -> None:
    from mist_fed.wire.flight import FeatureClient

    # Prepare: `mist-fed cloud serve` joined to the cluster, two Ray embedding workers
    cfg = tmp_path / "serve.toml"
    cfg.write_text(SERVE)
    cmd = [sys.executable, "-m", "mist_fed.cli", "cloud", "serve", "--config", str(cfg)]
    cmd += ["--cache-dir", str(tmp_path / "store"), "--ray", cluster.address, "--warm-workers", "2"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_driver_env(cluster), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + RUN_S
        port = None
        while port is None and time.monotonic() < deadline:
            match = re.search(r"on 127\.0\.0\.1:(\d+)", (tmp_path / "serve.log").read_text())
            port = int(match.group(1)) if match else None
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert port, (tmp_path / "serve.log").read_text()[-3000:]
        # Execute: warm the train split through the CLI, then stream it
        warm = subprocess.run(
            [sys.executable, "-m", "mist_fed.cli", "cloud", "warm", "--cloud", f"grpc://127.0.0.1:{port}",
             "--task", WARM_TASK, "--splits", "train", "--method", "mist", "--k", "2"],
            capture_output=True, text=True, env=_driver_env(cluster), cwd=ROOT, timeout=RUN_S,
        )  # fmt: skip
        with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
            before = client.stats()["images_embedded"]
            fs = client.get(WARM_TASK, "train", "mist", 2, "float16")
            after = client.stats()["images_embedded"]
    finally:
        server.terminate()
        code = server.wait(STOP_S)
        log.close()
    # Assert: 48 images on both nodes' workers, written by the service; the stream embeds none
    print(f"cloud warm on the cluster: {warm.stdout.strip()}")
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "48 rows, 48 images embedded on 2 Ray nodes" in warm.stdout, warm.stdout
    assert before == after == 48 and len(fs.ids) == 48
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_stopping_the_cluster_leaves_no_process(cluster: Cluster) -> None:
    # Prepare: every process of both nodes, workers included (they carry the nodes' tag)
    before = _tagged(cluster.tag)
    # Execute
    killed = cluster.stop()
    # Assert: SIGTERM to the two `ray start` processes stopped everything they started
    assert len(before) > 2
    assert killed == [], f"had to kill {killed}"
    assert _tagged(cluster.tag) == {}
