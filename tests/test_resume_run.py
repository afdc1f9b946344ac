"""Resume, end to end: a fleet run killed at each point of a round's checkpoint (before, during
and after its write, and mid-round), then ``--resume``d, ends with the same ``fleets.parquet``
accuracy, device by device and round by round, as a run that was never stopped; and
``simulations/run.py`` killed with SIGKILL after round 2 of 4, then resumed (slow)."""

from __future__ import annotations

import contextlib
import os
import signal
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

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.errors import ConfigError, Interrupted
from mist_fed.fleet.runtime import resume as ckpt
from mist_fed.fleet.runtime.session import RunSession, run_plain
from mist_fed.fleet.spec import spec_from_dict
from mist_fed.fleet.transport import Reply
from mist_fed.fleet.worker import LocalTransport
from tests.procs import tagged_pids

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]
TASK = "synthetic:classes=3,train=36,val=8,test=12"
SAME = ["round", "fleet", "accuracy", "central_accuracy", "sampled", "ok", "dropped",
        "sample_steps"]  # fmt: skip
SAME_DEVICE = ["round", "device", "status", "accuracy", "received_digest"]
# What devices downloaded: the same too where no round's work was lost (a device that fetched
# features in a round the kill cut short has them in its cache when the round runs again).
BYTES = ["bytes_down", "images_down"]


def _spec() -> Any:
    """FedAvgM with momentum, half the devices sampled a round, a quarter of those dropping."""
    return spec_from_dict({
        "fleets": [{"task": TASK, "devices": 4, "aggregation": "FedAvgM",
                    "aggregation_args": {"server_momentum": 0.9, "fraction_train": 0.5}}],
        "profiles": "laptop", "rounds": 3, "train_per_device": 6, "test_per_device": 3,
        "local_epochs": 1, "batch_size": 4, "seed": 7, "availability": "dropout:0.25",
    })  # fmt: skip


@pytest.fixture
def cloud(tiny_backbone, tmp_path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    serve = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "store"),
                        rows_per_batch=8, tasks=(TASK,))  # fmt: skip
    with running_cloud(serve, backbone=tiny_backbone) as loc:
        yield loc


class Killed(BaseException):
    """What a kill -9 leaves, as far as a hook can make it: nothing after it runs."""


def kill_at(rnd: int, stage: str) -> Callable[[str], None]:
    """A checkpoint hook that kills the run at ``stage`` of round ``rnd``'s write."""
    seen = {"round": 0}

    def hook(at: str) -> None:
        if at == "before":
            seen["round"] += 1
        if seen["round"] == rnd and at == stage:
            raise Killed

    return hook


class StopsMidRound(LocalTransport):
    """Stops the run (as Ctrl-C does) after round ``rnd``'s first reply."""

    def __init__(self, session: RunSession, rnd: int) -> None:
        super().__init__(stop=session.stop.event)
        self.session, self.rnd = session, rnd

    def replies(self) -> Iterator[Reply]:
        for res, state in super().replies():
            if res.round == self.rnd:
                self.session.stop.stop("test")
            yield res, state


def _same_tables(results: Path, a: str, b: str, more: list[str] | None = None) -> None:
    more = more or []
    for table, cols in (("fleets", SAME + more), ("devices", SAME_DEVICE + more)):
        x = pd.read_parquet(results / a / f"{table}.parquet")[cols]
        y = pd.read_parquet(results / b / f"{table}.parquet")[cols]
        pd.testing.assert_frame_equal(x, y, check_exact=True)


@pytest.mark.parametrize("stage", ["before", "during", "after", "mid-round"])
def test_a_run_killed_anywhere_in_a_round_resumes_to_the_same_tables(
    cloud: str, tmp_path: Path, stage: str
) -> None:
    # Prepare: the run that never stops, and one killed in round 2
    results = tmp_path / "results"
    run_plain(_spec(), results, cloud=cloud, run_id="whole")
    session = RunSession(_spec(), results, run_id="cut", cloud=cloud, sigint=False,
                         checkpoint_hook=None if stage == "mid-round" else kill_at(2, stage))  # fmt: skip
    raises = pytest.raises(Interrupted if stage == "mid-round" else Killed)
    with raises, session:
        transport = StopsMidRound(session, 2) if stage == "mid-round" else LocalTransport()
        session.run_rounds(transport)
    storage = session.storage.path
    assert storage.is_dir()  # the devices' files stay for the resume
    # Execute: resume it from what is on disk, as --resume does
    spec, saved = ckpt.open_run(results, "cut")
    resumed = run_plain(spec, results, cloud=cloud, resume=saved)
    # Assert: from the last completed checkpoint, to the same rows as the run that never stopped
    assert saved.round == (2 if stage == "after" else 1)
    assert saved.storage == storage.name
    assert [r["round"] for r in resumed.records.fleets] == [1, 2, 3]
    _same_tables(results, "whole", "cut", BYTES if stage == "after" else [])
    if stage != "after":  # ... and never more than that
        fetched = [pd.read_parquet(results / r / "devices.parquet")["bytes_down"].sum()
                   for r in ("whole", "cut")]  # fmt: skip
        assert fetched[1] <= fetched[0]
    facts = tomllib.loads((results / "cut" / "config.toml").read_text())["run"]
    assert facts["resumes"] == 1 and facts["resumed_from_round"] == saved.round
    assert "interrupted" not in facts
    assert not (results / "cut" / ckpt.CHECKPOINT).exists() and not storage.exists()
    assert list((results / "cut").glob(".*.tmp")) == []


def test_a_resume_under_another_spec_is_refused(cloud: str, tmp_path: Path) -> None:
    # Prepare: a run killed after round 2's checkpoint; then its recorded spec edited
    results = tmp_path / "results"
    session = RunSession(_spec(), results, run_id="cut", cloud=cloud, sigint=False,
                         checkpoint_hook=kill_at(2, "after"))  # fmt: skip
    with pytest.raises(Killed), session:
        session.run_rounds(LocalTransport())
    config = results / "cut" / "config.toml"
    config.write_text(config.read_text().replace("seed = 7", "seed = 8"))
    spec, saved = ckpt.open_run(results, "cut")
    # Execute / Assert
    with pytest.raises(ConfigError, match="another fleet spec") as e:
        run_plain(spec, results, cloud=cloud, resume=saved)
    assert "\n" not in str(e.value)


def test_a_kill_between_round_ones_checkpoint_and_tables_still_resumes(
    cloud: str, tmp_path: Path
) -> None:
    # Prepare: killed after round 1's checkpoint, before any table or config.toml was written
    results = tmp_path / "results"
    session = RunSession(_spec(), results, run_id="cut", cloud=cloud, sigint=False,
                         checkpoint_hook=kill_at(1, "after"))  # fmt: skip
    with pytest.raises(Killed), session:
        session.run_rounds(LocalTransport())
    assert not (results / "cut" / "config.toml").exists()
    # Execute: the spec comes from the checkpoint
    spec, saved = ckpt.open_run(results, "cut")
    result = run_plain(spec, results, cloud=cloud, resume=saved)
    # Assert
    assert saved.round == 1 and [r["round"] for r in result.records.fleets] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_simulate_killed_with_sigkill_after_round_two_resumes_to_the_same_accuracy(
    tmp_path: Path,
) -> None:
    # Prepare: a 4-round FedAvgM fleet on Flower + Ray, as simulations/run.py runs it
    (tmp_path / "fleet.toml").write_text(FLEET)
    tag = f"mist-fed-resume-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0",
           "MIST_FED_CACHE": str(tmp_path / "cache"), "MIST_FED_TEST_TAG": tag}  # fmt: skip
    results = tmp_path / "results"
    run = [sys.executable, str(ROOT / "simulations" / "run.py"), "--no-progress",
           "--results", str(results)]  # fmt: skip
    fleet = ["--fleet", str(tmp_path / "fleet.toml")]
    try:
        whole = subprocess.run([*run, *fleet, "--run-id", "whole"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=LIMIT_S)  # fmt: skip
        assert whole.returncode == 0, whole.stderr[-4000:]
        proc = subprocess.Popen([*run, *fleet, "--run-id", "cut"], env=env, cwd=tmp_path,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        # Execute: SIGKILL once round 2's checkpoint is on disk
        assert _wait_for_round(results / "cut", 2, proc), "round 2 never completed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        _kill_tagged(tag)
        killed_at = ckpt.load(results / "cut").round
        again = subprocess.run([*run, "--resume", "cut"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=LIMIT_S)  # fmt: skip
        # Assert
        assert again.returncode == 0, again.stderr[-4000:]
        assert 2 <= killed_at < 4
        _same_tables(results, "whole", "cut")
        acc = pd.read_parquet(results / "cut" / "fleets.parquet")["accuracy"].tolist()
        print(f"\nRESUME sigkill after round {killed_at} of 4: accuracy per round {acc}")
    finally:
        _kill_tagged(tag)


LIMIT_S = 600
FLEET = """\
profiles = "laptop"
train_per_device = 6
test_per_device = 3
rounds = 4
local_epochs = 1
seed = 3

[[fleets]]
task = "synthetic:classes=3,train=24,test=12"
devices = 2
aggregation = "FedAvgM"
aggregation_args = { server_momentum = 0.9 }

[backbone]
name = "vit_tiny_patch16_224"
random_init = true
model_kwargs = { img_size = 32, patch_size = 8, depth = 2, embed_dim = 32, num_heads = 2 }
"""


def _wait_for_round(run_dir: Path, rnd: int, proc: subprocess.Popen) -> bool:
    end = time.monotonic() + LIMIT_S
    while time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(ConfigError):
            if ckpt.load(run_dir).round >= rnd:
                return True
        time.sleep(0.2)
    return False


def _kill_tagged(tag: str) -> None:
    """The processes this test started (Ray's among them), by their ids."""
    for pid in tagged_pids(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
