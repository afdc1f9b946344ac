"""The used-by pair end to end, offline, as a user runs it: `mist-fed cloud serve` in one
process, `mist-fed client --task flowers102` in another, on Flowers102 in torchvision's layout.

The server is given a tiny random ViT (a config file) so the run takes seconds; its task list
is the default one. Its process switches off torchvision's MD5 check for the fixture (the only
change from the real command: product code never does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from mist_fed.assets.defaults import DEFAULT_HOST
from tests.layouts import make_flowers102, skip_md5_source

pytestmark = [pytest.mark.slow, pytest.mark.network]

START_S = 120  # a cold interpreter importing torch on a busy 2-core host
CONFIG = """\
[backbone]
backbone = "vit_tiny_patch16_224"
random_init = true
model_kwargs = { img_size = 32, patch_size = 8, depth = 3, embed_dim = 48, num_heads = 3 }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((DEFAULT_HOST, 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Any:
    """``mist-fed ARGS`` in a child process (this checkout's package), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mist_fed.cli", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(Path.cwd())},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_healthy(proc: subprocess.Popen, location: str, log: Path) -> None:
    end = time.monotonic() + START_S
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(flight.FlightError, OSError):
            c = flight.connect(location)
            try:
                list(c.do_action(flight.Action("health", b""), flight.FlightCallOptions(timeout=2)))
                return
            finally:
                c.close()
        time.sleep(0.3)
    raise AssertionError(f"cloud did not start in {START_S} s:\n{log.read_text()}")


def test_cloud_serve_then_client_flowers102(tmp_path):
    # Prepare: Flowers102 in torchvision's layout, a serve config naming only the tiny backbone
    data = tmp_path / "data"
    make_flowers102(data, per_split=8)
    (tmp_path / "serve.toml").write_text(CONFIG)
    port = _free_port()
    location = f"grpc+tcp://{DEFAULT_HOST}:{port}"
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "MIST_FED_DATA": str(data),
        "MIST_FED_CACHE": str(tmp_path / "cache"),
        "MIST_FED_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    argv = ["cloud", "serve", "--config", str(tmp_path / "serve.toml"), "--port", str(port)]
    serve = skip_md5_source() + f"from mist_fed.cli import main\nraise SystemExit(main({argv!r}))\n"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", serve], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        _wait_healthy(proc, location, log)
        # Execute: the client as typed, but for the cloud's port and a short training
        args = ["client", "--task", "flowers102", "--cloud", location, "--epochs", "2"]
        client = _cli([*args, "--no-hard-memory-limit"], tmp_path, env, 600)
        # bad input: a task nobody registered, and an offered task whose data is not here
        bad = {
            task: _cli(["client", "--task", task, "--cloud", location], tmp_path, env, 300)
            for task in ("no-such-task", "dtd")
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Assert: the server said what it serves and why; the client trained and said where it wrote
    served = log.read_text()
    assert "serving vit_tiny_patch16_224" in served and "flowers102" in served
    assert client.returncode == 0, client.stdout + client.stderr
    assert "flowers102 / mist" in client.stdout and "test accuracy" in client.stdout
    wrote = re.search(r"wrote (runs/flowers102-mist_pool-[0-9-]+)/lae.safetensors", client.stdout)
    assert wrote is not None, client.stdout
    metrics = json.loads((tmp_path / wrote.group(1) / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["task"] == "flowers102"
    for task, run in bad.items():
        err = [line for line in run.stderr.splitlines() if line.startswith("mist-fed: error")]
        assert run.returncode != 0 and len(err) == 1, (task, run.stderr)
        assert task in err[0] and "Traceback" not in run.stderr


def test_client_without_a_cloud_is_one_line_and_non_zero(tmp_path):
    # the default --cloud (or any) with nothing serving there
    port = _free_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cloud = f"grpc+tcp://{DEFAULT_HOST}:{port}"
    client = _cli(["client", "--task", "fashion-mnist", "--cloud", cloud], tmp_path, env, 300)
    err = [line for line in client.stderr.splitlines() if line.startswith("mist-fed: error")]
    assert client.returncode != 0 and len(err) == 1, client.stderr
