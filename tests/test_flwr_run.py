"""``flwr run .`` end to end, as the README shows it: Flower's own CLI, its managed local
SuperLink (private home and ports per test) and runtime, this repo as the Flower app.

What docs/reliability.md promises for this path: results land in the absolute ``results-dir`` of
the run config; a device over its memory cap and a device whose Ray worker dies are recorded
as failed and the run completes; ``flwr stop`` keeps the completed rounds' files and leaves no
process of the run (only Flower's SuperLink, which outlives runs by design, and which the
test stops); with Flower's runtime dependency installation on (its default), the run ends
within seconds of the ServerApp starting, saying in one line how to run it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.fakes import TINY_DEVICE
from tests.procs import cmdline, tagged_pids

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.network]

ROOT = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 420  # a whole small run on a loaded 2-core host (SuperLink, Ray, embedding)
FEDERATION = "num-supernodes=3 init-args-num-cpus=2"  # Flower's simulation: 3 nodes, 2 CPUs
STOP_LIMIT_S = 45  # from `flwr stop` to no process of the run left
SUPERLINK = ("flower-superlink", "flower-superexec")  # Flower's, outlive runs by design
FLEET = """\
train_per_device = 6
test_per_device = 3
local_epochs = 1
seed = 0

[[fleets]]
task = "synthetic:classes=3,train=24,test=12"
devices = 3

[backbone]
name = "vit_tiny_patch16_224"
random_init = true
model_kwargs = { img_size = 32, patch_size = 8, depth = 3, embed_dim = 192, num_heads = 3 }
"""

Flwr = Callable[..., subprocess.CompletedProcess[str]]
Env = dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _left(tag: str) -> list[str]:
    """Command lines of the run's processes still alive, Flower's SuperLink aside."""
    out = [cmdline(p) for p in tagged_pids(tag)]
    return [c for c in out if c and not any(name in c for name in SUPERLINK)]


@pytest.fixture
def flwr(tmp_path: Path) -> Iterator[tuple[Flwr, str, Env]]:
    """``flwr ...`` in this repo with a private Flower home, ports and cache; stops them after.

    The SuperLink starts on the first ``flwr run`` with the environment as it is then.
    """
    tag = f"mist-fed-flwr-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "MIST_FED_CACHE": str(tmp_path / "cache"),
        "MIST_FED_TEST_TAG": tag,
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("RAY_ADDRESS", None)

    def run(*args: str, timeout: float = RUN_LIMIT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        yield run, tag, env
    finally:
        for pid in tagged_pids(tag):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


STAND_IN_UV = """\
\"\"\"A stand-in for ``python -m uv`` (tests only): ``sync`` installs one of the app's
dependencies (a copy of tomli_w) into the environment Flower names, as a real ``uv sync``
installs all of them (several GB: torch, Ray, ...).\"\"\"
import os, shutil, sys
from pathlib import Path

import tomli_w

if sys.argv[1:2] == ["--version"]:
    print("uv 0.0.0 (mist-fed test stand-in)")
elif sys.argv[1:2] == ["sync"]:
    env = Path(os.environ["UV_PROJECT_ENVIRONMENT"])
    site = env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(tomli_w.__file__).parent, site / "tomli_w")
    print(" + tomli-w==1.0.0")
else:
    sys.exit(2)
"""
DEPENDENCY_LIMIT_S = 240  # the whole `flwr run`: SuperLink start, install, refusal, teardown


def _wait_left_empty(tag: str, limit_s: float) -> list[str]:
    end = time.monotonic() + limit_s
    while (left := _left(tag)) and time.monotonic() < end:
        time.sleep(0.5)
    return left


def test_flwr_run_writes_the_run_and_records_failed_devices(flwr, tmp_path: Path) -> None:
    # Prepare: one device is over its memory cap; device 2 (a Pi 4) kills its Ray worker in
    # round 2 of 3
    run, tag, env = flwr
    env["MIST_FED_FAULTS"] = "exit:device=2,round=2"
    (tmp_path / "fleet.toml").write_text(FLEET)
    (tmp_path / "tiny-mem.toml").write_text(TINY_DEVICE)
    results = tmp_path / "results"
    config = (
        f"fleet='{tmp_path / 'fleet.toml'}' profile='{tmp_path / 'tiny-mem.toml'}:1,rpi4:2' "
        f"rounds=3 results-dir='{results}' run-id='e2e'"
    )
    # Execute
    t0 = time.monotonic()
    proc = run(
        "run",
        ".",
        "--stream",
        "--federation-config",
        FEDERATION,
        "--run-config",
        config,
    )
    wall = time.monotonic() - t0
    # Assert: the run, in the absolute results dir
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    run_dir = results / "e2e"
    dev = pd.read_parquet(run_dir / "devices.parquet")
    assert len(dev) == 3 * 3, log[-4000:]
    for name in ("config.toml", "summary.md", "fleets.parquet", "accuracy_per_round.png"):
        assert (run_dir / name).is_file()
    facts = tomllib.loads((run_dir / "config.toml").read_text())["run"]
    assert facts["engine"] == "flwr run" and "interrupted" not in facts
    assert "round 3 of 3" in log  # our progress reaches Flower's log stream
    assert "removed on 1 of 1 nodes" in log  # the devices' storage, on the runtime's Ray
    status = dev.set_index(["round", "device"])["status"].to_dict()
    reason = dev.set_index(["round", "device"])["reason"].to_dict()
    print(f"flwr run wall {wall:.1f} s", dev[["round", "device", "status", "reason"]], sep="\n")
    (tiny,) = dev[dev["profile"].str.endswith("tiny-mem.toml")]["device"].unique()
    (healthy,) = {0, 1, 2} - {tiny, 2}
    assert status[(1, healthy)] == status[(1, 2)] == "ok"
    assert status[(1, tiny)] == "failed" and "exceeds device memory" in reason[(1, tiny)]
    assert status[(2, 2)] == "failed" and "ActorDied" in reason[(2, 2)]
    # Flower 1.42's runtime keeps the dead actor in its pool (its one actor here: 2 CPUs, 2
    # per device), so every later job fails on it. This fails the day Flower replaces dead
    # actors; then docs/reliability.md's row for this path can promise what `mist-fed simulate` does.
    assert all(status[(3, d)] == "failed" and "ActorDied" in reason[(3, d)] for d in range(3))
    # ... and nothing of the run is left once it ends
    assert _wait_left_empty(tag, STOP_LIMIT_S) == []


def test_flwr_run_runs_an_asynchronous_fleet_through_the_same_engine(flwr, tmp_path: Path) -> None:
    # Prepare: the fleet as FedBuff, a buffer of 2 of its 3 devices, 3 server steps
    run, tag, _ = flwr
    (tmp_path / "fleet.toml").write_text(FLEET)
    results = tmp_path / "results"
    config = (
        f"fleet='{tmp_path / 'fleet.toml'}' profile='rpi4:1,phone-low:1,jetson-nano:1' "
        f"rounds=3 aggregation='FedBuff' aggregation-args='{{\"buffer_size\": 2}}' "
        f"results-dir='{results}' run-id='async'"
    )
    # Execute
    proc = run(
        "run", ".", "--stream", "--federation-config", FEDERATION,
        "--run-config", config,
    )  # fmt: skip
    # Assert: three server steps of two updates each, on the virtual clock
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (results / "async" / "fleets.parquet").is_file(), log[-6000:]
    fleets = pd.read_parquet(results / "async" / "fleets.parquet")
    dev = pd.read_parquet(results / "async" / "devices.parquet")
    assert fleets["aggregation"].tolist() == ["FedBuff"] * 3, log[-4000:]
    assert fleets["round"].tolist() == [1, 2, 3] and (fleets["ok"] == 2).all()
    assert fleets["sim_time_s"].is_monotonic_increasing and dev["staleness"].notna().all()
    assert (results / "async" / "staleness.png").is_file()
    assert _wait_left_empty(tag, STOP_LIMIT_S) == []


def _started_until_round_one(flwr: Any, tmp_path: Path, name: str) -> tuple[str, Path, Path]:
    """A 3-round run ``name`` started with `flwr run`, device 0 hanging in round 2; returned
    once round 1 is written: Flower's run id, the results directory, the run's config.toml."""
    run, _, env = flwr
    env["MIST_FED_FAULTS"] = "hang:device=0,round=2"
    (tmp_path / "fleet.toml").write_text(FLEET)
    results = tmp_path / "results"
    config = f"fleet='{tmp_path / 'fleet.toml'}' rounds=3 results-dir='{results}' run-id='{name}'"
    started = run("run", ".", "--format", "json", "--federation-config", FEDERATION,
                  "--run-config", config)  # fmt: skip
    assert started.returncode == 0, started.stderr[-4000:]
    run_id = json.loads(started.stdout)["run-id"]
    written = results / name / "config.toml"
    end = time.monotonic() + RUN_LIMIT_S
    while not written.is_file() and time.monotonic() < end:
        time.sleep(0.5)
    assert written.is_file(), run("log", run_id, "--show", timeout=30).stdout[-4000:]
    return run_id, results, written


def test_flwr_stop_keeps_completed_rounds_and_leaves_no_process(flwr, tmp_path: Path) -> None:
    # Prepare: stopped once round 1 is written, while device 0 hangs in round 2 (a busy job:
    # the case Flower's runtime mishandles, see fleet/flower/workarounds.py::on_runtime_exit)
    run, tag, _ = flwr
    run_id, results, written = _started_until_round_one(flwr, tmp_path, "stop")
    # Execute
    t0 = time.monotonic()
    stopped = run("stop", run_id, timeout=60)
    left = _wait_left_empty(tag, STOP_LIMIT_S)
    stop_s = time.monotonic() - t0
    # Assert
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert left == [], left
    facts = tomllib.loads(written.read_text())["run"]
    done = facts["rounds_completed"]
    assert facts["interrupted"] is True and done == 1
    dev = pd.read_parquet(results / "stop" / "devices.parquet")
    assert sorted(dev["round"].unique()) == list(range(1, done + 1)) and len(dev) == 3 * done
    print(f"stopped after {done} rounds; {len(left)} left {stop_s:.1f} s after")


def test_flwr_run_with_runtime_dependency_installation_says_how_to_run_it(
    flwr, tmp_path: Path
) -> None:
    # Prepare: Flower's default (installation on), with a stand-in uv ahead of the real one
    run, tag, env = flwr
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")
    (tmp_path / "uv-stand-in" / "uv").mkdir(parents=True)
    (tmp_path / "uv-stand-in" / "uv" / "__main__.py").write_text(STAND_IN_UV)
    (tmp_path / "uv-stand-in" / "uv" / "__init__.py").write_text("")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "uv-stand-in"), str(ROOT)])
    (tmp_path / "fleet.toml").write_text(FLEET)
    results = tmp_path / "results"
    config = f"fleet='{tmp_path / 'fleet.toml'}' rounds=2 results-dir='{results}' run-id='dep'"
    # Execute
    t0 = time.monotonic()
    proc = run(
        "run", ".", "--stream", "--federation-config", FEDERATION,
        "--run-config", config, timeout=DEPENDENCY_LIMIT_S,
    )  # fmt: skip
    wall = time.monotonic() - t0
    # Assert: the install ran, then the ServerApp refused at once, naming the fix; no results,
    # no round started, nothing of the run left behind
    log = proc.stdout + proc.stderr
    assert "tomli-w" in log or "Installed" in log, log[-4000:]
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in log, log[-4000:]
    assert "second copy of this app's dependencies (tomli_w)" in log, log[-4000:]
    assert "round 1 of" not in log and not results.exists()
    assert _wait_left_empty(tag, STOP_LIMIT_S) == []
    # `flwr run --stream` returns 0 whatever the run's outcome (Flower's CLI); Flower records
    # the run as failed
    (run_id,) = re.findall(r"Successfully started run (\d+)", log)
    listed = run("list", "--run-id", run_id, "--format", "json", timeout=60)
    assert "failed" in listed.stdout, listed.stdout + listed.stderr
    print(f"refused; flwr run returned {proc.returncode} after {wall:.1f} s; run {run_id} failed")


def test_flwr_run_resumes_a_stopped_run_from_its_run_config(flwr, tmp_path: Path) -> None:
    # Prepare: a 3-round run stopped with `flwr stop` once round 1 is written, while device 0
    # hangs in round 2 (once: the resumed run's device storage holds the fault's mark)
    run, tag, _ = flwr
    run_id, results, written = _started_until_round_one(flwr, tmp_path, "cut")
    stopped = run("stop", run_id, timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert _wait_left_empty(tag, STOP_LIMIT_S) == []
    done = tomllib.loads(written.read_text())["run"]["rounds_completed"]
    assert (results / "cut" / "checkpoint.pt").is_file()
    # Execute: the same app, told only which run to resume
    again = run("run", ".", "--stream", "--federation-config", FEDERATION,
                "--run-config", f"results-dir='{results}' resume='cut'")  # fmt: skip
    # Assert: the run goes on from its checkpoint to its last round, and is then whole
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    facts = tomllib.loads(written.read_text())["run"]
    assert "interrupted" not in facts and facts["resumes"] == 1, log[-4000:]
    assert facts["resumed_from_round"] == done == 1
    fleets = pd.read_parquet(results / "cut" / "fleets.parquet")
    assert fleets["round"].tolist() == [1, 2, 3] and fleets["ok"].tolist() == [3, 3, 3]
    assert not (results / "cut" / "checkpoint.pt").exists()
    print(f"flwr run: stopped after round {done} of 3, resumed to 3")
