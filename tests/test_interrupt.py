"""Ctrl-C during a fleet simulation ends the whole run: exit 130, completed rounds kept, no
process left behind (the embedded cloud, Ray and Flower's threads all stop)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from mist_fed.cli import EXIT_INTERRUPTED
from mist_fed.errors import MistError
from mist_fed.fleet.flower import grid as flower_grid
from mist_fed.fleet.flower.grid import GridTransport, wait_for_nodes
from mist_fed.fleet.job import DeviceJob
from mist_fed.fleet.transport import RunStopped
from tests.conftest import sigint_as_in_a_terminal
from tests.procs import tagged_pids

ROOT = Path(__file__).resolve().parents[1]
START_LIMIT_S = 420  # until round 2 starts (Ray start, embedding, round 1) on a loaded host
STOP_LIMIT_S = 60  # from Ctrl-C to exit
FLEET = """\
profiles = "rpi4"
train_per_device = 6
test_per_device = 3
rounds = 2
local_epochs = 1
seed = 0

[[fleets]]
task = "synthetic:classes=3,train=24,test=12"
devices = 2

[backbone]
name = "vit_tiny_patch16_224"
random_init = true
model_kwargs = { img_size = 32, patch_size = 8, depth = 2, embed_dim = 32, num_heads = 2 }
"""


class _SilentGrid:
    """A Flower Grid whose nodes never register and never reply."""

    def get_node_ids(self) -> list[int]:
        return []

    def push_messages(self, messages: list) -> list[str]:
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids: list[str]) -> list:
        return []


def test_a_stopped_run_stops_waiting_for_nodes_and_replies(monkeypatch) -> None:
    # Prepare (a Flower Message needs a live run: the jobs travel as placeholders here)
    monkeypatch.setattr(flower_grid, "job_message", lambda *a: object())
    stop = threading.Event()
    job = DeviceJob(
        device=0, fleet="f", task="synthetic", method="mist", profile="rpi4", round=1,
        train_ids=("a",), test_ids=("b",), num_classes=2, cloud="grpc+tcp://127.0.0.1:1",
        storage="run-1/f/0",
    )  # fmt: skip
    transport = GridTransport(_SilentGrid(), [7], stop=stop)  # type: ignore[arg-type]
    threading.Timer(0.2, stop.set).start()
    # Execute / Assert: both waits end soon after the stop, not at their timeouts
    t0 = time.monotonic()
    transport.submit([(job, {"w": torch.zeros(2)})])
    with pytest.raises(RunStopped):
        list(transport.replies())
    with pytest.raises(RunStopped):
        wait_for_nodes(_SilentGrid(), 2, timeout_s=60, stop=stop)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5


def test_a_wait_for_replies_is_never_silent_and_ends_when_ray_is_gone(monkeypatch, caplog) -> None:
    # Prepare: replies that never come; the transport says so every 0.2 s
    monkeypatch.setattr(flower_grid, "job_message", lambda *a: object())
    monkeypatch.setattr(flower_grid, "QUIET_LOG_S", 0.2)
    job = DeviceJob(
        device=0, fleet="f", task="synthetic", method="mist", profile="rpi4", round=1,
        train_ids=("a",), test_ids=("b",), num_classes=2, storage="run-1/f/0",
    )  # fmt: skip
    stop = threading.Event()
    waits = GridTransport(_SilentGrid(), [7], stop=stop)  # type: ignore[arg-type]
    gone = GridTransport(_SilentGrid(), [7], needs_ray=True)  # type: ignore[arg-type]
    threading.Timer(1.0, stop.set).start()
    # Execute / Assert: real SuperNodes: it logs while it waits, until the run stops
    caplog.set_level(logging.INFO, logger="mist_fed")
    waits.submit([(job, {"w": torch.zeros(2)})])
    with pytest.raises(RunStopped):
        list(waits.replies())
    assert "waiting for 1 device job(s)" in caplog.text
    # ... a simulation whose Ray is gone (none in this process): an error, not a wait
    gone.submit([(job, {"w": torch.zeros(2)})])
    t0 = time.monotonic()
    with pytest.raises(MistError, match="Ray runtime is gone with 1 device job"):
        list(gone.replies())
    assert time.monotonic() - t0 < 5


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_ctrl_c_mid_round_exits_130_keeps_round_one_and_leaves_no_process(tmp_path):
    # Prepare: device 0 never answers in round 2, so the Ctrl-C lands mid-round
    (tmp_path / "fleet.toml").write_text(FLEET)
    tag = f"mist-fed-interrupt-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "MIST_FED_CACHE": str(tmp_path / "cache"),
        "MIST_FED_FAULTS": "hang:device=0,round=2",
        "MIST_FED_TEST_TAG": tag,
    }
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "-v"]
    cmd += ["--fleet", str(tmp_path / "fleet.toml"), "--results", str(tmp_path / "results")]
    cmd += ["--run-id", "stopped", "--no-progress"]
    # Its own session: the SIGINT goes to its process group, as a terminal's Ctrl-C does.
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    lines: list[str] = []
    round_two = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "round 2 of 2" in line:
                round_two.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert round_two.wait(START_LIMIT_S), "round 2 never started:\n" + "".join(lines[-40:])
        time.sleep(3)  # the round's jobs reach the devices; device 0 hangs
        # Execute
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(STOP_LIMIT_S)
        stop_s = time.monotonic() - t0
        reader.join(5)
        # Assert: prompt, 130, a clear message, round 1 written and marked as interrupted
        err = "".join(lines)
        assert rc == EXIT_INTERRUPTED, err[-4000:]
        assert "mist-fed: interrupted: stopped after 1 of 2 rounds" in err, err[-4000:]
        assert "Traceback" not in err, err[-4000:]
        run_dir = tmp_path / "results" / "stopped"
        dev = pd.read_parquet(run_dir / "devices.parquet")
        assert sorted(dev["round"].unique()) == [1] and len(dev) == 2
        facts = tomllib.loads((run_dir / "config.toml").read_text())["run"]
        assert facts["interrupted"] is True and facts["rounds_completed"] == 1
        # The run stops its cloud after the fleet (its counters are read), not the signal:
        # Arrow's own SIGINT handler would stop it first and hide Ctrl-C from the main thread.
        assert "could not read the cloud's counters" not in err, err[-4000:]
        assert facts["cloud_images_embedded"] > 0
        # ... and nothing it started outlives it (Ray's processes stop within a few seconds)
        end = time.monotonic() + 15
        while tagged_pids(tag) and time.monotonic() < end:
            time.sleep(0.5)
        assert tagged_pids(tag) == []
        assert stop_s < STOP_LIMIT_S
        print(f"\nRELIABILITY ctrl_c_mid_round: exit_s={stop_s:.1f}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in tagged_pids(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
