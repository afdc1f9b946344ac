"""The run session every run path shares: its one stop (Ctrl-C as ``mist-fed simulate`` gets it,
another thread as ``flwr stop``'s exit hook calls it), a checkpoint after every round, and a
seeded run that repeats itself. In process (the plain loop's transport), a real cloud with a
tiny random ViT; no Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.runner import running_cloud
from mist_fed.errors import Interrupted
from mist_fed.fleet.runtime.session import RunSession, run_plain
from mist_fed.fleet.runtime.stop import STOP_FILE
from mist_fed.fleet.spec import spec_from_dict
from mist_fed.fleet.transport import Reply
from mist_fed.fleet.worker import LocalTransport

pytestmark = pytest.mark.network

TASK = "synthetic:classes=3,train=24,val=8,test=12"


def _spec(rounds: int = 3, seed: int = 0) -> Any:
    return spec_from_dict({
        "fleets": [{"task": TASK, "devices": 2}], "profiles": "laptop", "rounds": rounds,
        "train_per_device": 6, "test_per_device": 3, "local_epochs": 1, "batch_size": 4,
        "seed": seed,
    })  # fmt: skip


@pytest.fixture
def cloud(tiny_backbone, tmp_path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("MIST_FED_CACHE", str(tmp_path / "cache"))
    serve = ServeConfig(port=0, random_init=True, cache_dir=str(tmp_path / "store"),
                        rows_per_batch=8, tasks=(TASK,))  # fmt: skip
    with running_cloud(serve, backbone=tiny_backbone) as loc:
        yield loc


class StopsInRoundTwo(LocalTransport):
    """The plain loop's transport that calls ``trigger`` at round 2's first reply, and notes
    what the run looked like then."""

    def __init__(self, session: RunSession, trigger: Any) -> None:
        super().__init__(stop=session.stop.event)
        self.session, self.trigger = session, trigger
        self.seen: dict[str, Any] = {}

    def replies(self) -> Iterator[Reply]:
        for res, state in super().replies():
            if res.round == 2 and not self.seen:
                run_dir = Path(self.session.results_dir or "") / self.session.run_id
                self.seen["checkpoint"] = tomllib.loads((run_dir / "config.toml").read_text())
                self.trigger(self.session)
                self.seen["stop_file"] = (self.session.storage.path / STOP_FILE).exists()
            yield res, state


def _ctrl_c(session: RunSession) -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the session's handler: the first Ctrl-C stops


def _flwr_stop(session: RunSession) -> None:
    hook = threading.Thread(target=session.stop.stop, args=("flwr stop",))
    hook.start()  # as Flower's exit hook calls it, from its own thread
    hook.join()


@pytest.mark.parametrize("path", ["ctrl-c", "flwr-stop"])
def test_one_stop_path_keeps_the_completed_rounds_and_ends_the_jobs(
    cloud: str, tmp_path: Path, path: str
) -> None:
    # Prepare: simulate raises Interrupted; the flwr run ServerApp returns quietly
    trigger = _ctrl_c if path == "ctrl-c" else _flwr_stop
    session = RunSession(_spec(), tmp_path / "results", run_id="run", cloud=cloud,
                         sigint=path == "ctrl-c", raise_stopped=path == "ctrl-c")  # fmt: skip
    transport: StopsInRoundTwo | None = None
    # Execute
    expect = pytest.raises(Interrupted) if path == "ctrl-c" else contextlib.nullcontext()
    with expect as raised, session:
        transport = StopsInRoundTwo(session, trigger)
        session.run_rounds(transport)
    # Assert: round 1 was checkpointed before round 2 began, and is what stays
    assert transport is not None and transport.seen["stop_file"]
    assert transport.seen["checkpoint"]["run"]["rounds_completed"] == 1
    run_dir = tmp_path / "results" / "run"
    facts = tomllib.loads((run_dir / "config.toml").read_text())["run"]
    assert facts["interrupted"] is True and facts["rounds_completed"] == 1
    assert sorted(pd.read_parquet(run_dir / "devices.parquet")["round"].unique()) == [1]
    assert session.result is not None and session.result.run_dir == run_dir
    # ... with its checkpoint and its devices' files, for --resume
    assert not session.completed and session.storage.path.is_dir()
    assert (run_dir / "checkpoint.pt").is_file()
    if path == "ctrl-c":
        message = str(raised.value)  # type: ignore[union-attr]
        assert "stopped after 1 of 3 rounds" in message
        assert f"mist-fed simulate --resume run --results {tmp_path / 'results'}" in message
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_completed_run_is_written_whole_without_the_checkpoints_mark(
    cloud: str, tmp_path: Path
) -> None:
    # Execute
    result = run_plain(_spec(rounds=2), tmp_path / "results", cloud=cloud, run_id="whole")
    # Assert
    facts = tomllib.loads((tmp_path / "results" / "whole" / "config.toml").read_text())["run"]
    assert "interrupted" not in facts and facts["engine"] == "plain"
    assert not (tmp_path / "results" / "whole" / "checkpoint.pt").exists()  # nothing to resume
    assert (tmp_path / "results" / "whole" / "accuracy_per_round.png").is_file()
    assert [r["round"] for r in result.records.fleets] == [1, 2]


def test_a_seeded_fleet_run_twice_gives_identical_per_round_accuracy(cloud: str) -> None:
    # Execute: the same spec and seed, each run with its own fresh device storage
    runs = [run_plain(_spec(rounds=2, seed=3), None, cloud=cloud).records for _ in range(2)]
    # Assert: every figure a round records about accuracy, fleet and device
    fleet = [
        [(r["round"], r["accuracy"], r["central_accuracy"]) for r in rec.fleets] for rec in runs
    ]
    device = [[(r["round"], r["device"], r["accuracy"], r["train_loss"]) for r in rec.devices]
              for rec in runs]  # fmt: skip
    assert fleet[0] == fleet[1] and device[0] == device[1]
    assert len(fleet[0]) == 2 and all(0 <= acc <= 1 for _, acc, _ in fleet[0])
